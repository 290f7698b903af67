"""The public Python API: what the verbs do, as functions on models and artifacts.

    import compiler

    dense = compiler.load("resnet56")                       # the shipped model (or a checkpoint path)
    pruned = compiler.prune(dense, flops_reduction=0.5, data="../shared/data")
    art = compiler.build(pruned, target="host", precision="int8", data="../shared/data")
    logits = compiler.Artifact.load(art.folder).run(images)  # uint8 (N, 32, 32, 3) or (N, 3, 32, 32)

Settings are the dataclasses the verbs use (:class:`compiler.build.BuildSettings`,
:class:`compiler.prune.job.PruneSettings`, ...), validated once when made: a bad value raises
:class:`compiler.errors.SettingError` naming the keyword. Nothing here prints (progress bars aside, off by default).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from compiler.artifact import Artifact
from compiler.checkpoint import Checkpoint
from compiler.errors import SettingError, UserError

__all__ = ["Artifact", "Checkpoint", "SettingError", "UserError", "build", "compare", "evaluate", "load", "prune",
           "tune"]


def load(path_or_name: str | Path, *, model: str | None = None, normalize: str | None = None) -> Checkpoint:
    """A checkpoint file (any layout ``torch.load(weights_only=True)`` reads), or, given a model name such as
    ``"resnet56"``, the model shipped in compiler/zoo: the model with its metadata (normalization, pruning record,
    metrics, sha256)."""
    from compiler import models, zoo

    text = str(path_or_name)
    is_name = text == "googlenet" or models.resnet_depth(text) is not None
    if is_name and not Path(text).expanduser().exists():
        return zoo.load(text, None, normalize, quiet=True)
    return zoo.load(model, text, normalize, quiet=True)


def _checkpoint(model: Checkpoint | str | Path) -> Checkpoint:
    return model if isinstance(model, Checkpoint) else load(model)


def prune(model: Checkpoint | str | Path, *, flops_reduction: float, criterion: str = "l1",
          finetune_epochs: int = 0, data: str | Path | None = None, out: str | Path | None = None,
          progress: bool = False, **settings) -> Checkpoint:
    """Structured filter pruning of a dense model to remove ``flops_reduction`` of its MACs, BN re-estimation and
    ``finetune_epochs`` of fine-tuning; the pruned checkpoint (written to ``out``, default a new temporary folder).
    Further keywords: the fields of :class:`compiler.prune.job.PruneSettings` (``distill``, ``round_to``, ...)."""
    from compiler.prune.job import PruneSettings, prune as run_prune

    src = _checkpoint(model)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="cifar-prune-")) / f"{src.model_name}-pruned.pt"
    s = PruneSettings(flops_reduction=flops_reduction, criterion=criterion, finetune_epochs=finetune_epochs,
                      data=data, out=out, **settings)
    result = run_prune(src, s, progress=progress)
    return load(result["out"], model=src.model_name, normalize=src.normalize)


def build(model: Checkpoint | str | Path, *, target: str = "jetson-tx2", precision: str = "auto", batch: int = 1,
          out: str | Path | None = None, data: str | Path | None = None, calib_images: int | None = None,
          calibration: str | None = None, keep_fp32: tuple[str, ...] | None = None,
          tuning_log: str | Path | None = None, progress: bool = False) -> Artifact:
    """Compile ``model`` for ``target`` into a verified artifact folder (``out``, default
    artifacts/<model>-<target>); the :class:`Artifact`. ``precision="auto"`` takes the target's default."""
    from compiler.build import BuildSettings, build as run_build

    s = BuildSettings(target=target, precision=precision, batch=batch, out=out, data=data,
                      quant=_quant(calib_images, calibration, keep_fp32), tuning_log=tuning_log)
    result = run_build(_checkpoint(model), s, progress=progress)
    return Artifact(result["artifact"], result["manifest"])


def _quant(calib_images, calibration, keep_fp32):
    from compiler.build import QuantSettings

    given = {k: v for k, v in (("calib_images", calib_images), ("calibration", calibration),
                               ("keep_fp32", keep_fp32)) if v is not None}
    return QuantSettings(**given)


def tune(model: Checkpoint | str | Path, *, target: str, trials: int, precision: str = "auto", batch: int = 1,
         data: str | Path | None = None, progress: bool = False, **settings) -> dict:
    """MetaSchedule on exactly the module :func:`build` compiles for ``target``; the database folder and per-task
    results. Further keywords: the fields of :class:`compiler.tuning.session.TuneSettings` (``tracker``, ``key``,
    ...)."""
    from compiler.tuning.session import TuneSettings, tune as run_tune

    quant = _quant(settings.pop("calib_images", None), settings.pop("calibration", None),
                   settings.pop("keep_fp32", None))
    s = TuneSettings(target=target, trials=trials, precision=precision, batch=batch, data=data, quant=quant,
                     **settings)
    return run_tune(_checkpoint(model), s, progress=progress)


def evaluate(model: Checkpoint | Artifact | str | Path, data: str | Path | None = None, *,
             limit: int | None = None, progress: bool = False) -> dict:
    """Top-1 (%) on the first ``limit`` CIFAR-10 test images (all by default) of a PyTorch model or of an
    artifact built for this machine: ``{"top1", "n", "seconds", ...}``."""
    from compiler import artifact as artifact_mod
    from compiler.evaluate import evaluate as evaluate_checkpoint

    if isinstance(model, Artifact):
        return artifact_mod.evaluate(model.folder, data, limit=limit, progress=progress)
    return evaluate_checkpoint(_checkpoint(model), data, limit=limit, progress=progress)


def compare(model: Checkpoint | str | Path, *, pruned: Checkpoint | str | Path | None = None,
            data: str | Path | None = None, progress: bool = False, **settings) -> dict:
    """Every engine (PyTorch, ONNX Runtime, OpenVINO, TVM, TensorRT where present) on the same batch of the dense
    model and its pruned copy (default: the shipped one, when it was pruned from ``model``): rows of median / p90 ms, speed-ups and agreement with PyTorch. Further keywords:
    the fields of :class:`compiler.compare.CompareSettings`."""
    from compiler.compare import CompareSettings, compare as run_compare

    from compiler import pair

    dense = _checkpoint(model)
    # no pruned model: the shipped one when it was pruned from exactly ``dense``
    pr = pruned if isinstance(pruned, Checkpoint) else pair.pruned_for(dense, pruned, None, quiet=True)
    return run_compare(dense, pr, CompareSettings(data=data, **settings), progress=progress)
