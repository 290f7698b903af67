"""Terminal output: plain tables and progress bars (tqdm, on stderr so --json's stdout stays clean)."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("disable", None)  # no bar when stderr is not a terminal
    return tqdm(iterable, **kwargs)


def warn(message: str) -> None:
    """A one-line warning on stderr (through tqdm, so an active progress bar is not torn)."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def table(rows: list[dict], columns: list[str] | None = None, title: str | None = None) -> str:
    """Render dicts as an aligned text table (numbers right-aligned)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) in ("", None) for r in rows) for c in columns]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


# TVM 0.27's VM executable logs one "Warning: Scope Saving:/Loaded:" line per constant when it is saved or
# loaded: noise to a user, so those lines are dropped (everything else native code prints is passed on).
TVM_NOISE = ("Warning: Scope Saving:", "Warning: Scope Loaded:")


@contextlib.contextmanager
def filter_native_stderr(drop: tuple[str, ...] = TVM_NOISE):
    """Capture what native code writes to file descriptor 2 and re-emit it without the lines in ``drop``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            for line in buf.read().decode(errors="replace").splitlines(keepends=True):
                if not any(d in line for d in drop):
                    sys.stderr.write(line)
            sys.stderr.flush()


def cpu_name() -> str:
    """This machine's CPU model (from /proc/cpuinfo where there is one), for tables and model cards."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


@contextlib.contextmanager
def third_party_quiet():
    """Silence what a third-party library prints to stdout and warns while it works (torch.onnx's exporter,
    onnxruntime.quantization): our own library code never prints, so this is only for theirs."""
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
