"""``train``: SGD with momentum, one-cycle (warm-up then cosine) learning rate, random-crop(4) + flip.

The loop (:func:`fit`) is shared with pruning's fine-tuning: it takes a hook run after every optimizer step
(pruning re-applies its masks there) and an optional teacher for distillation. A checkpoint is written after
every epoch with the optimizer and schedule state, so a stopped run resumes where it was.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from compiler import checkpoint, console, data, fileio, models
from compiler.errors import SettingError, UserError
from compiler.evaluate import top1


@dataclass
class FitConfig:
    epochs: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    warmup_fraction: float = 0.15
    normalize: str = data.DEFAULT_NORMALIZATION
    channels_last: bool = True
    bf16: bool = False
    compile: bool = False
    device: str = "cpu"
    distill_temperature: float = 4.0
    distill_alpha: float = 0.9
    seed: int = 0


def one_cycle_lr(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up from peak/10 to peak, then cosine down to 0."""
    warm = max(1, int(total * warmup_fraction))
    if step < warm:
        return peak * (0.1 + 0.9 * step / warm)
    t = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def fit(
    model: torch.nn.Module,
    train: data.Split,
    test: data.Split | None,
    cfg: FitConfig,
    state: dict | None = None,
    after_step: Callable[[], None] | None = None,
    teacher: torch.nn.Module | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    desc: str = "train",
) -> dict:
    """Train ``model`` in place for ``cfg.epochs`` epochs, resuming from ``state`` (as returned in epoch records).

    ``on_epoch`` receives ``{"epoch", "train_state", "top1", "loss", "seconds"}`` after each epoch (for saving).
    Returns the last epoch's record.
    """
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    if teacher is not None:
        teacher.eval().to(device=device, memory_format=memory_format)
    forward = torch.compile(model) if cfg.compile else model  # parameters and state stay on ``model``
    loop = _Loop(model, forward, _optimizer(model, cfg), cfg, device, memory_format, teacher, after_step,
                 torch.Generator().manual_seed(cfg.seed))
    start_epoch = 0
    if state:
        loop.opt.load_state_dict(state["optimizer"])  # moves its momentum buffers to the parameters' device
        start_epoch = int(state["epoch"])
    record: dict = {"epoch": start_epoch}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        loss = loop.run_epoch(train, epoch, desc)
        record = loop.end_epoch(test, epoch, loss, time.perf_counter() - t0, desc)
        if on_epoch is not None:
            on_epoch(record)
    model.to(device="cpu", memory_format=torch.contiguous_format)
    if teacher is not None:
        teacher.to(device="cpu")
    return record


def _optimizer(model: torch.nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    """Nesterov SGD; weight decay on the weights (ndim > 1), none on biases and BN parameters."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
    )


@dataclass
class _Loop:
    """What every step of one :func:`fit` uses: the model, its optimizer, the settings, the seeded generator."""

    model: torch.nn.Module
    forward: Callable  # the model, or its torch.compile'd version
    opt: torch.optim.Optimizer
    cfg: FitConfig
    device: torch.device
    memory_format: torch.memory_format
    teacher: torch.nn.Module | None
    after_step: Callable[[], None] | None
    gen: torch.Generator

    def run_epoch(self, train: data.Split, epoch: int, desc: str) -> float:
        """One epoch over ``train`` in an order seeded by the epoch (a resumed run repeats it); the mean loss."""
        cfg = self.cfg
        self.gen.manual_seed(cfg.seed * 1000 + epoch)
        self.model.train()
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        order = torch.randperm(len(train), generator=self.gen)
        bar = console.progress(range(steps_per_epoch), desc=f"{desc} {epoch + 1}/{cfg.epochs}", unit="step")
        loss_sum, seen = 0.0, 0
        for i in bar:
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            for group in self.opt.param_groups:
                group["lr"] = one_cycle_lr(epoch * steps_per_epoch + i, total, cfg.lr, cfg.warmup_fraction)
            loss_sum += self.step(train, idx) * len(idx)
            seen += len(idx)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        return loss_sum / max(seen, 1)

    def step(self, train: data.Split, idx: torch.Tensor) -> float:
        """One optimizer step on the images ``idx`` (random crop + flip); the batch's loss."""
        crops = data.random_crop_flip(train.images[idx], generator=self.gen).to(self.device, non_blocking=True)
        x = data.normalize(crops, self.cfg.normalize).contiguous(memory_format=self.memory_format)
        y = train.labels[idx].to(self.device, non_blocking=True)
        loss = self.loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.after_step is not None:
            self.after_step()
        return loss.item()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, mixed with the teacher's softened logits (distillation) when there is a teacher."""
        cfg = self.cfg
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16
                    else contextlib.nullcontext())
        with autocast:
            logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), y)
            if self.teacher is not None:
                with torch.no_grad():
                    soft = self.teacher(x).float()
                t = cfg.distill_temperature
                kd = F.kl_div(F.log_softmax(logits.float() / t, 1), F.softmax(soft / t, 1),
                              reduction="batchmean") * t * t
                loss = cfg.distill_alpha * kd + (1 - cfg.distill_alpha) * loss
        return loss

    def end_epoch(self, test: data.Split | None, epoch: int, loss: float, seconds: float, desc: str) -> dict:
        """Top-1 on ``test`` (when given), a line on the console, and the epoch's record (with the state to
        resume from)."""
        cfg = self.cfg
        self.model.eval()
        acc = top1(self.model, test, cfg.normalize) if test is not None else None
        record = {
            "epoch": epoch + 1,
            "loss": round(loss, 4),
            "top1": None if acc is None else round(acc, 2),
            "seconds": round(seconds, 1),
            "train_state": {"epoch": epoch + 1, "epochs": cfg.epochs, "optimizer": self.opt.state_dict()},
        }
        console.line(
            f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}"
            + (f", top-1 {acc:.2f}%" if acc is not None else "") + f", {seconds:.0f} s"
        )
        return record


