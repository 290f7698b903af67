"""Structured pruning: dependency groups, masks = shrunk copy, FLOPs targets, masks through training, the verb."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from compiler import data
from compiler.checkpoint import load_checkpoint, save_checkpoint
from compiler.errors import UserError
from compiler.models import build_model
from compiler.prune import dependency, importance, pruner
from compiler.train import FitConfig, fit
from helpers import assert_user_error, cli, run_cli


def randomized(name: str, seed: int = 0) -> nn.Module:
    """A model with random weights and non-trivial BN statistics and affine parameters, in float64, eval mode."""
    torch.manual_seed(seed)
    model = build_model(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.3, 0.8)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.2, 0.2)
    return model.double().eval()


def random_scores(graph, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.size, generator=gen, dtype=torch.float64) for g in graph.groups}


def output_zero_channels(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Module name -> bool per output channel: exactly zero for every input and position."""
    outs, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: outs.__setitem__(n, o.transpose(0, 1).flatten(1).eq(0).all(1))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


CASES = [("resnet20", False), ("resnet20", True), ("resnet56", False), ("resnet56", True),
         ("resnet110", True), ("googlenet", False)]


@pytest.mark.parametrize("name,stream", CASES)
def test_masked_model_equals_shrunk_copy_and_groups_are_pruned_together(name, stream):
    model = randomized(name)
    dense = copy.deepcopy(model)
    graph = dependency.analyze(model, prune_stream=stream)
    kept = pruner.allocate(graph, random_scores(graph), pruner.mac_units(model, graph), 0.5, round_to=8, floor=0.1)
    masks = pruner.masks_from_kept(graph, kept)
    pruner.apply_masks(model, graph, masks)
    small = pruner.shrink(model, graph, masks)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y_masked, y_small, y_dense = model(x), small(x), dense(x)
    scale = y_masked.abs().max().item()
    assert (y_masked - y_small).abs().max().item() <= 1e-4 * max(1.0, scale)
    assert (y_masked - y_dense).abs().max().item() > 1e-3 * max(1.0, scale)  # something was really removed
    # the small copy has physically fewer channels, as recorded
    for conv, mask in masks.items():
        assert small.get_submodule(conv).out_channels == int(mask.sum())
    # what is zero in the weights is exactly the masks, i.e. every coupled member got the group's zeroed set
    read = pruner.zeroed_masks(model, graph)
    assert all(torch.equal(read[k], masks[k]) for k in masks)
    if name.startswith("resnet"):
        stages = [getattr(model, f"layer{s}") for s in (1, 2, 3)]
        # every block output of a stage (and the stem for stage 1) has the same removed channels
        for s, stage in enumerate(stages, start=1):
            members = [f"layer{s}.{i}.conv2" for i in range(len(stage))] + (["conv1"] if s == 1 else [])
            assert all(torch.equal(masks[m], masks[members[0]]) for m in members)
        # option-A: channel j of stage s-1 is removed iff channel j + pad of stage s is
        for s in (2, 3):
            pad = stages[s - 1][0].shortcut.pad
            prev, cur = masks[f"layer{s - 1}.0.conv2"], masks[f"layer{s}.0.conv2"]
            assert torch.equal(cur[pad:pad + len(prev)], prev)
        stream_pruned = not all(bool(masks[f"layer{s}.0.conv2"].all()) for s in (1, 2, 3))
        assert stream_pruned == stream
        # and those channels are exactly zero at every block output (after the add and ReLU)
        blocks = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(len(stages[s - 1]))]
        zero = output_zero_channels(model, blocks, x)
        for b in blocks:
            removed = ~masks[f"{b}.conv2"]
            assert bool(zero[b][removed].all())
        if not stream:
            assert any(len(kept[g.name]) < g.size for g in graph.groups if g.kind == "inner")
    else:
        # each concat is consumed as the concatenation of its four producers' kept channels
        incs = [n for n, m in model.named_children() if hasattr(m, "b4")]
        zero = output_zero_channels(model, incs, x)
        for prev, nxt in zip(incs, incs[1:] + ["linear"]):
            producers = [f"{prev}.b1.0", f"{prev}.b2.3", f"{prev}.b3.6", f"{prev}.b4.1"]
            concat_mask = torch.cat([masks[p] for p in producers])
            assert bool(zero[prev][~concat_mask].all())
            consumers = [f"{nxt}.b1.0", f"{nxt}.b2.0", f"{nxt}.b3.0", f"{nxt}.b4.1"] if nxt != "linear" else [nxt]
            for c in consumers:
                layer = small.get_submodule(c)
                assert getattr(layer, "in_channels", getattr(layer, "in_features", None)) == int(concat_mask.sum())
                assert torch.equal(pruner.input_index(graph, c, masks), concat_mask.nonzero().flatten())


