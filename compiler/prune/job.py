"""A prune job: dependency groups -> importance -> global allocation (rounded, floored) -> zero the removed
channels -> re-estimate BN statistics -> fine-tune -> a dense-shaped checkpoint with the pruning record.

Fine-tuning trains the physically shrunk copy by default (the removed channels do not exist, so they stay
removed, and a step costs what the pruned model costs) and writes it back into the dense-shaped model after every
epoch; ``finetune_masked`` instead trains the dense-shaped model and re-applies the masks after every optimizer
step. Both compute the same function.

The output checkpoint is written right after pruning and after every fine-tuning epoch; running the same job
again resumes it. ``out`` is never allowed to overwrite anything but this project's prune checkpoint.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from compiler import checkpoint, data, fileio
from compiler.errors import SettingError, UserError
from compiler.evaluate import top1
from compiler.prune import dependency, importance, pruner, reconstruct

VERB = "prune"


@dataclass(frozen=True)
class PruneSettings:
    """How to prune and fine-tune; validated when made."""

    flops_reduction: float
    out: str | Path
    finetune_epochs: int = 0
    data: str | Path | None = None
    criterion: str = "l1"
    round_to: int = 8
    floor: float = 0.1
    prune_stream: bool = False
    distill: bool = False
    finetune_masked: bool = False
    taylor_batches: int = 16
    bn_batches: int = 20
    reconstruct: int = 0  # training images for the least-squares refit of every conv2d (0: off; see reconstruct.py)
    lr: float = 0.02
    batch_size: int = 128
    weight_decay: float = 5e-4
    limit_train: int | None = None
    limit_test: int | None = None
    seed: int = 0
    bf16: bool | None = None  # None: where the CPU has native bf16
    channels_last: bool = True
    compile: bool = False
    download: bool = False
    command: str | None = None  # what the model card records as the command that made the checkpoint

    def __post_init__(self):
        if not 0.0 < self.flops_reduction < 1.0:
            raise SettingError("flops_reduction", "must be a fraction in (0, 1) (0.6 removes 60% of the FLOPs), "
                                                  f"got {self.flops_reduction}")
        if self.criterion not in importance.CRITERIA:
            raise SettingError("criterion", f"must be one of {', '.join(importance.CRITERIA)}, got {self.criterion!r}")
        if self.finetune_epochs < 0:
            raise SettingError("finetune_epochs", "must be 0 or more")
        if self.round_to < 1:
            raise SettingError("round_to", "must be 1 or more")
        if not 0.0 <= self.floor < 1.0:
            raise SettingError("floor", "must be a fraction in [0, 1)")
        for name in ("lr", "batch_size", "taylor_batches"):
            if getattr(self, name) <= 0:
                raise SettingError(name, "must be positive")
        for name in ("bn_batches", "reconstruct", "weight_decay"):
            if getattr(self, name) < 0:
                raise SettingError(name, "must be 0 or more")
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise SettingError(name, "must be a positive number of images")

    @property
    def mode(self) -> str:
        return "masked" if self.finetune_masked else "shrunk"

def _settings(s: PruneSettings, src: checkpoint.Checkpoint) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {
        "criterion": s.criterion,
        "flops_reduction_requested": float(s.flops_reduction),
        "round_to": int(s.round_to),
        "floor": float(s.floor),
        "prune_stream": bool(s.prune_stream),
        "reconstruct_images": int(s.reconstruct),
        "source_sha256": src.sha256,
    }


def _resume(out: Path, name: str, settings: dict, s: PruneSettings) -> checkpoint.Checkpoint | None:
    if not out.exists():
        return None
    refuse = f"{out} exists and is not a resumable prune checkpoint of this project; choose another output path " \
             "(nothing was overwritten)"
    if not out.is_file():
        raise UserError(refuse)
    try:
        prev = checkpoint.load_checkpoint(out, None)
    except UserError:
        raise UserError(refuse) from None
    state = prev.train_state or {}
    if state.get("verb") != VERB or not isinstance(prev.pruning, dict):
        raise UserError(refuse)
    if prev.model_name != name:
        raise UserError(f"{out} is a {prev.model_name} prune checkpoint, not {name}; choose another output path")
    for key, want in settings.items():
        have = prev.pruning.get(key)
        if have != want:
            raise UserError(f"{out} was pruned with {key} = {have}, not {want}; "
                            "choose another output path or repeat the original settings")
    if int(state.get("epochs", -1)) != s.finetune_epochs and int(state.get("epoch", 0)) > 0:
        raise UserError(f"{out} is fine-tuning for {state.get('epochs')} epochs, not {s.finetune_epochs}: "
                        f"fine-tune for {state.get('epochs')} epochs or choose another output path")
    if state.get("finetune") not in (None, s.mode) and int(state.get("epoch", 0)) > 0:
        raise UserError(f"{out} is fine-tuned in {state.get('finetune')} mode; "
                        f"resume it with finetune_masked={state.get('finetune') == 'masked'}")
    return prev


def _batches(split: data.Split, normalize: str, batch_size: int, count: int, seed: int, augment: bool):
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=gen)
    for i in range(count):
        idx = order[(i * batch_size) % len(split):][:batch_size]
        if len(idx) == 0:
            break
        images = split.images[idx]
        if augment:
            images = data.random_crop_flip(images, generator=gen)
        yield data.normalize(images, normalize), split.labels[idx]


def stage_summary(record: dict) -> list[dict]:
    """Per stage (stem, layer1.. / a3..): convs, channels dense and kept, and the distinct kept widths."""
    stages: dict[str, list[tuple[int, int]]] = {}
    for conv, info in record["layers"].items():
        stage = conv.split(".")[0]
        stage = "stem" if stage in ("conv1", "pre_layers") else stage
        stages.setdefault(stage, []).append((int(info["channels"]), len(info["kept"])))
    rows = []
    for stage, layers in stages.items():
        dense = sum(c for c, _ in layers)
        kept = sum(k for _, k in layers)
        widths = Counter(f"{k}/{c}" for c, k in layers)
        rows.append({"stage": stage, "convs": len(layers), "channels": dense, "kept": kept,
                     "kept_pct": round(100.0 * kept / dense, 1),
                     "widths (kept/dense x convs)": " ".join(f"{w}x{n}" for w, n in sorted(
                         widths.items(), key=lambda kv: (int(kv[0].split('/')[1]), int(kv[0].split('/')[0]))))})
    return rows


def prune(src: checkpoint.Checkpoint, s: PruneSettings, *, say=None, progress: bool = True) -> dict:
    """Prune the dense checkpoint ``src`` as ``s`` says into ``s.out`` (resuming an unfinished run of the same
    settings there); the pruning facts and top-1 before, one-shot and after fine-tuning. ``say(line)`` hears
    status lines (a resume)."""
    t_start = time.perf_counter()
    if src.pruning:
        raise UserError(f"{src.path} is already a pruned checkpoint; prune its dense original instead")
    out = Path(s.out).expanduser()
    if out.exists() and out.resolve() == Path(src.path).resolve():
        raise SettingError("out", "is the input checkpoint; choose another (nothing was overwritten)")
    # an existing file is judged by _resume (only this project's prune checkpoint of the same settings is resumed)
    fileio.check_output(out, kind="file", is_ours=Path.is_file, what="prune checkpoint", inputs=(src.path, s.data))
    graph = dependency.analyze(src.model, prune_stream=s.prune_stream)
    if not any(g.prunable for g in graph.groups):
        raise UserError(f"nothing prunable in {src.model_name}")
    settings = _settings(s, src)
    prev = _resume(out, src.model_name, settings, s)
    test = data.load_split(s.data, "test", download=s.download).head(s.limit_test)
    state = dict(prev.train_state) if prev else None
    done = bool(state) and int(state.get("epoch", 0)) >= s.finetune_epochs
    need_train = (prev is None and (s.criterion == "taylor" or s.bn_batches > 0 or s.reconstruct > 0)) or (
        s.finetune_epochs > 0 and not done)
    train = data.load_split(s.data, "train", download=s.download).head(s.limit_train) if need_train else None

    def save(model, record, metrics, train_state) -> None:
        train_state = dict(train_state, verb=VERB, finetune=s.mode)
        checkpoint.save_checkpoint(out, src.model_name, model, src.normalize, pruning=record, metrics=metrics,
                                   train_state=train_state)

    if prev is None:
        model, record, metrics, masks = _prune_now(src, s, graph, settings, train, test, progress, say)
        state = {"epoch": 0, "epochs": s.finetune_epochs, "optimizer": None}
        save(model, record, metrics, state)
        done = s.finetune_epochs == 0
    else:
        model, record, metrics = prev.model, prev.pruning, dict(prev.metrics)
        masks = pruner.masks_from_record(record)
        pruner.apply_masks(model, graph, masks)
        if say:
            say(f"resuming {out} at fine-tuning epoch {state.get('epoch', 0)}/{s.finetune_epochs}")
    history: list[dict] = list(metrics.get("history") or [])
    if not done:
        _finetune(src, s, model, graph, masks, train, test, state, history,
                  lambda rec: save(model, record, metrics, rec), metrics)
    # the contract with the compiler: exactly the recorded channels are zero
    zeroed = pruner.zeroed_masks(model, graph)
    if any(not torch.equal(zeroed[k] | masks[k], masks[k]) for k in masks):
        raise RuntimeError("a removed channel is not zero after fine-tuning")
    return _result(src, s, out, record, metrics, history, t_start)


def _prune_now(src, s: PruneSettings, graph, settings: dict, train, test, progress: bool = True, say=None):
    """One-shot: importance, allocation, masks, then the least-squares refit or BN re-estimation;
    (model, record, metrics, masks)."""
    normalize = src.normalize
    top1_before = round(top1(src.model, test, normalize, desc="eval dense", progress=progress), 2)
    model = copy.deepcopy(src.model)
    batches = None
    if s.criterion == "taylor":
        batches = _batches(train, normalize, 64, s.taylor_batches, s.seed, augment=False)
    scores = importance.compute(s.criterion, model, graph, batches)
    result = pruner.prune(model, graph, scores, s.flops_reduction, s.round_to, s.floor)
    masks = result.masks
    if s.reconstruct:  # refits to the dense outputs, so the dense BN statistics stay (measured better)
        _reconstruct(model, src.model, graph, masks, train, normalize, s.reconstruct, s.seed, say, progress)
    elif s.bn_batches:
        small = pruner.shrink(model, graph, masks)
        pruner.recalibrate_bn(small, (x for x, _ in _batches(train, normalize, 128, s.bn_batches,
                                                             s.seed + 1, augment=True)))
        pruner.expand_into(model, small, graph, masks)
    top1_oneshot = round(top1(pruner.shrink(model, graph, masks), test, normalize, desc="eval pruned",
                              progress=progress), 2)
    record = pruner.make_record(
        graph, masks, **settings,
        flops_reduction=round(result.flops_reduction, 6),
        flops_dense=result.flops_dense, flops_pruned=result.flops_pruned,
        params_dense=result.params_dense, params_pruned=result.params_pruned,
        bn_batches=0 if s.reconstruct else int(s.bn_batches), source=str(src.path))
    metrics = {"top1_before": top1_before, "top1_oneshot": top1_oneshot, "top1": top1_oneshot,
               "epochs": 0, "history": [], **_provenance(s)}
    return model, record, metrics, masks


def _reconstruct(model, dense, graph, masks, train: data.Split, normalize: str, images: int, seed: int,
                 say=None, progress: bool = True) -> None:
    """Least-squares refit of the pruned model's conv2d layers to the dense outputs (see prune/reconstruct.py)."""
    small = pruner.shrink(model, graph, masks)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 2))[:images]
    x = data.normalize(train.images[pick], normalize).to(next(small.parameters()).dtype)
    out_index = {name: keep.nonzero().flatten() for name, keep in masks.items()}
    fits = reconstruct.reconstruct(small, dense, out_index, x, seed=seed, progress=progress)
    pruner.expand_into(model, small, graph, masks)
    if fits and say:
        before = sum(f.error_before for f in fits) / len(fits)
        after = sum(f.error_after for f in fits) / len(fits)
        say(f"least-squares refit of {len(fits)} conv2d layers on {len(x)} images: mean relative error "
            f"{before:.3f} -> {after:.3f}")


