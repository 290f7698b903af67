"""Activation calibration for the int8 pass: run the fp32 module on sample images and pick a clipping range per tensor.

The fp32 Relax module is rebuilt so that ``main`` returns the tensors to calibrate (the inputs of the layers to be
quantized), compiled for this CPU with TVM's default pipeline and run on the calibration images in chunks of the
module's static batch size. Each tensor feeds one :class:`Histogram` of ``|x|`` (plus its exact min and max), from
which a threshold ``T`` is chosen by one of :data:`METHODS`:

``minmax``      ``T = max |x|`` (no clipping; one outlier stretches the scale)
``percentile``  ``T`` = the ``p``-th percentile of ``|x|`` (default 99.99)
``entropy``     TensorRT's calibration: the ``T`` whose quantized distribution (``levels`` bins over ``[0, T]``,
                everything above ``T`` clipped into the last bin) has the least KL divergence from the fp32
                histogram

The quantization scale is then ``T / qmax`` (255 for uint8, 127 for int8; zero point 0: symmetric int8 for signed
tensors, uint8 for non-negative ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

__all__ = ["METHODS", "DEFAULT_METHOD", "DEFAULT_PERCENTILE", "Histogram", "collect", "kl_threshold"]

METHODS = ("minmax", "percentile", "entropy")
DEFAULT_METHOD = "minmax"  # measured best on ResNet56 (see passes/quantize.py)
DEFAULT_PERCENTILE = 99.99
HIST_BINS = 2048


class Histogram:
    """Histogram of ``|x|`` over ``[0, hi)`` with a fixed number of bins; ``hi`` doubles (merging bin pairs, an exact
    operation) whenever a larger value arrives, so one pass over the data suffices. Also the exact min and max."""

    def __init__(self, bins: int = HIST_BINS):
        if bins % 2:
            raise ValueError("bins must be even")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.hi = 0.0
        self.min = np.inf
        self.max = -np.inf
        self.count = 0

    @property
    def absmax(self) -> float:
        return float(max(abs(self.min), abs(self.max))) if self.count else 0.0

    def add(self, values: np.ndarray) -> None:
        a = np.asarray(values, dtype=np.float32).ravel()
        if a.size == 0:
            return
        if not np.all(np.isfinite(a)):
            raise ValueError("non-finite activation during calibration")
        self.min = min(self.min, float(a.min()))
        self.max = max(self.max, float(a.max()))
        self.count += a.size
        a = np.abs(a)
        top = float(a.max())
        if self.hi == 0.0:
            if top == 0.0:
                self.counts[0] += a.size  # all zeros so far: bin 0 whatever the final range
                return
            self.hi = top * (1 + 1e-6)
        while top >= self.hi:
            merged = self.counts.reshape(-1, 2).sum(1)
            self.counts = np.concatenate([merged, np.zeros_like(merged)])
            self.hi *= 2
        idx = (a * (self.bins / self.hi)).astype(np.int64)
        np.minimum(idx, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    def state(self) -> np.ndarray:
        """``[hi, min, max, count]`` (float64): with :attr:`counts`, all a Histogram holds (see :meth:`from_state`)."""
        return np.array([self.hi, self.min, self.max, self.count], dtype=np.float64)

    @classmethod
    def from_state(cls, counts: np.ndarray, state: np.ndarray) -> "Histogram":
        """The Histogram :meth:`state` and :attr:`counts` describe; ValueError on arrays no Histogram could hold."""
        counts, state = np.asarray(counts), np.asarray(state, dtype=np.float64)
        if (counts.ndim != 1 or len(counts) < 2 or len(counts) % 2 or counts.dtype.kind not in "iu"
                or state.shape != (4,) or np.any(counts < 0)):
            raise ValueError("not a calibration histogram (counts: even length, non-negative integers; state: 4)")
        hi, lo, top, count = (float(v) for v in state)
        if int(counts.sum()) != count or hi < 0 or not np.isfinite(hi) or (count and not lo <= top):
            raise ValueError("calibration histogram counts and state disagree")
        h = cls(len(counts))
        h.counts = counts.astype(np.int64)
        h.hi, h.min, h.max, h.count = hi, lo, top, int(count)
        return h

    def trimmed(self) -> tuple[np.ndarray, float]:
        """(counts up to the last non-empty bin, bin width)."""
        nz = np.nonzero(self.counts)[0]
        last = int(nz[-1]) + 1 if len(nz) else 1
        return self.counts[:last].astype(np.float64), (self.hi / self.bins if self.hi else 0.0)

    def threshold(self, method: str, levels: int, percentile: float = DEFAULT_PERCENTILE) -> float:
        """The clipping threshold ``T`` on ``|x|`` by ``method``; ``levels``: quantized bins over [0, T]."""
        if method not in METHODS:
            raise ValueError(f"unknown calibration method '{method}': one of {', '.join(METHODS)}")
        amax = self.absmax
        if amax == 0.0 or method == "minmax":
            return amax
        hist, width = self.trimmed()
        if method == "percentile":
            cdf = np.cumsum(hist) / hist.sum()
            k = int(np.searchsorted(cdf, percentile / 100.0))
            k = min(k, len(hist) - 1)
            below = cdf[k - 1] if k else 0.0
            frac = (percentile / 100.0 - below) / max(cdf[k] - below, 1e-300)
            return float(min(amax, (k + np.clip(frac, 0.0, 1.0)) * width))
        return float(min(amax, kl_threshold(hist, levels) * width))


def _expand_quantized(p: np.ndarray, levels: int) -> np.ndarray:
    """Quantize the distribution ``p`` (length i) into ``levels`` bins and spread each bin's mass evenly back over
    the source bins that were non-empty (TensorRT's Q)."""
    i = len(p)
    starts = (np.arange(levels) * i) // levels
    totals = np.add.reduceat(p, starts)
    nonzero = (p > 0).astype(np.float64)
    counts = np.add.reduceat(nonzero, starts)
    which = np.repeat(np.arange(levels), np.diff(np.append(starts, i)))
    per = np.divide(totals, counts, out=np.zeros_like(totals), where=counts > 0)
    return per[which] * nonzero


def kl_threshold(hist: np.ndarray, levels: int, max_candidates: int = 1024) -> float:
    """TensorRT's entropy calibration on a histogram of ``|x|`` (bin 0 at zero): the number of bins ``i`` (a
    threshold at ``i`` bin widths) minimizing KL(P || Q), where P is ``hist[:i]`` with the tail folded into its last
    bin and Q is P quantized to ``levels`` bins. Returns ``i`` (in units of bin width)."""
    hist = np.asarray(hist, dtype=np.float64).copy()
    # zero is exact on the quantized grid (zero point 0): leave the bin at 0 out. Post-ReLU tensors are half zeros,
    # and that spike, spread over its merged quantized bin, would drive the search to far too small thresholds
    # (measured on ResNet56: -1.2 pt top-1 with it in, T = 1.8 sigma on a rectified normal)
    hist[0] = 0.0
    n = len(hist)
    if n <= levels:
        return float(n)
    step = max(1, (n - levels) // max_candidates)
    best_i, best_kl = n, np.inf
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
    for i in range(levels, n + 1, step):
        p = hist[:i].copy()
        p[-1] += suffix[i]
        q = _expand_quantized(hist[:i], levels)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p /= ps
        q /= qs
        m = p > 0
        # where P has mass and Q has none (only the folded last bin can), smooth Q as TensorRT does
        qm = np.where(q[m] > 0, q[m], 1e-12)
        kl = float(np.sum(p[m] * np.log(p[m] / qm)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(best_i)


# ---------------------------------------------------------------- running the fp32 module


@dataclass
class Collected:
    """Histograms of the calibrated tensors, in the order asked for, and what was run."""

    histograms: list
    images: int
    batch: int


def _probe_module(mod: tvm.IRModule, exprs: list, func_name: str = "main") -> tvm.IRModule:
    """A copy of ``mod`` whose ``func_name`` returns the tuple of ``exprs`` (its params, or vars bound in its last
    binding block: the frontend's functions are one dataflow block)."""
    func = mod[func_name]
    blocks = list(func.body.blocks)
    last = blocks[-1]
    ty = relax.TupleType([e.ty for e in exprs])
    out = relax.Var("calibration_outputs", ty)
    binding = relax.VarBinding(out, relax.Tuple(list(exprs)))
    cls = relax.DataflowBlock if isinstance(last, relax.DataflowBlock) else relax.BindingBlock
    blocks[-1] = cls(list(last.bindings) + [binding])
    new = relax.Function(func.params, relax.SeqExpr(blocks, out), ty, func.is_pure, func.attrs)
    probe = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != func_name})
    probe[func_name] = new
    return relax.transform.DeadCodeElimination([func_name])(probe)


def _static_batch(func: relax.Function) -> int | None:
    shape = func.params[0].ty.shape
    try:
        return int(shape.values[0])
    except (AttributeError, TypeError):
        return None


def _cpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's default CPU pipeline with the kernels on every core (:mod:`passes.parallel_fallback`): the probe module
    is untuned fp32, and calibration runs it over every calibration image."""
    import importlib

    from passes.parallel_fallback import ParallelFallback

    stages = importlib.import_module("tvm.relax.backend.cpu_generic.pipeline")

    @tvm.transform.module_pass(opt_level=0, name="calibration_cpu_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                stages.library_dispatch_passes(target) + stages.legalize_passes(target) + [ParallelFallback()]
                + stages.dataflow_lower_passes(target) + stages.finalize_passes(target))(mod)

    return _pipeline


def collect(mod: tvm.IRModule, exprs: list, images: np.ndarray, *, func_name: str = "main",
            target: tvm.target.Target | None = None, progress=None) -> Collected:
    """Run the fp32 ``mod`` on ``images`` (float32 NCHW, already normalized) and histogram each of ``exprs``
    (Relax vars / params of ``func_name``). The module runs in chunks of its static batch (any chunk if symbolic);
    a last partial chunk is zero-padded and the padding is left out of the statistics."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if len(images) == 0:
        raise ValueError("calibration needs at least one image")
    probe = _probe_module(mod, exprs, func_name)
    batch = _static_batch(mod[func_name]) or min(len(images), 64)
    if target is None:
        target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu() or "generic"})
    exe = tvm.compile(probe, target, relax_pipeline=_cpu_pipeline(target))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    hists = [Histogram() for _ in exprs]
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
        outs = vm[func_name](tvm.runtime.tensor(chunk))
        for h, t in zip(hists, outs):
            h.add(t.numpy()[:n])
        if progress is not None:
            progress(n)
    return Collected(hists, len(images), batch)