@pytest.mark.parametrize("name,target", [("resnet56", 0.4), ("resnet56", 0.6), ("googlenet", 0.6)])
def test_flops_target_is_met_with_rounded_floored_widths(name, target):
    model = build_model(name).eval()
    graph = dependency.analyze(model)
    result = pruner.prune(model, graph, importance.l1_norm(model, graph), target, round_to=8, floor=0.1)
    assert target <= result.flops_reduction <= target + 0.03
    for g in graph.groups:
        for m in g.members:
            k = int(result.masks[m.conv].sum())
            assert k == m.channels or k % 8 == 0, (m.conv, k)
            assert k >= math.ceil(0.1 * m.channels)
    # FLOPs and params are counted on the physically shrunk copy
    small = pruner.shrink(model, graph, result.masks)
    assert pruner.count(small) == (result.flops_pruned, result.params_pruned)
    assert result.params_pruned < result.params_dense


def test_flops_are_macs_and_round_to_1():
    model = build_model("resnet56").eval()
    assert pruner.count(model) == (125_485_696, 853_018)  # ResNet56's usual "125M FLOPs" are MACs
    graph = dependency.analyze(model)
    result = pruner.prune(model, graph, importance.bn_scale(model, graph), 0.5, round_to=1, floor=0.1)
    assert 0.5 <= result.flops_reduction <= 0.505
    widths = [int(m.sum()) for m in result.masks.values()]
    assert any(w % 8 for w in widths)  # not rounded


def test_allocation_errors():
    model = build_model("resnet20").eval()
    graph = dependency.analyze(model)
    scores, units = importance.l1_norm(model, graph), pruner.mac_units(model, graph)
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(UserError, match="^flops_reduction must be a fraction"):
            pruner.allocate(graph, scores, units, bad)
    with pytest.raises(UserError, match="nothing prunable"):
        pruner.allocate(graph, scores, units, 0.5, round_to=128)
    with pytest.raises(UserError, match="at most"):
        pruner.allocate(graph, scores, units, 0.5, round_to=8, floor=0.45)


def test_importance_aggregates_coupled_members(tiny_cifar):
    model = randomized("resnet20").float()
    graph = dependency.analyze(model, prune_stream=True)
    raw = importance.l1_norm(model, graph, normalize=False)
    stream = graph.group("stream")
    want = torch.zeros(stream.size, dtype=torch.float64)
    for m in stream.members:
        want[m.offset:m.offset + m.channels] += model.get_submodule(m.conv).weight.abs().sum((1, 2, 3)).double()
    assert torch.allclose(raw["stream"], want)
    assert len(stream.members) == 1 + 9  # stem + every block's conv2
    # taylor: a channel whose BN output is constant 0 cannot change the loss
    with torch.no_grad():
        model.layer2[1].bn1.weight[3] = 0
        model.layer2[1].bn1.bias[3] = 0
    split = data.load_split(tiny_cifar, "train")
    batches = [(data.normalize(split.images[:16]), split.labels[:16])]
    tay = importance.taylor(model, graph, batches)
    assert tay["layer2.1.inner"][3] == 0 and tay["layer2.1.inner"].sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_masks_survive_optimizer_steps_through_after_step(tiny_cifar):
    train, test = data.load_split(tiny_cifar, "train"), data.load_split(tiny_cifar, "test")
    cfg = FitConfig(epochs=1, lr=0.5, batch_size=16, channels_last=False)

    def pruned_model():
        model = randomized("resnet20").float()
        graph = dependency.analyze(model, prune_stream=True)
        kept = pruner.allocate(graph, random_scores(graph), pruner.mac_units(model, graph), 0.5)
        masks = pruner.masks_from_kept(graph, kept)
        pruner.apply_masks(model, graph, masks)
        # revive the removed channels' BN shift: with filter, gamma and beta all 0 a removed channel is a fixed
        # point of SGD here (ReLU'(0) = 0), so this is what makes the hook's work visible
        with torch.no_grad():
            for g in graph.groups:
                for m in g.members:
                    model.get_submodule(m.bn).bias[~masks[m.conv]] = 0.5
        return model, graph, masks

    model, graph, masks = pruned_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, train, test, cfg, after_step=pruner.MaskKeeper(model, graph, masks))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it did train
    read = pruner.zeroed_masks(model, graph)
    assert all(torch.equal(read[k], masks[k]) for k in masks)
    for g in graph.groups:
        for m in g.members:
            bn = model.get_submodule(m.bn)
            assert bool(bn.running_mean[~masks[m.conv]].eq(0).all())
    # eval mode: the removed channels are exactly zero after BN (and so after ReLU)
    x = data.normalize(test.images[:4])
    zero = output_zero_channels(model, [m.bn for g in graph.groups for m in g.members], x)
    for g in graph.groups:
        for m in g.members:
            assert bool(zero[m.bn][~masks[m.conv]].all())
    # without the hook the same training leaves removed channels alive (so the checks above can fail)
    model2, graph2, masks2 = pruned_model()
    fit(model2, train, test, cfg)
    read2 = pruner.zeroed_masks(model2, graph2)
    assert any(not torch.equal(read2[k], masks2[k]) for k in masks2)


