"""Inference engines behind one interface, so ``compare`` and ``report`` measure them all the same way.

An :class:`~compiler.engines.base.Engine` holds one model in one precision: ``prepare(threads)`` makes it ready
to run on that many threads (a session, a compiled model, a thread pool setting), ``run(x)`` returns the logits
of a normalized float32 NCHW batch of any size, ``time(x, timing)`` times calls on the batch ``x``.
:func:`~compiler.engines.base.measure` times an engine at each candidate thread count and checks its logits
against a reference. Implementations: :mod:`.pytorch`, :mod:`.onnxruntime`, :mod:`.openvino`, :mod:`.tvm`,
:mod:`.tensorrt`; :mod:`.onnx` makes the ONNX files (fp32 export, static int8 QDQ) the ONNX-based ones read.
"""

from compiler.engines.base import Engine, Measured, Timing, Unavailable, agreement, measure

__all__ = ["Engine", "Measured", "Timing", "Unavailable", "agreement", "measure"]
