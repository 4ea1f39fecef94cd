"""The oracle check every rule family's tests share: chainrule against `jax.vjp`.

`check_against_jax(fun, *args)` differentiates `fun` with chainrule and with
JAX and compares, at first and second order, eagerly, under `jax.jit` and
under `jax.vmap`:

* the primal output (values, shapes, dtypes);
* first order: the cotangents of `cr.vjp` against `jax.vjp`'s for a random
  output cotangent (pytree outputs included);
* second order: the gradient of `<vjp(ct), v>` (a random direction `v`) taken
  by `cr.grad` over chainrule's own backward pass, against `jax.grad` of the
  same JAX quantity;
* under `jax.vmap`: the first-order cotangents and the second order for a
  batch of two inputs (the second one scaled by 1.01 so the two rows differ).

`emitted(fun, *args)` lists the primitives `fun` emits (sub-jaxprs included),
so each test can assert it exercises the primitive it claims to test.

Example:
    >>> import jax.numpy as jnp
    >>> check_against_jax(jnp.sin, jnp.linspace(0.0, 1.0, 3))
    >>> "sin" in emitted(jnp.sin, jnp.ones(3))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import chainrule as cr

F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=2e-5, atol=2e-5)


def emitted(fun: Callable, *args: Any) -> set[str]:
    """Every primitive name in `jax.make_jaxpr(fun)(*args)`, nested jaxprs included."""
    return primitive_names(jax.make_jaxpr(fun)(*args))


def primitive_names(closed_jaxpr: Any) -> set[str]:
    """All primitive names in a jaxpr, including those of nested sub-jaxprs."""
    names: set[str] = set()

    def visit(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if hasattr(sub, "eqns"):
                        visit(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        visit(sub.jaxpr)

    visit(closed_jaxpr.jaxpr)
    return names


def _inexact(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _random_like(tree: Any, key: jax.Array) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for leaf, k in zip(leaves, keys, strict=False):
        leaf = jnp.asarray(leaf)
        if _inexact(leaf):
            real = jax.random.normal(k, leaf.shape, jnp.finfo(leaf.dtype).dtype)
            if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
                imag = jax.random.normal(jax.random.fold_in(k, 1), leaf.shape, real.dtype)
                real = real + 1j * imag
            out.append(real.astype(leaf.dtype))
        else:
            out.append(np.zeros(leaf.shape, jax.dtypes.float0))
    return jax.tree_util.tree_unflatten(treedef, out)


def _assert_trees_close(got: Any, want: Any, what: str, rtol: float, atol: float) -> None:
    got_leaves, got_tree = jax.tree_util.tree_flatten(got)
    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    assert got_tree == want_tree, f"{what}: structure {got_tree} != {want_tree}"
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"{what} leaf {i}: shape {g.shape} != {w.shape}"
        assert g.dtype == w.dtype, f"{what} leaf {i}: dtype {g.dtype} != {w.dtype}"
        if w.dtype == jax.dtypes.float0:
            continue
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{what} leaf {i}")


def _vdot(a: Any, b: Any) -> Any:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return sum(jnp.real(jnp.vdot(x, y)) for x, y in pairs)


def check_against_jax(
    fun: Callable,
    *args: Any,
    argnums: Sequence[int] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    second_order: bool = True,
    modes: Sequence[str] = ("eager", "jit", "vmap"),
    seed: int = 0,
) -> None:
    """Asserts that chainrule differentiates `fun` at `args` as `jax.vjp` does.

    Args:
      fun: a function of arrays written with `jax.numpy`/`lax` (pytree output).
      args: its arguments; `argnums` (default: every inexact one) are
        differentiated, the others are closed over.
      rtol, atol: tolerances (default: float64's 1e-12 when every
        differentiated argument is float64, else float32's 2e-5).
      second_order: also compare the gradient of `<vjp(ct), v>`.
      modes: any of "eager", "jit", "vmap".
      seed: for the random cotangent and direction.
    """
    args = tuple(jnp.asarray(a) if not isinstance(a, (tuple, list, dict)) else a for a in args)
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if _inexact(a))
    argnums = tuple(argnums)
    assert argnums, "check_against_jax: no inexact argument to differentiate"
    if rtol is None or atol is None:
        f64 = all(
            jnp.finfo(jnp.result_type(leaf)).bits == 64
            for i in argnums
            for leaf in jax.tree_util.tree_leaves(args[i])
        )
        tol = F64 if f64 else F32
        rtol = tol["rtol"] if rtol is None else rtol
        atol = tol["atol"] if atol is None else atol

    def split(vjp: Callable) -> Callable:
        """(diff args, other args) -> (out, cotangents) with the given vjp."""

        def run(diff, ct, rest=args):
            def partial(*d):
                full = list(rest)
                for i, x in zip(argnums, d, strict=True):
                    full[i] = x
                return fun(*full)

            out, vjp_fn = vjp(partial, *diff)
            return out, vjp_fn(ct)

        return run

    diff = tuple(args[i] for i in argnums)
    want_out = fun(*args)
    key = jax.random.PRNGKey(seed)
    ct = _random_like(want_out, key)
    v = _random_like(diff, jax.random.fold_in(key, 7))
    jax_run, cr_run = split(jax.vjp), split(cr.vjp)

    def second(run: Callable, grad: Callable) -> Callable:
        return lambda d: grad(lambda d: _vdot(run(d, ct)[1], v))(d)

    for mode in modes:
        if mode == "vmap":
            batch = tuple(jnp.stack([a, a * 1.01]) if _inexact(a) else a for a in diff)
            cts = jax.tree_util.tree_map(lambda c: jnp.stack([c, c]), ct)

            got = jax.vmap(cr_run)(batch, cts)
            want = jax.vmap(jax_run)(batch, cts)
            _assert_trees_close(got[0], want[0], "vmap: output", rtol, atol)
            _assert_trees_close(got[1], want[1], "vmap: cotangents", rtol, atol)
            if second_order:  # (a rule's nested levels under vmap once failed alone)
                got2 = jax.vmap(second(cr_run, cr.grad))(batch)
                want2 = jax.vmap(second(jax_run, jax.grad))(batch)
                _assert_trees_close(got2, want2, "vmap: second order", rtol, atol)
            continue
        wrap = jax.jit if mode == "jit" else (lambda f: f)
        got_out, got_cts = wrap(lambda d, c: cr_run(d, c))(diff, ct)
        want_out, want_cts = jax_run(diff, ct)
        _assert_trees_close(got_out, want_out, f"{mode}: output", rtol, atol)
        _assert_trees_close(got_cts, want_cts, f"{mode}: cotangents", rtol, atol)
        if second_order:
            got2 = wrap(second(cr_run, cr.grad))(diff)
            want2 = second(jax_run, jax.grad)(diff)
            _assert_trees_close(got2, want2, f"{mode}: second order", rtol, atol)
