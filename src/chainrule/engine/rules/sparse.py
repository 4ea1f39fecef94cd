"""Sparse arrays (`jax.experimental.sparse`): the BCOO and BCSR primitives and
the older COO and CSR ones, differentiated through the implementation JAX
evaluates them with.

Each of these primitives is, in JAX, a Python function of `lax` operations
(gathers, scatter-adds, `dot_general`s, sorts, `nonzero` with a fixed size)
that XLA compiles in its place (`mlir.lower_fun` of the function named in
`_IMPLEMENTATIONS`). chainrule evaluates the primitive as the jaxpr of that
function, inline, like a `jit` body (`calls.eval_body`): every equation has a
rule in this table, so the gradient is the derivative of what JAX computes,
to any order, and costs what the gathers and scatters cost, O(stored
elements), never a dense matrix. The primitives are linear in the stored
values (the indices are integers, without a derivative), so this is the map
JAX's own rules transpose.

Example (a gradient through a BCOO matrix-vector product):
    >>> import jax.numpy as jnp
    >>> from jax.experimental import sparse
    >>> import chainrule as cr
    >>> M = sparse.BCOO.fromdense(jnp.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]))
    >>> cr.grad(lambda x: jnp.sum((M @ x) ** 2))(jnp.arange(3.0)).tolist()
    [8.0, 18.0, 16.0]

`spsolve` (a sparse direct solve) is the one with a rule of its own: JAX
computes it with a host callback (SciPy's solver), which has no jaxpr to
read. For x = A^-1 b, the cotangent of b is A^-T g (a solve with the CSR
transpose of A) and that of the stored value A[i, j] is -(A^-T g)[i] x[j].
Importing `jax.experimental.sparse` costs over a second, so it is imported
when one of its primitives first reaches chainrule, never before.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import core as jcore  # typeof (JAX 0.10, pinned)

from chainrule.engine import host
from chainrule.engine.core import Primitive, raw, user_frame
from chainrule.engine.rules.calls import eval_body
from chainrule.engine.rules.elementwise import mul, neg
from chainrule.engine.rules.indexing import gather_p
from chainrule.engine.rules.registry import PRIMITIVES, defvjp, primitive
from chainrule.errors import NoVJPRuleError

_MODULE = "jax.experimental.sparse."

# primitive -> (module of jax.experimental.sparse, its Python implementation)
_IMPLEMENTATIONS = {
    "bcoo_todense": ("bcoo", "_bcoo_todense_impl"),
    "bcoo_fromdense": ("bcoo", "_bcoo_fromdense_impl"),
    "bcoo_extract": ("bcoo", "_bcoo_extract_impl"),
    "bcoo_transpose": ("bcoo", "_bcoo_transpose_impl"),
    "bcoo_dot_general": ("bcoo", "_bcoo_dot_general_impl"),
    "bcoo_dot_general_sampled": ("bcoo", "_bcoo_dot_general_sampled_impl"),
    "bcoo_spdot_general": ("bcoo", "_bcoo_spdot_general_impl"),
    "bcoo_sort_indices": ("bcoo", "_bcoo_sort_indices_impl"),
    "bcoo_sum_duplicates": ("bcoo", "_bcoo_sum_duplicates_impl"),
    "bcsr_fromdense": ("bcsr", "_bcsr_fromdense_impl"),
    "bcsr_todense": ("bcsr", "_bcsr_todense_impl"),
    "bcsr_extract": ("bcsr", "_bcsr_extract_impl"),
    "bcsr_dot_general": ("bcsr", "_bcsr_dot_general_impl"),
    "coo_todense": ("coo", "_coo_todense_impl"),
    "coo_fromdense": ("coo", "_coo_fromdense_impl"),
    "coo_matvec": ("coo", "_coo_matvec_impl"),
    "coo_matmat": ("coo", "_coo_matmat_impl"),
    "csr_todense": ("csr", "_csr_todense_impl"),
    "csr_fromdense": ("csr", "_csr_fromdense_impl"),
    "csr_matvec": ("csr", "_csr_matvec_impl"),
    "csr_matmat": ("csr", "_csr_matmat_impl"),
    "todense": ("api", "_todense_impl"),  # `sparse.todense` of any sparse array
}

# (primitive, parameters, operand types) -> the closed jaxpr of its implementation
_BODIES: dict[tuple, Any] = {}


class _ThroughImplementation(Primitive):
    """A primitive evaluated inline as the jaxpr of JAX's implementation of it."""

    def __init__(self, name: str, module: str, function: str):
        super().__init__(name, impl=None, multiple_results=True)
        self.module, self.function = module, function

    def apply(self, trace, args, params):
        return eval_body(trace, self.body(args, params), args)

    def apply_untraced(self, trace, args, params):
        return NotImplemented  # nothing of chainrule's involved: JAX evaluates its primitive

    def body(self, args: Sequence[Any], params: dict[str, Any]) -> Any:
        types = tuple(jcore.typeof(a) for a in args)
        try:
            key = (self.name, tuple(sorted(params.items())), types)
            hash(key)
        except TypeError:  # (a parameter that is not hashable: read every time)
            key = None
        closed = _BODIES.get(key) if key is not None else None
        if closed is None:
            implementation = getattr(importlib.import_module(_MODULE + self.module), self.function)
            closed = jax.make_jaxpr(partial(implementation, **params))(
                *(jax.ShapeDtypeStruct(t.shape, t.dtype, weak_type=t.weak_type) for t in types)
            )
            if any(eqn.primitive.name == self.name for eqn in closed.jaxpr.eqns):
                raise NoVJPRuleError(
                    self.name,
                    user_frame(),
                    detail="JAX's implementation of it calls it again, so chainrule "
                    "cannot differentiate it through that implementation",
                )
            if key is not None:
                _BODIES[key] = closed
        return closed