def test_shrunk_training_expands_back_into_the_dense_shape(tiny_cifar):
    model = randomized("resnet20").float()
    graph = dependency.analyze(model, prune_stream=True)  # exercises the asymmetric option-A pads too
    kept = pruner.allocate(graph, random_scores(graph), pruner.mac_units(model, graph), 0.6)
    masks = pruner.masks_from_kept(graph, kept)
    pruner.apply_masks(model, graph, masks)
    small = pruner.shrink(model, graph, masks)
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    split = data.load_split(tiny_cifar, "train")
    small.train()
    nn.functional.cross_entropy(small(data.normalize(split.images[:8])), split.labels[:8]).backward()
    opt.step()
    small.eval()
    pruner.expand_into(model, small, graph, masks)
    x = data.normalize(split.images[8:12])
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), small(x), atol=1e-4, rtol=1e-4)
    read = pruner.zeroed_masks(model, graph)
    assert all(torch.equal(read[k], masks[k]) for k in masks)


# ---------------------------------------------------------------- the verb

@pytest.fixture
def resnet20_ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r20.pt"
    save_checkpoint(path, "resnet20", build_model("resnet20"), "cifar")
    return path


def test_cli_bad_fraction_is_one_error_line_and_exit_2(tmp_path, tiny_cifar, resnet20_ckpt):
    out = tmp_path / "out.pt"
    r = cli("prune", "--checkpoint", resnet20_ckpt, "--data", tiny_cifar, "--flops-reduction", "1.5",
            "--finetune-epochs", "0", "--out", out)
    assert_user_error((r.returncode, r.stdout, r.stderr), "--flops-reduction")
    assert "Traceback" not in r.stderr and not out.exists()


def test_cli_rejects_bad_input_and_never_overwrites(tmp_path, tiny_cifar, resnet20_ckpt, capsys):
    out = tmp_path / "out.pt"
    base = ["prune", "--checkpoint", resnet20_ckpt, "--data", tiny_cifar, "--finetune-epochs", "0"]
    for bad in ("0", "1", "-0.1"):
        assert_user_error(run_cli(capsys, *base, "--flops-reduction", bad, "--out", out), "--flops-reduction")
    assert_user_error(run_cli(capsys, *base, "--model", "resnet56", "--flops-reduction", "0.5", "--out", out),
                      "resnet20")
    assert_user_error(run_cli(capsys, *base, "--flops-reduction", "0.5", "--round-to", "128", "--out", out),
                      "nothing prunable")
    assert not out.exists()
    # a file that is not a prune checkpoint of this project is never overwritten
    other = tmp_path / "other.pt"
    other.write_bytes(b"not a checkpoint")
    assert_user_error(run_cli(capsys, *base, "--flops-reduction", "0.5", "--out", other),
                      "not a resumable prune checkpoint")
    assert other.read_bytes() == b"not a checkpoint"
    assert_user_error(run_cli(capsys, *base, "--flops-reduction", "0.5", "--out", resnet20_ckpt), "--out")
    assert load_checkpoint(resnet20_ckpt).pruning is None


