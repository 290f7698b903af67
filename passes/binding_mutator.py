"""A Relax expression mutator that knows the binding it is inside, so calls can be rewritten by their bound var."""

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
