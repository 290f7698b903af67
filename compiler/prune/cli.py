"""``prune``: structured filter pruning to a FLOPs target, then fine-tuning (resumable, optional distillation).

Steps: dependency groups -> importance -> global allocation (rounded, floored) -> zero the removed channels ->
re-estimate BN statistics -> fine-tune -> a dense-shaped checkpoint with the pruning record.

Fine-tuning trains the physically shrunk copy by default (the removed channels do not exist, so they stay
removed, and a step costs what the pruned model costs) and writes it back into the dense-shaped model after every
epoch; ``--finetune-masked`` instead trains the dense-shaped model and re-applies the masks after every
optimizer step. Both compute the same function.

The output checkpoint is written right after pruning and after every fine-tuning epoch; running the same command
again resumes it. ``--out`` is never allowed to overwrite anything but this project's prune checkpoint.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from pathlib import Path

import torch

from compiler import checkpoint, cli, console, data, fileio
from compiler.errors import UserError
from compiler.evaluate import top1
from compiler.prune import dependency, importance, pruner, reconstruct

VERB = "prune"


def configure(p) -> None:
    cli.add_model_args(p)
    cli.add_data_args(p)
    p.add_argument("--flops-reduction", type=float, required=True, metavar="R",
                   help="fraction of the dense FLOPs to remove, in (0, 1): 0.6 removes 60%%")
    p.add_argument("--finetune-epochs", type=int, required=True, metavar="N", help="fine-tuning epochs (0: none)")
    p.add_argument("--out", required=True, metavar="PRUNED",
                   help="pruned checkpoint, written after pruning and after every epoch; if it is this project's "
                        "unfinished prune checkpoint of the same settings, the run resumes from it")
    p.add_argument("--criterion", choices=importance.CRITERIA, default="l1",
                   help="channel importance: l1 = filter L1 norm (Li et al. 2017; the default: with BN "
                        "re-estimation it measured best one-shot on ResNet56), bn = |BN gamma|, "
                        "taylor = first-order Taylor on --taylor-batches training batches")
    p.add_argument("--round-to", type=int, default=8, metavar="K",
                   help="kept channel counts are multiples of K (default 8; 1 turns rounding off)")
    p.add_argument("--floor", type=float, default=0.1,
                   help="every layer keeps at least this fraction of its channels (default 0.1)")
    p.add_argument("--prune-stream", action="store_true",
                   help="ResNet: also prune the residual stream (coupled across all blocks and stages); "
                        "by default only the blocks' inner channels are pruned")
    p.add_argument("--distill", action="store_true", help="fine-tune with distillation from the unpruned model")
    p.add_argument("--finetune-masked", action="store_true",
                   help="fine-tune the dense-shaped model with masks re-applied after every step "
                        "(slower; default: fine-tune the physically shrunk copy)")
    p.add_argument("--taylor-batches", type=int, default=16, metavar="B",
                   help="training batches of 64 for the taylor criterion")
    p.add_argument("--bn-batches", type=int, default=20, metavar="B",
                   help="training batches of 128 to re-estimate BN statistics after pruning (0: keep them)")
    p.add_argument("--reconstruct", type=int, default=0, metavar="IMAGES",
                   help="before fine-tuning, refit every conv2d by least squares to the dense model's output on "
                        "this many training images (channel-pruning / ThiNet style; 0: off); replaces the BN re-estimation")
    train_mod().add_speed_args(p)
    cli.add_training_args(p, lr=0.02, lr_help="peak learning rate of the one-cycle fine-tuning")
    cli.add_json_arg(p)


def _check_args(args) -> None:
    r = args.flops_reduction
    if not 0.0 < r < 1.0:
        raise UserError(f"--flops-reduction must be a fraction in (0, 1) (0.6 removes 60% of the FLOPs), got {r}")
    if args.finetune_epochs < 0:
        raise UserError("--finetune-epochs must be 0 or more")
    if args.round_to < 1:
        raise UserError("--round-to must be 1 or more")
    if not 0.0 <= args.floor < 1.0:
        raise UserError("--floor must be a fraction in [0, 1)")
    for flag in ("lr", "batch_size", "taylor_batches"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    if args.bn_batches < 0 or args.weight_decay < 0 or args.reconstruct < 0:
        raise UserError("--bn-batches, --reconstruct and --weight-decay must be 0 or more")
    for flag in ("limit_train", "limit_test"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive number of images")


def _settings(args, src: checkpoint.Checkpoint) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {
        "criterion": args.criterion,
        "flops_reduction_requested": float(args.flops_reduction),
        "round_to": int(args.round_to),
        "floor": float(args.floor),
        "prune_stream": bool(args.prune_stream),
        "reconstruct_images": int(args.reconstruct),
        "source_sha256": src.sha256,
    }


def _resume(out: Path, name: str, settings: dict, args) -> checkpoint.Checkpoint | None:
    if not out.exists():
        return None
    refuse = f"{out} exists and is not a resumable prune checkpoint of this project; choose another --out " \
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
        raise UserError(f"{out} is a {prev.model_name} prune checkpoint, not {name}; choose another --out")
    for key, want in settings.items():
        have = prev.pruning.get(key)
        if have != want:
            raise UserError(f"{out} was pruned with {key} = {have}, not {want}; "
                            "choose another --out or repeat the original settings")
    if int(state.get("epochs", -1)) != args.finetune_epochs and int(state.get("epoch", 0)) > 0:
        raise UserError(f"{out} is fine-tuning for {state.get('epochs')} epochs, not {args.finetune_epochs}: "
                        f"pass --finetune-epochs {state.get('epochs')} or choose another --out")
    if state.get("finetune") not in (None, _mode(args)) and int(state.get("epoch", 0)) > 0:
        raise UserError(f"{out} is fine-tuned in {state.get('finetune')} mode; "
                        f"{'add' if state.get('finetune') == 'masked' else 'drop'} --finetune-masked to resume it")
    return prev


def _reconstruct(model, dense, graph, masks, train: data.Split, normalize: str, images: int, seed: int) -> None:
    """Least-squares refit of the pruned model's conv2d layers to the dense outputs (see prune/reconstruct.py)."""
    small = pruner.shrink(model, graph, masks)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 2))[:images]
    x = data.normalize(train.images[pick], normalize).to(next(small.parameters()).dtype)
    out_index = {name: keep.nonzero().flatten() for name, keep in masks.items()}
    fits = reconstruct.reconstruct(small, dense, out_index, x, seed=seed)
    pruner.expand_into(model, small, graph, masks)
    if fits:
        mean = lambda key: sum(getattr(f, key) for f in fits) / len(fits)  # noqa: E731
        print(f"least-squares refit of {len(fits)} conv2d layers on {len(x)} images: mean relative error "
              f"{mean('error_before'):.3f} -> {mean('error_after'):.3f}")