def _finetune(src, s: PruneSettings, model, graph, masks, train, test, state, history: list, save,
              metrics: dict) -> None:
    """Fine-tune (the shrunk copy, or the masked dense model), saving after every epoch."""
    train_mod = _train()
    cfg = train_mod.FitConfig(epochs=s.finetune_epochs, lr=s.lr, batch_size=s.batch_size,
                              weight_decay=s.weight_decay, normalize=src.normalize, seed=s.seed,
                              channels_last=s.channels_last, bf16=train_mod.bf16_default(s.bf16),
                              compile=s.compile)
    teacher = src.model if s.distill else None
    fit_state = state if state and state.get("optimizer") is not None else None
    if s.finetune_masked:
        trained, after_step = model, pruner.MaskKeeper(model, graph, masks)
    else:
        trained, after_step = pruner.shrink(model, graph, masks), None

    def on_epoch(rec: dict) -> None:
        if trained is not model:
            pruner.expand_into(model, trained, graph, masks)
        history.append({k: v for k, v in rec.items() if k != "train_state"})
        metrics.update(top1=rec["top1"], epochs=rec["epoch"], history=history)
        save(rec["train_state"])

    train_mod.fit(trained, train, test, cfg, state=fit_state, after_step=after_step, teacher=teacher,
                  on_epoch=on_epoch, desc="finetune")
    model.to(memory_format=torch.contiguous_format)


