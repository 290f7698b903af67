"""The engine interface, timing settings, and the one way every engine is measured."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.errors import SettingError


class Unavailable(Exception):
    """The engine cannot run here (package missing, no GPU, ...): a row with this reason, not a crash."""


@dataclass(frozen=True)
class Timing:
    """``warmup`` calls, then ``repeat`` runs of ``number`` calls each (a run's time is their mean)."""

    repeat: int = 30
    number: int = 3
    warmup: int = 3

    def __post_init__(self):
        for name in ("repeat", "number"):
            if getattr(self, name) <= 0:
                raise SettingError(name, "must be positive")
        if self.warmup < 0:
            raise SettingError("warmup", "must be 0 or more")


class Engine:
    """One model in one precision on one engine. Subclasses set ``name`` and implement the three methods."""

    name = "engine"
    cpu = True  # a CPU peer (the best CPU peer is what the speed-up goals compare against)

    def prepare(self, threads: int) -> None:
        """Ready to run on ``threads`` threads (called before timing at each count, and before :meth:`run`)."""
        raise NotImplementedError

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits of the normalized float32 NCHW batch ``x`` (any number of images)."""
        raise NotImplementedError

    def time(self, x: np.ndarray, timing: Timing) -> dict:
        """``{"median_ms", "p90_ms", "runs"}`` of calls on the batch ``x``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release sessions and threads (optional)."""


def in_chunks(call, x: np.ndarray, batch: int) -> np.ndarray:
    """``call`` on a model compiled for a static ``batch``: ``x`` in chunks, the last one zero-padded."""
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(np.asarray(call(np.ascontiguousarray(chunk)))[:n])
    return np.concatenate(outs)


def agreement(logits: np.ndarray, ref: np.ndarray) -> dict:
    """Max |diff| and argmax agreement (%) of ``logits`` against ``ref`` on the images both have."""
    n = min(len(logits), len(ref))
    return {"max_abs_diff": float(np.abs(logits[:n] - ref[:n]).max()),
            "argmax_agree": round(100.0 * float((logits[:n].argmax(1) == ref[:n].argmax(1)).mean()), 1)}


@dataclass
class Measured:
    """What :func:`measure` found: the stats at the fastest count, the count, every count's median, agreement."""

    stats: dict
    threads: int | None
    threads_ms: dict = field(default_factory=dict)
    agreement: dict = field(default_factory=dict)


def measure(engine: Engine, x: np.ndarray, timing: Timing, counts: list[int] | None,
            check: tuple[np.ndarray, np.ndarray] | None = None) -> Measured:
    """Time ``engine`` on ``x`` at each thread count in ``counts`` (None: it sets no thread count), keep the
    fastest, and (with ``check = (images, reference logits)``) compare its logits at that count."""
    from compiler import threads

    def time_at(n: int) -> dict:
        engine.prepare(n)
        return engine.time(x, timing)

    if counts is None:
        engine.prepare(0)
        stats, used = engine.time(x, timing), {"threads": None, "threads_ms": {}}
    else:
        stats, used = threads.at_best(time_at, counts)
        engine.prepare(used["threads"])
    agree = agreement(engine.run(check[0]), check[1]) if check is not None else {}
    return Measured(stats, used["threads"], used["threads_ms"], agree)