def _mode(args) -> str:
    return "masked" if args.finetune_masked else "shrunk"


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


def run(args) -> dict:
    from compiler import zoo

    _check_args(args)
    t_start = time.perf_counter()
    src = zoo.load(args.model, args.checkpoint, args.normalize)
    name, normalize = src.model_name, src.normalize
    if src.pruning:
        raise UserError(f"{src.path} is already a pruned checkpoint; prune its dense original instead")
    out = Path(args.out).expanduser()
    if out.exists() and out.resolve() == Path(src.path).resolve():
        raise UserError("--out is the input checkpoint; choose another --out (nothing was overwritten)")
    # an existing file is judged by _resume (only this project's prune checkpoint of the same settings is resumed)
    fileio.check_output(out, kind="file", is_ours=Path.is_file, what="prune checkpoint", inputs=(src.path, args.data))
    graph = dependency.analyze(src.model, prune_stream=args.prune_stream)
    if not any(g.prunable for g in graph.groups):
        raise UserError(f"nothing prunable in {name}")
    settings = _settings(args, src)
    prev = _resume(out, name, settings, args)
    epochs = args.finetune_epochs
    test = data.load_split(args.data, "test", download=args.download).head(args.limit_test)
    state = dict(prev.train_state) if prev else None
    done = bool(state) and int(state.get("epoch", 0)) >= epochs
    need_train = ((prev is None and (args.criterion == "taylor" or args.bn_batches > 0 or args.reconstruct > 0))
                  or (epochs > 0 and not done))
    train = data.load_split(args.data, "train", download=args.download).head(args.limit_train) if need_train else None

    def save(model, record, metrics, train_state) -> None:
        train_state = dict(train_state, verb=VERB, finetune=_mode(args))
        checkpoint.save_checkpoint(out, name, model, normalize, pruning=record, metrics=metrics,
                                   train_state=train_state)

    if prev is None:
        top1_before = round(top1(src.model, test, normalize, desc="eval dense"), 2)
        model = copy.deepcopy(src.model)
        batches = None
        if args.criterion == "taylor":
            batches = _batches(train, normalize, 64, args.taylor_batches, args.seed, augment=False)
        scores = importance.compute(args.criterion, model, graph, batches)
        result = pruner.prune(model, graph, scores, args.flops_reduction, args.round_to, args.floor)
        masks = result.masks
        if args.reconstruct:  # refits to the dense outputs, so the dense BN statistics stay (measured better)
            _reconstruct(model, src.model, graph, masks, train, normalize, args.reconstruct, args.seed)
        elif args.bn_batches:
            small = pruner.shrink(model, graph, masks)
            pruner.recalibrate_bn(small, (x for x, _ in _batches(train, normalize, 128, args.bn_batches,
                                                                 args.seed + 1, augment=True)))
            pruner.expand_into(model, small, graph, masks)
        top1_oneshot = round(top1(pruner.shrink(model, graph, masks), test, normalize, desc="eval pruned"), 2)
        record = pruner.make_record(
            graph, masks, **settings,
            flops_reduction=round(result.flops_reduction, 6),
            flops_dense=result.flops_dense, flops_pruned=result.flops_pruned,
            params_dense=result.params_dense, params_pruned=result.params_pruned,
            bn_batches=0 if args.reconstruct else int(args.bn_batches), source=str(src.path))
        metrics = {"top1_before": top1_before, "top1_oneshot": top1_oneshot, "top1": top1_oneshot,
                   "epochs": 0, "history": [], **_provenance(args)}
        state = {"epoch": 0, "epochs": epochs, "optimizer": None}
        save(model, record, metrics, state)
        done = epochs == 0
    else:
        model, record, metrics = prev.model, prev.pruning, dict(prev.metrics)
        masks = pruner.masks_from_record(record)
        pruner.apply_masks(model, graph, masks)
        print(f"resuming {out} at fine-tuning epoch {state.get('epoch', 0)}/{epochs}")

    history: list[dict] = list(metrics.get("history") or [])
    if not done:
        cfg = train_mod().FitConfig(epochs=epochs, lr=args.lr, batch_size=args.batch_size,
                                    weight_decay=args.weight_decay, normalize=normalize, seed=args.seed,
                                    channels_last=args.channels_last, bf16=train_mod().bf16_default(args.bf16),
                                    compile=args.compile)
        teacher = src.model if args.distill else None
        fit_state = state if state and state.get("optimizer") is not None else None
        if args.finetune_masked:
            trained, after_step = model, pruner.MaskKeeper(model, graph, masks)
        else:
            trained, after_step = pruner.shrink(model, graph, masks), None

        def on_epoch(rec: dict) -> None:
            if trained is not model:
                pruner.expand_into(model, trained, graph, masks)
            history.append({k: v for k, v in rec.items() if k != "train_state"})
            metrics.update(top1=rec["top1"], epochs=rec["epoch"], history=history)
            save(model, record, metrics, rec["train_state"])

        train_mod().fit(trained, train, test, cfg, state=fit_state, after_step=after_step, teacher=teacher,
                        on_epoch=on_epoch, desc="finetune")
        model.to(memory_format=torch.contiguous_format)
    # the contract with the compiler: exactly the recorded channels are zero
    zeroed = pruner.zeroed_masks(model, graph)
    if any(not torch.equal(zeroed[k] | masks[k], masks[k]) for k in masks):
        raise RuntimeError("a removed channel is not zero after fine-tuning")

    result = {
        "model": name,
        "checkpoint": src.path,
        "out": str(out),
        "criterion": args.criterion,
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
    print(console.table([{
        "model": name, "criterion": args.criterion,
        "MACs dense": record["flops_dense"], "MACs pruned": record["flops_pruned"],
        "FLOPs cut %": round(100 * record["flops_reduction"], 2),
        "params dense": record["params_dense"], "params pruned": record["params_pruned"],
        "top1 before": result["top1_before"], "top1 one-shot": result["top1_oneshot"],
        "top1 after": result["top1_after"], "epochs": result["finetune_epochs"],
    }]))
    print()
    print(console.table(result["stages"], title="kept channels per stage"))
    print(f"(FLOPs counted as {pruner.FLOPS_CONVENTION}; checkpoint: {out})")
    return result


def _provenance(args) -> dict:
    """What the model card of this checkpoint will say made it: the command, the device, torch."""
    return {"command": getattr(args, "_command", None),
            "device": train_mod().device_name("cpu"), "torch": str(torch.__version__),
            "distill": bool(args.distill), "bf16": train_mod().bf16_default(args.bf16),
            "compile": bool(args.compile)}


def train_mod():
    from compiler import train

    return train