def _result(src, s: PruneSettings, out: Path, record: dict, metrics: dict, history: list, t_start: float) -> dict:
    return {
        "model": src.model_name,
        "checkpoint": src.path,
        "out": str(out),
        "criterion": s.criterion,
        "flops_convention": pruner.FLOPS_CONVENTION,
        "flops_dense": record["flops_dense"],
        "flops_pruned": record["flops_pruned"],
        "flops_reduction_requested": record["flops_reduction_requested"],
        "flops_reduction": record["flops_reduction"],
        "params_dense": record["params_dense"],
        "params_pruned": record["params_pruned"],
        "params_reduction": round(1.0 - record["params_pruned"] / record["params_dense"], 6),
        "round_to": record["round_to"],
        "top1_before": metrics.get("top1_before"),
        "top1_oneshot": metrics.get("top1_oneshot"),
        "top1_after": metrics.get("top1"),
        "finetune_epochs": int(metrics.get("epochs") or 0),
        "seconds_per_epoch": [h.get("seconds") for h in history],
        "seconds": round(time.perf_counter() - t_start, 1),
        "stages": stage_summary(record),
    }


def _provenance(s: PruneSettings) -> dict:
    """What the model card of this checkpoint will say made it: the command, the device, torch."""
    return {"command": s.command, "device": _train().device_name("cpu"), "torch": str(torch.__version__),
            "distill": bool(s.distill), "bf16": _train().bf16_default(s.bf16), "compile": bool(s.compile)}


def _train():
    from compiler import train

    return train