def bf16_default(requested: bool | None, device: str = "cpu") -> bool:
    """bf16 autocast unless asked otherwise, where the device computes bf16 natively (measured on CPU: see
    benchmarks/train_speed.md)."""
    if requested is not None:
        return requested
    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def device_name(device: str) -> str:
    """What trained it, for the model card: the GPU's name, or the CPU's model and core count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = console.cpu_name()
    return f"{cpu}, {os.cpu_count()} cores"


def pick_device(requested: str) -> str:
    """``auto``: the first CUDA GPU when there is one, else the CPU; ``cuda`` without a GPU is an error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("device", f"{requested}: this machine has no CUDA GPU that torch can use")
    return requested


@dataclass(frozen=True)
class TrainSettings:
    """What ``train`` trains, where it writes, and how the steps run; validated when made."""

    model: str
    epochs: int
    out: str | Path
    normalize: str = data.DEFAULT_NORMALIZATION  # before the field ``data``, which hides the module below it
    data: str | Path | None = None
    download: bool = False
    lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    limit_train: int | None = None
    limit_test: int | None = None
    seed: int = 0
    bf16: bool | None = None  # default: where the device computes bf16 natively
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"  # auto: a CUDA GPU when torch sees one, else the CPU
    command: str | None = None  # what the checkpoint's metrics record as the command

    def __post_init__(self):
        object.__setattr__(self, "model", models.check_name(self.model))
        if self.epochs <= 0:
            raise SettingError("epochs", "must be positive")


def train(s: TrainSettings, *, say: Callable[[str], None] = print) -> dict:
    """Train ``s.model`` from scratch into the checkpoint ``s.out``, written after every epoch; when ``s.out`` is
    this project's unfinished training checkpoint of the same model, training resumes from it. ``{"model", "out",
    "epochs", "top1", "seconds", "seconds_per_epoch"}``."""
    name, out = s.model, Path(s.out)
    # an existing file is judged below (only this project's unfinished training checkpoint is resumed)
    fileio.check_output(out, kind="file", is_ours=Path.is_file, what="checkpoint", inputs=(s.data,))
    model, prev = _resumable(out, name)
    state = prev.train_state if prev else None
    if prev is not None:
        say(f"resuming {out} at epoch {state['epoch']}/{s.epochs}")
    train_split = data.load_split(s.data, "train", download=s.download).head(s.limit_train)
    test = data.load_split(s.data, "test").head(s.limit_test)
    device = pick_device(s.device)
    cfg = FitConfig(epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, weight_decay=s.weight_decay,
                    normalize=s.normalize, channels_last=s.channels_last, bf16=bf16_default(s.bf16, device),
                    compile=s.compile, seed=s.seed, device=device)
    history: list[dict] = list(prev.metrics.get("history") or []) if prev else []
    t_start = time.perf_counter()

    provenance = {"command": s.command, "device": device_name(device), "torch": str(torch.__version__)}
    if prev and prev.metrics.get("command"):
        provenance["command"] = prev.metrics["command"]  # the run's first command; resumes repeat it

    def save(record: dict) -> None:
        history.append({k: v for k, v in record.items() if k != "train_state"})
        metrics = {"top1": record["top1"], "epochs": record["epoch"], "history": history, **provenance}
        checkpoint.save_checkpoint(out, name, model, s.normalize, metrics=metrics,
                                   train_state=record["train_state"])

    if state and state["epoch"] >= s.epochs:
        record = {"epoch": state["epoch"], "top1": history[-1]["top1"] if history else None}
    else:
        record = fit(model, train_split, test, cfg, state=state, on_epoch=save)
    return {
        "model": name,
        "out": str(out),
        "epochs": record["epoch"],
        "top1": record.get("top1"),
        "seconds": round(time.perf_counter() - t_start, 1),
        "seconds_per_epoch": [h["seconds"] for h in history],
    }


def _resumable(out: Path, name: str):
    """``(model, previous checkpoint or None)``: a new ``name`` model, or the one in ``out`` when ``out`` is this
    project's unfinished training checkpoint of ``name`` (anything else there is refused)."""
    if not out.exists():
        return models.build_model(name), None
    refuse = (f"{out} exists and is not a resumable training checkpoint of this project; choose another file "
              "(nothing was overwritten)")
    try:
        prev = checkpoint.load_checkpoint(out, None)
    except UserError as e:
        raise SettingError("out", f"{refuse} ({e})") from None
    if prev.train_state is None or prev.train_state.get("verb") == "prune":
        raise SettingError("out", refuse)
    if prev.model_name != name:
        raise UserError(f"{out} is a {prev.model_name} training checkpoint, not {name}")
    return prev.model, prev
