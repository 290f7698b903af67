"""``prune``: the verb. Flags -> :class:`compiler.prune.job.PruneSettings`, one :func:`compiler.prune.job.prune`,
and its tables (see :mod:`compiler.prune.job` for what a prune job does)."""

from __future__ import annotations

from compiler import cli, console
from compiler.prune import importance
from compiler.prune.job import PruneSettings, prune


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
                        "this many training images (channel-pruning / ThiNet style; 0: off); replaces the BN "
                        "re-estimation")
    cli.add_speed_args(p)
    cli.add_training_args(p, lr=0.02, lr_help="peak learning rate of the one-cycle fine-tuning")
    cli.add_json_arg(p)


def settings_from(args) -> PruneSettings:
    return PruneSettings(
        flops_reduction=args.flops_reduction, out=args.out, finetune_epochs=args.finetune_epochs, data=args.data,
        criterion=args.criterion, round_to=args.round_to, floor=args.floor, prune_stream=args.prune_stream,
        distill=args.distill, finetune_masked=args.finetune_masked, taylor_batches=args.taylor_batches,
        bn_batches=args.bn_batches, reconstruct=args.reconstruct, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
        limit_train=args.limit_train, limit_test=args.limit_test, seed=args.seed, bf16=args.bf16,
        channels_last=args.channels_last, compile=args.compile, download=args.download,
        command=getattr(args, "_command", None))


def run(args) -> dict:
    from compiler import zoo

    settings = settings_from(args)
    src = zoo.load(args.model, args.checkpoint, args.normalize)
    result = prune(src, settings, say=print)
    render(result)
    return result


def render(result: dict) -> None:
    from compiler.prune import pruner

    print(console.table([{
        "model": result["model"], "criterion": result["criterion"],
        "MACs dense": result["flops_dense"], "MACs pruned": result["flops_pruned"],
        "FLOPs cut %": round(100 * result["flops_reduction"], 2),
        "params dense": result["params_dense"], "params pruned": result["params_pruned"],
        "top1 before": result["top1_before"], "top1 one-shot": result["top1_oneshot"],
        "top1 after": result["top1_after"], "epochs": result["finetune_epochs"],
    }]))
    print()
    print(console.table(result["stages"], title="kept channels per stage"))
    print(f"(FLOPs counted as {pruner.FLOPS_CONVENTION}; checkpoint: {result['out']})")
