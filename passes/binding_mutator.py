"""A Relax expression mutator that knows the binding it is inside, so calls can be rewritten by their bound var;
and the loop that applies a call-site rewriter to every Relax function of a module."""

from __future__ import annotations

from tvm import relax
from tvm.relax.expr_functor import PyExprMutator


class BindingMutator(PyExprMutator):
    """Subclass it and decorate the subclass with ``@mutator``; in ``visit_call_`` ask :meth:`bound_var`."""

    def __init__(self, mod):
        super().__init__(mod)
        self.binding = None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        self.binding = binding
        try:
            super().visit_var_binding_(binding)
        finally:
            self.binding = None

    def bound_var(self, call) -> relax.Var | None:
        """The var ``call`` is bound to when it is the whole right-hand side of the current binding, else None."""
        b = self.binding
        return b.var if b is not None and call.same_as(b.value) else None


def rewrite_functions(mod, make_rewriter):
    """``mod`` with each Relax function rewritten by the ``PyExprMutator`` ``make_rewriter(mod, func)`` returns (None:
    the function stays), then dead code eliminated when a rewriter reports ``changed`` > 0; ``mod`` itself when none
    did. How a pass that rewrites call sites and adds PrimFuncs through the mutator's builder applies it."""
    changed = 0
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        rewriter = make_rewriter(mod, func)
        if rewriter is None:
            continue
        new = rewriter.visit_expr(func)
        mod = rewriter.builder_.get()
        mod[gv] = new
        changed += rewriter.changed
    return relax.transform.DeadCodeElimination()(mod) if changed else mod
