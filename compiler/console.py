"""Terminal output: plain tables and progress bars (tqdm, on stderr so --json's stdout stays clean)."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm


LOG_LINE_SECONDS = 30.0  # without a terminal (a log file, CI), progress is a plain line this often


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr; when stderr is no terminal, a plain line every :data:`LOG_LINE_SECONDS` instead (a
    long step, such as compiling or tuning a model, shows it is alive in a log file too). ``disable=True``: none."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("disable", None)
    if kwargs["disable"] is None and not _is_terminal(kwargs["file"]):
        return LogLines(iterable, **kwargs)
    return tqdm(iterable, **kwargs)


def _write_lines(bar_ref, stopped, every: float) -> None:
    while not stopped.wait(every):
        bar = bar_ref()
        if bar is None:
            return
        bar.write_line()
        del bar


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LogLines(tqdm):
    """Progress for a log file: ``desc: n/total units [elapsed<remaining], postfix`` on a line of its own every
    :data:`LOG_LINE_SECONDS`, written by a timer thread (so a single step that takes minutes still shows), never
    the carriage-return redraws of a bar."""

    def __init__(self, iterable=None, **kwargs):
        import threading
        import weakref

        self._every = LOG_LINE_SECONDS
        self._stopped = threading.Event()
        kwargs.update(disable=False, leave=False, mininterval=self._every, dynamic_ncols=False,
                      bar_format="{desc}: {n_fmt}/{total_fmt} {unit}s [{elapsed}<{remaining}]{postfix}")
        super().__init__(iterable, **kwargs)
        # the thread holds the bar weakly: a bar an exception left unclosed is collected (tqdm closes it then)
        # instead of writing lines for the rest of the process
        threading.Thread(target=_write_lines, args=(weakref.ref(self), self._stopped, self._every),
                         name="progress-lines", daemon=True).start()

    def write_line(self) -> None:
        with self.get_lock():
            self.fp.write(self.__str__() + "\n")
            self.fp.flush()

    def display(self, msg=None, pos=None):  # no redraws: the timer writes the lines
        return msg != ""  # False for close's "clear the bar", which would then write a carriage return

    def close(self) -> None:
        if hasattr(self, "_stopped"):
            self._stopped.set()
        super().close()


def line(message: str) -> None:
    """A line on stdout that does not tear an active progress bar (tqdm.write)."""
    tqdm.write(message, file=sys.stdout)


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