for _name, (_module, _function) in _IMPLEMENTATIONS.items():
    PRIMITIVES[_name] = _ThroughImplementation(_name, _module, _function)


# --- spsolve ---------------------------------------------------------------------


def _spsolve_impl(data: Any, indices: Any, indptr: Any, b: Any, **params: Any) -> Any:
    from jax.experimental.sparse import linalg

    args = [
        host.to_jax(a) if isinstance(a, host.HOST_TYPES) else a for a in (data, indices, indptr, b)
    ]
    return linalg.spsolve_p.bind(*args, **params)


spsolve_p = primitive("spsolve", _spsolve_impl, ("tol", "reorder"))


def _take(x: Any, idx: Any) -> Any:
    """`x[idx]` for a vector `x` and integer indices: a (traced) gather."""
    dims = lax.GatherDimensionNumbers(
        offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    return gather_p.bind(
        x,
        idx[:, None],
        dimension_numbers=dims,
        slice_sizes=(1,),
        indices_are_sorted=False,
        unique_indices=False,
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
        fill_value=None,
    )


def _csr_structure(indices: Any, indptr: Any) -> tuple[Any, Any, Any, Any]:
    """(row of each stored value, and of the square matrix's transpose: the order
    of the stored values, its column indices, its row pointers). Integers only."""
    indices, indptr = jnp.asarray(raw(indices)), jnp.asarray(raw(indptr))
    n = indptr.shape[0] - 1
    rows = (jnp.searchsorted(indptr, jnp.arange(indices.shape[0]), side="right") - 1).astype(
        indices.dtype
    )
    order = jnp.lexsort((rows, indices))  # by column, then row: the transpose's rows
    counts = jnp.bincount(indices, length=n).astype(indptr.dtype)
    indptr_t = jnp.concatenate([jnp.zeros(1, indptr.dtype), jnp.cumsum(counts)])
    return rows, order, rows[order], indptr_t


def _solve_transposed(data: Any, indices: Any, indptr: Any, g: Any, params: dict) -> Any:
    """A^-T g, with A^T in CSR form (its stored values gathered from `data`)."""
    _, order, indices_t, indptr_t = _csr_structure(indices, indptr)
    return spsolve_p.bind(_take(data, order), indices_t, indptr_t, g, **params)


def _spsolve_data_vjp(ans, data, indices, indptr, b, **params):
    def vjp(g):
        w = _solve_transposed(data, indices, indptr, g, params)
        rows = _csr_structure(indices, indptr)[0]
        return neg(mul(_take(w, rows), _take(ans, jnp.asarray(raw(indices)))))

    return vjp


def _spsolve_b_vjp(ans, data, indices, indptr, b, **params):
    return lambda g: _solve_transposed(data, indices, indptr, g, params)


defvjp(spsolve_p, _spsolve_data_vjp, None, None, _spsolve_b_vjp)