def test_cli_end_to_end_resumes_and_records_the_zeros(tmp_path, tiny_cifar, resnet20_ckpt, capsys):
    out = tmp_path / "pruned.pt"
    args = ["prune", "--checkpoint", resnet20_ckpt, "--data", tiny_cifar, "--flops-reduction", "0.4",
            "--out", out, "--criterion", "taylor", "--taylor-batches", "1", "--bn-batches", "1", "--batch-size", "32", "--json"]
    rc, stdout, err = run_cli(capsys, *args, "--finetune-epochs", "0")
    assert rc == 0, err
    first = json.loads(stdout.strip().splitlines()[-1])
    for key in ("flops_dense", "flops_pruned", "params_dense", "params_pruned", "flops_reduction",
                "top1_before", "top1_after"):
        assert key in first
    assert first["flops_reduction"] >= 0.4 and first["flops_pruned"] < first["flops_dense"]
    assert "kept channels per stage" in stdout
    # same output: resumes from the pruned checkpoint and fine-tunes it (masked mode, with distillation)
    rc, stdout, err = run_cli(capsys, *args, "--finetune-epochs", "1", "--limit-train", "48", "--finetune-masked",
                              "--distill")
    assert rc == 0, err
    assert "resuming" in stdout
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["finetune_epochs"] == 1 and res["flops_pruned"] == first["flops_pruned"]
    # different settings on the same output: refused, file kept
    assert_user_error(run_cli(capsys, *args, "--finetune-epochs", "1", "--criterion", "l1"), "criterion")

    ck = load_checkpoint(out)
    dense = build_model("resnet20").state_dict()
    assert {k: v.shape for k, v in ck.model.state_dict().items()} == {k: v.shape for k, v in dense.items()}
    graph = dependency.analyze(ck.model)
    recorded = pruner.masks_from_record(ck.pruning)
    read = pruner.zeroed_masks(ck.model, graph)
    assert recorded.keys() == read.keys()
    assert all(torch.equal(read[k], recorded[k]) for k in recorded)
    assert any(not m.all() for m in recorded.values())
    assert ck.pruning["criterion"] == "taylor" and ck.pruning["round_to"] == 8
    assert ck.metrics["epochs"] == 1 and ck.train_state["finetune"] == "masked"

    # default mode: fine-tune the shrunk copy, written back dense-shaped
    out2 = tmp_path / "pruned2.pt"
    rc, stdout, err = run_cli(capsys, "prune", "--checkpoint", resnet20_ckpt, "--data", tiny_cifar,
                              "--flops-reduction", "0.5", "--criterion", "l1", "--round-to", "1", "--bn-batches", "0",
                              "--finetune-epochs", "1", "--limit-train", "48", "--batch-size", "16", "--out", out2,
                              "--json")
    assert rc == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    ck = load_checkpoint(out2)
    graph = dependency.analyze(ck.model)
    recorded = pruner.masks_from_record(ck.pruning)
    read = pruner.zeroed_masks(ck.model, graph)
    assert all(torch.equal(read[k], recorded[k]) for k in recorded)
    small = pruner.shrink(ck.model, graph, recorded)
    assert pruner.count(small) == (res["flops_pruned"], res["params_pruned"])
    assert ck.train_state["finetune"] == "shrunk" and ck.train_state["epoch"] == 1


# ---------------------------------------------------------------- least-squares reconstruction

def _logit_error(small: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = dense(x)
        return ((small(x) - ref).pow(2).sum() / ref.pow(2).sum()).item()


def test_reconstruct_brings_the_pruned_outputs_back_towards_the_dense_ones():
    from compiler.prune import reconstruct

    dense = randomized("resnet20", seed=3)
    graph = dependency.analyze(dense)
    model = copy.deepcopy(dense)
    masks = pruner.prune(model, graph, random_scores(graph, 1), 0.5, 8, 0.1).masks
    small = pruner.shrink(model, graph, masks)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randn(64, 3, 32, 32, generator=gen, dtype=torch.float64)
    unseen = torch.randn(16, 3, 32, 32, generator=gen, dtype=torch.float64)
    before = _logit_error(small, dense, unseen)
    out_index = {k: v.nonzero().flatten() for k, v in masks.items()}
    fits = reconstruct.reconstruct(small, dense, out_index, calib, positions_per_image=16, batch=32)
    after = _logit_error(small, dense, unseen)
    assert after < 0.5 * before, (before, after)  # measured on images the fit never saw
    assert all(f.error_after <= f.error_before for f in fits)
    assert sum(f.error_after < 0.9 * f.error_before for f in fits) >= len(fits) // 4
    # the refitted model is still the pruned shape: expanding it back keeps exactly the recorded zeros
    pruner.expand_into(model, small, graph, masks)
    read = pruner.zeroed_masks(model, graph)
    assert all(torch.equal(read[k] | masks[k], masks[k]) for k in masks)


def test_reconstruct_leaves_an_unpruned_model_as_it_was():
    from compiler.prune import reconstruct

    dense = randomized("resnet20", seed=4)
    small = copy.deepcopy(dense)
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reconstruct.reconstruct(small, dense, {}, calib, positions_per_image=8)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), dense.state_dict().values()))


def test_cli_reconstruct_replaces_bn_reestimation_and_is_a_resume_setting(tmp_path, tiny_cifar, resnet20_ckpt,
                                                                          capsys):
    out = tmp_path / "ls.pt"
    args = ["prune", "--checkpoint", resnet20_ckpt, "--data", tiny_cifar, "--flops-reduction", "0.5",
            "--finetune-epochs", "0", "--out", out]
    rc, stdout, err = run_cli(capsys, *args, "--reconstruct", "16")
    assert rc == 0, err
    assert "least-squares refit of" in stdout
    ck = load_checkpoint(out)
    assert ck.pruning["reconstruct_images"] == 16 and ck.pruning["bn_batches"] == 0
    assert_user_error(run_cli(capsys, *args, "--reconstruct", "-1"), "--reconstruct")
    assert_user_error(run_cli(capsys, *args, "--finetune-epochs", "1", "--reconstruct", "8"), "reconstruct_images")
