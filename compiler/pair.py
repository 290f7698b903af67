"""A dense checkpoint and its pruned copy, as compare and report take them: loading (the shipped pruned model when
it was pruned from exactly the given dense one), the checks that each is what it is said to be, and the
physically shrunk model (removed channels deleted) the engines run."""

from __future__ import annotations

from compiler.errors import UserError


def load(model: str | None, checkpoint: str | None, pruned: str | None, normalize: str | None):
    """(dense Checkpoint, pruned Checkpoint or None) as the flags name them."""
    from compiler import zoo

    dense = check_dense(zoo.load(model, checkpoint, normalize))
    return dense, pruned_for(dense, pruned, normalize)


def pruned_for(dense, pruned: str | None, normalize: str | None, *, quiet: bool = False):
    """The ``--pruned`` checkpoint; without one, the shipped pruned model when it was pruned from exactly ``dense``
    (saying so in one line); else None."""
    import sys

    from compiler import zoo

    if pruned is None:
        shipped = zoo.shipped_pruned_for(dense)
        if shipped is None:
            return None
        if not quiet:
            print(f"no --pruned: using {zoo.describe(dense.model_name)}, pruned from this checkpoint",
                  file=sys.stderr)
        pruned = shipped
    return load_pruned(pruned, dense.model_name, normalize)


def check_dense(ck):
    """``ck`` itself, or a clear error when it is a pruned checkpoint given as the baseline."""
    from compiler import zoo

    if ck.pruning and zoo.is_shipped(ck):  # no --checkpoint: the shipped model is the pruned side, not a baseline
        base = (zoo.card(ck.model_name) or {}).get("base") or {}
        raise UserError(f"the shipped {ck.model_name} is pruned: give the dense checkpoint it was pruned from with "
                        f"--checkpoint ({base.get('file')}, sha256 {str(base.get('sha256'))[:12]}..., not shipped: "
                        f"see compiler/zoo/{ck.model_name}.md) and it is measured against the shipped one")
    if ck.pruning:
        raise UserError(f"{ck.path} is a pruned checkpoint; give its dense original as the baseline and it "
                        "as the pruned model")
    return ck


def load_pruned(path, model_name: str, normalize: str | None):
    """The ``--pruned`` checkpoint, or a clear error when it has no pruning record."""
    from compiler import checkpoint as ckpt_mod

    pr = ckpt_mod.load_checkpoint(path, model_name, normalize)
    if not pr.pruning:
        raise UserError(f"{path} is not a pruned checkpoint (no pruning record); the pruned model is the "
                        "output of `prune`")
    return pr


def shrunk(pr):
    """The physically smaller copy of a pruned checkpoint's model (removed channels deleted; same function)."""
    from compiler.prune import dependency, pruner

    graph = dependency.analyze(pr.model, prune_stream=bool(pr.pruning.get("prune_stream")))
    try:
        masks = pruner.masks_from_record(pr.pruning)
        return pruner.shrink(pr.model, graph, masks).eval()
    except (KeyError, ValueError) as e:
        raise UserError(f"{pr.path}: its pruning record does not fit {pr.model_name} ({e})") from None
