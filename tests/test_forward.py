"""Forward mode and Jacobians (`cr.jvp`, `linearize`, `linear_transpose`, `jacrev`,
`jacfwd`, `hessian`) against JAX's own, on random compositions.

The functions come from `test_compositions`' generator of random expression
trees over a scalar `s`, a vector `v` and a matrix `m`: scalar functions (the
tree reduced), vector functions (a tree of vector kind) and pytree functions
(a dict in, a dict of a vector and a tuple out). Every transform is compared
with JAX's, eagerly, under `jax.jit` and under `jax.vmap`, in float64 at
1e-10, with JAX's output structure, shapes and dtypes. Then the kinks of
relu, abs, max and where, perturbation confusion, nesting with `cr.grad`,
JAX's errors, and a run with JAX's differentiation patched to raise.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import chainrule as cr
from tests.test_compositions import (
    SEEDS,
    Composition,
    expressions,
    fuzz_settings,
    random_inputs,
)

jax.config.update("jax_enable_x64", True)

TOL = dict(rtol=1e-10, atol=1e-10)


def assert_trees_match(got, want) -> None:
    """Same tree structure, shapes, dtypes (weak types aside) and values (1e-10)."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if g.dtype != jax.dtypes.float0:
            np.testing.assert_allclose(g, w, **TOL)


# --- the functions -----------------------------------------------------------------------


def vector_function(tree):
    return lambda s, v, m: tree.evaluate(jnp, {"s": s, "v": v, "m": m}) * jnp.ones_like(v)


def pytree_function(vec_tree, comp: Composition):
    """dict in, dict of a vector and a (scalar,) tuple out."""
    f = comp.function(jnp)

    def fun(p):
        v = vec_tree.evaluate(jnp, p) * jnp.ones_like(p["v"])
        return {"vec": v, "pair": (f(p["s"], p["v"], p["m"]),)}

    return fun


def tangents_like(primals, seed: int):
    rng = np.random.default_rng(seed + 1)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.uniform(-1.0, 1.0, np.shape(x)), jnp.float64), primals
    )


MODES = ["eager", "jit", "vmap"]


def in_mode(mode: str, fun, *args):
    """`fun(*args)` eagerly, under jit, or under vmap over a batch of 2 copies
    of the args (the result's first copy is returned)."""
    if mode == "eager":
        return fun(*args)
    if mode == "jit":
        return jax.jit(fun)(*args)
    batched = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2.0 * x]), args)
    out = jax.vmap(fun)(*batched)
    halves = jax.tree_util.tree_map(lambda x: x[1], out)
    want = fun(*jax.tree_util.tree_map(lambda x: 2.0 * x, args))
    assert_trees_match(halves, want)  # the second copy is the function at 2 * args
    return jax.tree_util.tree_map(lambda x: x[0], out)


# Depth 3 (test_compositions goes to 5): every example here runs many transforms.
small_compositions = st.builds(
    Composition,
    tree=st.sampled_from("svum").flatmap(lambda kind: expressions(kind, 3)),
    final=st.sampled_from(["sum", "mean"]),
)
functions = st.builds(
    lambda comp, vec: (comp, vec),
    small_compositions,
    st.sampled_from("sv").flatmap(lambda kind: expressions(kind, 3)),
)


# --- jvp and linearize -------------------------------------------------------------------


@fuzz_settings(4)
@given(fs=functions, seed=SEEDS, mode=st.sampled_from(MODES))
def test_jvp_matches_jax_on_scalar_vector_and_pytree_functions(fs, seed, mode):
    comp, vec_tree = fs
    inputs = random_inputs(seed)
    tangents = tangents_like(inputs, seed)
    for f in (comp.function(jnp), vector_function(vec_tree)):
        want = jax.jvp(f, inputs, tangents)
        got = in_mode(mode, lambda p, t, f=f: cr.jvp(f, p, t), inputs, tangents)
        assert_trees_match(got, want)
    g = pytree_function(vec_tree, comp)
    p = dict(zip("svm", inputs, strict=True))
    t = dict(zip("svm", tangents, strict=True))
    got = in_mode(mode, lambda p, t: cr.jvp(g, (p,), (t,)), p, t)
    assert_trees_match(got, jax.jvp(g, (p,), (t,)))


@fuzz_settings(3)
@given(fs=functions, seed=SEEDS, mode=st.sampled_from(MODES))
def test_linearize_and_has_aux_match_jax(fs, seed, mode):
    comp, vec_tree = fs
    g = pytree_function(vec_tree, comp)
    p = dict(zip("svm", random_inputs(seed), strict=True))
    t = tangents_like(p, seed)

    def with_aux(p):
        out = g(p)
        return out, {"v": out["vec"], "const": 3}

    def ours(p, t):
        y, f_jvp, aux = cr.linearize(with_aux, p, has_aux=True)
        y2, y2_dot, aux2 = cr.jvp(with_aux, (p,), (t,), has_aux=True)
        return y, f_jvp(t), aux, y2, y2_dot, aux2

    y, f_jvp, aux = jax.linearize(with_aux, p, has_aux=True)
    want = (y, f_jvp(t), aux) * 2
    got = in_mode(mode, ours, p, t) if mode != "vmap" else ours(p, t)  # aux has an int
    assert_trees_match(got, want)


# --- Jacobians and Hessians --------------------------------------------------------------


@fuzz_settings(3)
@given(
    fs=functions,
    seed=SEEDS,
    mode=st.sampled_from(MODES),
    argnums=st.sampled_from([0, 1, 2, (0, 2), (2, 1, 0)]),
    jac=st.sampled_from(["jacrev", "jacfwd"]),
)
def test_jacobians_match_jax(fs, seed, mode, argnums, jac):
    comp, vec_tree = fs
    inputs = random_inputs(seed)
    for f in (comp.function(jnp), vector_function(vec_tree)):
        want = getattr(jax, jac)(f, argnums)(*inputs)
        got = in_mode(mode, getattr(cr, jac)(f, argnums), *inputs)
        assert_trees_match(got, want)
    g = pytree_function(vec_tree, comp)
    p = dict(zip("svm", inputs, strict=True))
    assert_trees_match(in_mode(mode, getattr(cr, jac)(g), p), getattr(jax, jac)(g)(p))


@fuzz_settings(3)
@given(
    comp=small_compositions,
    seed=SEEDS,
    mode=st.sampled_from(MODES),
    argnums=st.sampled_from([0, 1, (0, 1), (1, 2)]),
)
def test_hessian_matches_jax(comp, seed, mode, argnums):
    f = comp.function(jnp)
    inputs = random_inputs(seed)

    def with_aux(s, v, m):
        return f(s, v, m), jnp.sum(v)

    assert_trees_match(
        in_mode(mode, cr.hessian(f, argnums), *inputs), jax.hessian(f, argnums)(*inputs)
    )
    got = in_mode(mode, cr.hessian(with_aux, argnums, has_aux=True), *inputs)
    assert_trees_match(got, jax.hessian(with_aux, argnums, has_aux=True)(*inputs))


@fuzz_settings(2)
@given(fs=functions, seed=SEEDS)
def test_jacobian_has_aux_and_pytree_hessian_match_jax(fs, seed):
    comp, vec_tree = fs
    g = pytree_function(vec_tree, comp)
    p = dict(zip("svm", random_inputs(seed), strict=True))

    def with_aux(p):
        out = g(p)
        return out, out["pair"]

    for jac in ("jacrev", "jacfwd"):
        got = getattr(cr, jac)(with_aux, has_aux=True)(p)
        assert_trees_match(got, getattr(jax, jac)(with_aux, has_aux=True)(p))
    scalar = lambda p: g(p)["pair"][0]  # noqa: E731
    assert_trees_match(cr.hessian(scalar)(p), jax.hessian(scalar)(p))


# --- composing with each other, with cr.grad, jit and vmap ------------------------------


@fuzz_settings(2)
@given(comp=small_compositions, seed=SEEDS)
def test_nestings_match_jax(comp, seed):
    f = comp.function(jnp)
    s, v, m = random_inputs(seed)
    t = tangents_like(v, seed)

    def hvp(grad, jvp):
        return lambda v, t: jvp(lambda v: grad(f, 1)(s, v, m), (v,), (t,))[1]

    assert_trees_match(hvp(cr.grad, cr.jvp)(v, t), hvp(jax.grad, jax.jvp)(v, t))
    assert_trees_match(jax.jit(hvp(cr.grad, cr.jvp))(v, t), hvp(jax.grad, jax.jvp)(v, t))
    # forward over reverse over forward, and grad of a jvp
    third = lambda jf, jr: jf(jr(lambda v: jax.jvp(f, (s, v, m), (s, t, m))[1]))  # noqa: E731
    ours = cr.jacfwd(cr.jacrev(lambda v: cr.jvp(f, (s, v, m), (s, t, m))[1]))(v)
    assert_trees_match(ours, third(jax.jacfwd, jax.jacrev)(v))
    grad_of_jvp = lambda grad, jvp: grad(lambda v: jvp(f, (s, v, m), (s, t, m))[1])  # noqa: E731
    assert_trees_match(grad_of_jvp(cr.grad, cr.jvp)(v), grad_of_jvp(jax.grad, jax.jvp)(v))
    # per-example Jacobians and Hessians
    vs = jnp.stack([v, -v, 0.5 * v])
    per_example = lambda jac: jax.vmap(jac(lambda v: f(s, v, m)))  # noqa: E731
    assert_trees_match(per_example(cr.jacrev)(vs), per_example(jax.jacrev)(vs))
    assert_trees_match(per_example(cr.hessian)(vs), per_example(jax.hessian)(vs))


def test_perturbation_confusion_classic_examples():
    """Siskind & Pearlmutter: d/dx [x * d/dy (x + y)] = 1, not 2; and friends."""

    def d(jvp, f, x):
        return jvp(f, (x,), (1.0,))[1]

    for jvp in (cr.jvp, jax.jvp):
        assert float(d(jvp, lambda x, jvp=jvp: x * d(jvp, lambda y: x + y, 1.0), 1.0)) == 1.0
        assert float(d(jvp, lambda x, jvp=jvp: x * d(jvp, lambda y: x * y, 2.0), 1.0)) == 2.0
    assert float(cr.grad(lambda x: x * d(cr.jvp, lambda y: x + y, 1.0))(1.0)) == 1.0
    assert float(d(cr.jvp, lambda x: x * cr.grad(lambda y: x * y)(2.0), 3.0)) == 6.0
    assert float(cr.grad(lambda x: x * cr.grad(lambda y: x + y)(1.0))(1.0)) == 1.0
    under_jit = jax.jit(lambda x: d(cr.jvp, lambda x: x * d(cr.jvp, lambda y: x * y, 2.0), x))
    assert float(under_jit(1.0)) == 2.0
    under_vmap = jax.vmap(lambda x: d(cr.jvp, lambda x: x * d(cr.jvp, lambda y: x * y, 2.0), x))
    np.testing.assert_array_equal(under_vmap(jnp.arange(3.0)), [0.0, 2.0, 4.0])
    # the tangent closed over by the inner function is the outer one's
    f = lambda x: d(cr.jvp, lambda y: jnp.sin(x * y), 0.5)  # noqa: E731
    g = lambda x: d(jax.jvp, lambda y: jnp.sin(x * y), 0.5)  # noqa: E731
    np.testing.assert_allclose(d(cr.jvp, f, 0.7), d(jax.jvp, g, 0.7), **TOL)
    np.testing.assert_allclose(cr.hessian(f)(0.7), jax.hessian(g)(0.7), **TOL)


# --- kinks ---------------------------------------------------------------------------------

KINKS = {
    "relu": lambda x: jax.nn.relu(x),
    "abs": lambda x: jnp.abs(x),
    "max": lambda x: jnp.maximum(x, 0.0),
    "max of equals": lambda x: jnp.maximum(x, x),
    "max of two": lambda x: jnp.maximum(x, -x),
    "where": lambda x: jnp.where(x > 0, x, 0.0),
    "where >=": lambda x: jnp.where(x >= 0, 2.0 * x, -x),
    "min": lambda x: jnp.minimum(x, 0.0),
    "clip": lambda x: jnp.clip(x, 0.0, 1.0),
}


@pytest.mark.parametrize("name", list(KINKS))
@pytest.mark.parametrize("mode", MODES)
def test_jvp_at_kinks_is_jaxs(name, mode):
    f = KINKS[name]
    x = jnp.array([-1.0, 0.0, 0.0, 1.0, 0.0])
    t = jnp.array([1.0, 1.0, -2.0, 1.0, 0.5])
    got = in_mode(mode, lambda x, t: cr.jvp(f, (x,), (t,)), x, t)
    assert_trees_match(got, jax.jvp(f, (x,), (t,)))
    assert_trees_match(cr.jacfwd(f)(x), jax.jacfwd(f)(x))


# --- integers, linear_transpose, errors ----------------------------------------------------


def test_integer_primals_take_float0_tangents_as_in_jax():
    def f(x, n, flag):
        return x * n, n + 1, jnp.where(flag, x, 0.0)

    primals = (jnp.array([1.0, 2.0]), jnp.array([3, 4]), jnp.array([True, False]))
    zero = lambda x: np.zeros(np.shape(x), jax.dtypes.float0)  # noqa: E731
    tangents = (jnp.array([0.5, -1.0]), zero(primals[1]), zero(primals[2]))
    assert_trees_match(cr.jvp(f, primals, tangents), jax.jvp(f, primals, tangents))
    with pytest.raises(TypeError, match="float0"):
        cr.jvp(f, primals, (tangents[0], jnp.array([1.0, 1.0]), tangents[2]))


def test_complex_primals_are_differentiated_or_refused_never_zero():
    """Complex inputs go to the engine (which refuses them until complex support
    lands, then must agree with JAX); they are never held fixed with a zero tangent."""
    f = lambda z: z * (2.0 + 1.0j)  # noqa: E731
    z = jnp.ones(2, jnp.complex128)
    try:
        got = cr.jvp(f, (z,), (z,))
    except (TypeError, NotImplementedError) as e:
        assert "complex" in str(e)
    else:
        assert_trees_match(got, jax.jvp(f, (z,), (z,)))


def test_outputs_that_do_not_depend_on_the_inputs():
    x = jnp.arange(3.0)
    for f in (lambda x: 3.0, lambda x: jnp.ones(2), lambda x: (x, 2.0 * jnp.ones(()))):
        assert_trees_match(cr.jvp(f, (x,), (x,)), jax.jvp(f, (x,), (x,)))
        assert_trees_match(cr.jacfwd(f)(x), jax.jacfwd(f)(x))
        assert_trees_match(cr.jacrev(f)(x), jax.jacrev(f)(x))


@pytest.mark.parametrize(
    "primals,tangents,error",
    [
        ((1.0,), (1.0, 2.0), TypeError),  # structure
        ((1.0,), [1.0], TypeError),  # tuple vs list
        ((jnp.ones(2),), (jnp.ones(3),), ValueError),  # shape
        ((jnp.ones(2),), (jnp.ones(2, jnp.float32),), TypeError),  # dtype
        ((jnp.ones(2),), (jnp.ones(2, jnp.int64),), TypeError),
        (jnp.ones(2), (jnp.ones(2),), TypeError),  # not a tuple
    ],
)
def test_mismatched_tangents_raise_jaxs_errors(primals, tangents, error):
    f = lambda x: jnp.sin(x)  # noqa: E731
    with pytest.raises(error):
        jax.jvp(f, primals, tangents)
    with pytest.raises(error):
        cr.jvp(f, primals, tangents)


def test_linearized_function_checks_its_tangents_as_jax():
    x = jnp.ones(3)
    for linearize in (jax.linearize, cr.linearize):
        _, f_jvp = linearize(jnp.sin, x)
        with pytest.raises(ValueError):
            f_jvp(jnp.ones(2))
        with pytest.raises(TypeError):
            f_jvp(x, x)


LINEAR = {
    "scale and sum": (lambda x, y: (0.5 * x - y.sum(), 2.0 * y), (jnp.ones(3), jnp.ones(2))),
    "matmul": (lambda x: jnp.arange(6.0).reshape(2, 3) @ x, (jnp.ones(3),)),
    "indexing": (lambda x: jnp.concatenate([x[1:], x[::-1]]) / 3.0, (jnp.ones(4),)),
    "pytree": (
        lambda p: {"a": p["u"].T @ jnp.ones(2), "b": jnp.where(jnp.arange(2) > 0, p["w"], 0.0)},
        ({"u": jnp.ones((2, 3)), "w": jnp.ones(2)},),
    ),
    "shape structs": (
        lambda x: jnp.cumsum(x) if "cumsum" in cr.PRIMITIVES else jnp.tile(x, 2),
        (jax.ShapeDtypeStruct((3,), jnp.float64),),
    ),
    # complex maps: transposed, not conjugated (conj's transpose is conj), as JAX
    "fft": (jnp.fft.fft, (jnp.ones(4, jnp.complex128),)),
    "complex matmul": (
        lambda z: (jnp.arange(8.0).reshape(2, 4) + 1j) @ z,
        (jnp.ones(4, jnp.complex128),),
    ),
    "conj, real and imag": (
        lambda z: (jnp.conj(z) * 2j, jnp.real(z) - jnp.imag(z)),
        (jnp.ones(3, jnp.complex128),),
    ),
    "real to complex": (
        lambda x: jnp.fft.rfft(x) + jax.lax.complex(x[:3], 2 * x[:3]),
        (jnp.ones(4),),
    ),
    # linear through a loop body, a checkpoint, a window sum, a solve with a
    # constant matrix: JAX transposes these (their jaxprs are linear)
    "scan": (
        lambda x: jax.lax.scan(lambda c, y: (c + y, 2.0 * c - jnp.sin(1.0) * y), 0.0, x)[1],
        (jnp.ones(3),),
    ),
    "fori_loop": (lambda x: jax.lax.fori_loop(0, 3, lambda i, c: 2.0 * c[::-1], x), (jnp.ones(3),)),
    "checkpoint": (jax.checkpoint(lambda x: jnp.cumsum(3.0 * x)), (jnp.ones(3),)),
    "window sum": (
        lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (2,), (1,), "VALID"),
        (jnp.ones(4),),
    ),
    "triangular solve": (
        lambda b: jax.scipy.linalg.solve_triangular(
            jnp.tril(jnp.ones((3, 3))) + 2.0, b, lower=True
        ),
        (jnp.ones(3),),
    ),
    "solve": (lambda b: jnp.linalg.solve(jnp.eye(3) * 2.0 + 1.0, b), (jnp.ones(3),)),
}


@pytest.mark.parametrize("name", list(LINEAR))
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_linear_transpose_matches_jax(name, mode):
    fun, primals = LINEAR[name]
    points = jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x,
        primals,
    )
    out = jax.eval_shape(fun, *points)
    rng = np.random.default_rng(0)
    ct = jax.tree_util.tree_map(
        lambda o: (
            jnp.asarray(rng.normal(size=o.shape) + 1j * rng.normal(size=o.shape), o.dtype)
            if jnp.iscomplexobj(o)
            else jnp.asarray(rng.normal(size=o.shape))
        ),
        out,
    )
    want = jax.linear_transpose(fun, *primals)(ct)
    if mode == "eager":
        got = cr.linear_transpose(fun, *primals)(ct)
    else:
        got = jax.jit(lambda ct: cr.linear_transpose(fun, *points)(ct))(ct)
    assert_trees_match(got, want)


@pytest.mark.parametrize(
    "fun",
    [
        jnp.sin,
        lambda x: x * x,
        lambda x: jnp.maximum(x, 0.0),
        lambda x: 1.0 / x,
        # nonlinear through an operation whose result is not traced: the tape
        # alone looks linear (a scaling by a "constant" computed from x)
        lambda x: jax.lax.stop_gradient(x) + x,
        lambda x: x * jnp.sign(x),
        lambda x: jnp.where(x > 0, x, 0.0),
        jnp.round,
        lambda x: x[jnp.argmax(x)] * x,
        # nonlinear inside a loop body or a checkpoint (also on a later iteration)
        lambda x: jax.lax.scan(lambda c, y: (c * y, c), 1.0, x)[1],
        lambda x: jax.lax.scan(lambda c, y: ((c[1] * c[1], y), c[0]), (0.0, 0.0), x)[1],
        lambda x: jax.lax.scan(lambda c, y: (c, jnp.where(y > 0, y, 0.0)), 0.0, x)[1],
        jax.checkpoint(jnp.sin),
        # a branch chosen by the inputs (a concrete predicate, evaluated now)
        lambda x: jax.lax.cond(x[0] > 0, lambda v: 2.0 * v, lambda v: -v, x),
        lambda x: jax.lax.switch(jnp.argmax(x), [lambda v: 2.0 * v, lambda v: -v], x),
    ],
)
def test_linear_transpose_of_a_nonlinear_function_raises_not_implemented(fun):
    x = jnp.asarray([-1.0, 2.0, 3.5])
    with pytest.raises((NotImplementedError, AssertionError)):  # JAX: by primitive
        jax.linear_transpose(fun, x)(x)
    with pytest.raises(NotImplementedError, match="not linear"):
        cr.linear_transpose(fun, x)


@pytest.mark.parametrize(
    "fun",
    [
        lambda x: (jnp.all(jnp.isfinite(x)), 2.0 * x)[1],  # a check, dropped
        lambda x: x * (x > 0).shape[0],  # a comparison read only for its shape
        lambda x: jnp.where(jnp.arange(3) > 0, x, 0.0) * 2.0,  # a mask of constants
    ],
)
def test_linear_transpose_takes_untraced_values_that_do_not_reach_the_output(fun):
    """What depends on the inputs without a derivative only matters where it
    reaches the output (as a value, or an operand of what the output depends
    on); JAX transposes these functions, and so does chainrule."""
    x = jnp.asarray([-1.0, 2.0, 3.5])
    ct = jnp.asarray([0.5, -1.0, 2.0])
    assert_trees_match(cr.linear_transpose(fun, x)(ct), jax.linear_transpose(fun, x)(ct))


def test_linear_transpose_refuses_a_cast_of_an_input_to_integers():
    """JAX transposes `x + int(x)` as if the cast were 0 (its derivative), and
    `x * int(x)` raises; chainrule cannot tell them apart from its tape (the
    cast's result is a constant to it), so it refuses both."""
    x = jnp.asarray([-1.0, 2.0, 3.5])
    for fun in (lambda x: x.astype(jnp.int32) + x, lambda x: x * x.astype(jnp.int32)):
        with pytest.raises(NotImplementedError, match="convert_element_type"):
            cr.linear_transpose(fun, x)


def test_linear_transpose_reads_any_shape_and_dtype_as_abstract():
    """JAX reads a primal leaf with `.shape` and `.dtype` (not only a
    `jax.ShapeDtypeStruct`) for its type alone (its api_test does)."""
    import types

    x = types.SimpleNamespace(shape=(3,), dtype=np.dtype(np.float32))
    y = jnp.arange(3, dtype=np.float32)
    (got,) = cr.linear_transpose(lambda x: 2 * x, x)(y)
    (want,) = jax.linear_transpose(lambda x: 2 * x, x)(y)
    assert_trees_match(got, want)


def test_linear_transpose_checks_cotangents_and_dtypes():
    f_t = cr.linear_transpose(lambda x: 2.0 * x, jnp.ones(3))
    with pytest.raises(TypeError):
        f_t((jnp.ones(3),))
    with pytest.raises(TypeError):
        f_t(jnp.ones(2))
    with pytest.raises(TypeError):
        cr.linear_transpose(lambda n: n * 2, jnp.ones(3, jnp.int32))


def test_jacobian_input_and_output_checks():
    f = lambda x: x * 2  # noqa: E731
    for jac in ("jacrev", "jacfwd"):
        for module in (jax, cr):
            with pytest.raises(TypeError):  # integer input without allow_int
                getattr(module, jac)(f)(jnp.arange(3))
            with pytest.raises(TypeError):  # holomorphic=True with real inputs
                getattr(module, jac)(f, holomorphic=True)(jnp.ones(3))
    for module in (jax, cr):
        with pytest.raises(TypeError):  # complex output without holomorphic (reverse mode)
            module.jacrev(lambda x: x * 1j)(jnp.ones(3))
    for module in (jax, cr):  # an integer output: jacrev refuses it, jacfwd does not
        with pytest.raises(TypeError):
            module.jacrev(lambda x: (x > 0).astype(jnp.int32))(jnp.ones(3))
    with pytest.raises(ValueError):
        cr.jacrev(f, argnums=3)(jnp.ones(3))


@pytest.mark.parametrize("mode", ["eager", "jit", "vmap"])
def test_jacfwd_of_integer_outputs_gives_zero_blocks_as_jax(mode):
    def f(x, y):
        return {"f": x * y, "i": jnp.argmax(x), "i8": x.astype(jnp.int8).reshape(3, 1)}

    x, y = jnp.array([1.0, 3.0, 2.0]), jnp.array([0.5, -1.0, 2.0])
    if mode == "vmap":
        x, y = jnp.stack([x, x + 1]), jnp.stack([y, -y])
    for argnums in (0, (0, 1)):
        want_fn, got_fn = jax.jacfwd(f, argnums), cr.jacfwd(f, argnums)
        if mode == "jit":
            want_fn, got_fn = jax.jit(want_fn), jax.jit(got_fn)
        elif mode == "vmap":
            want_fn, got_fn = jax.vmap(want_fn), jax.vmap(got_fn)
        assert_trees_match(got_fn(x, y), want_fn(x, y))


@pytest.mark.parametrize("jac", ["jacrev", "jacfwd", "hessian"])
def test_holomorphic_jacobians_and_hessians_match_jax(jac):
    z = jnp.array([1 + 2j, 0.5 - 1j, -0.3 + 0.1j])
    f = (lambda z: jnp.sum(z**3 * jnp.sin(z))) if jac == "hessian" else (lambda z: jnp.sin(z) * z)
    got = getattr(cr, jac)(f, holomorphic=True)(z)
    want = getattr(jax, jac)(f, holomorphic=True)(z)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(getattr(cr, jac)(f, holomorphic=True))(z), want, rtol=1e-12)


@pytest.mark.parametrize(
    "f",
    [jnp.abs, lambda z: jnp.real(z * z), lambda z: jnp.angle(z) * jnp.abs(z) ** 2],
    ids=["abs", "real of square", "angle times |z|^2"],
)
def test_jacrev_of_a_real_function_of_complex_inputs_matches_jax(f):
    """Reverse mode takes complex inputs without holomorphic (the cotangent of
    a real output), forward mode refuses them: as JAX's jacrev and jacfwd."""
    z = jnp.array([3.0 + 4.0j, 1.0 - 2.0j, -0.5 + 0.25j])
    want = jax.jacrev(f)(z)
    for got in (cr.jacrev(f)(z), jax.jit(cr.jacrev(f))(z)):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-12)
    for module in (jax, cr):
        with pytest.raises(TypeError, match="real-valued inputs"):
            module.jacfwd(f)(z)


def test_jacfwd_of_a_real_to_complex_function_matches_jax():
    f = lambda x: jnp.exp(x * 1j) * x  # noqa: E731
    x = jnp.array([0.3, 1.2, -2.0])
    np.testing.assert_allclose(cr.jacfwd(f)(x), jax.jacfwd(f)(x), rtol=1e-12)


def test_jacrev_with_integer_inputs_and_allow_int_matches_jax():
    g = lambda x, n: jnp.sin(x) * n  # noqa: E731
    x, n = jnp.array([1.0, 2.0]), jnp.array([1, 2])
    got = cr.jacrev(g, argnums=(0, 1), allow_int=True)(x, n)
    want = jax.jacrev(g, argnums=(0, 1), allow_int=True)(x, n)
    assert [a.dtype for a in got] == [a.dtype for a in want]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_array_equal(got[1], want[1])


def test_jvp_runs_the_function_once_eagerly():
    calls = []

    def f(x):
        calls.append(1)
        return jnp.sin(x)

    cr.jvp(f, (jnp.ones(2),), (jnp.ones(2),))
    cr.jacfwd(f)(jnp.ones(2))
    cr.hessian(lambda x: f(x).sum())(jnp.ones(2))
    assert len(calls) == 3


def test_readme_section_runs_as_a_doctest():
    """The README's Hessian-vector product, Newton step, per-example Jacobians and
    Gauss-Newton product (each checked inside against a Hessian or Jacobian)."""
    import doctest
    import pathlib

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Forward mode, Jacobians and Hessians", 1)[1].split("\n## ", 1)[0]
    test = doctest.DocTestParser().get_doctest(section, {}, "README", "README.md", 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False) == (0, len(test.examples)) and test.examples


# --- with JAX's differentiation patched to raise ---------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax._src.interpreters import ad

    def loss(params, x):
        h = jax.nn.relu(x @ params["w1"].T + params["b1"])
        return jnp.sum(jnp.tanh(h @ params["w2"].T) ** 2) + jnp.abs(params["b1"]).sum()

    def net(x, params):
        return jnp.tanh(jax.nn.relu(x @ params["w1"].T) @ params["w2"].T)

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w1": jax.random.normal(k[0], (6, 4)), "b1": jnp.linspace(-1, 1, 6),
              "w2": jax.random.normal(k[1], (3, 6)) * 0.3}
    x = jax.random.normal(k[2], (5, 4))
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    lin = lambda p: jax.tree_util.tree_map(lambda a: 2.0 * a, p)
    cases = {
        "jvp": lambda m: m.jvp(loss, (params, x), (v, x)),
        "hvp": lambda m: m.jvp(lambda p: m.grad(loss)(p, x), (params,), (v,)),
        "linearize": lambda m: m.linearize(loss, params, x)[1](v, x),
        "linear_transpose": lambda m: m.linear_transpose(lin, params)(v),
        "jacrev": lambda m: m.jacrev(net, (0, 1))(x[0], params),
        "jacfwd": lambda m: m.jacfwd(net, (0, 1))(x[0], params),
        "hessian": lambda m: m.hessian(loss)(params, x),
        "per-example jacrev": lambda m: jax.vmap(m.jacrev(net), (0, None))(x, params),
    }
    expected = {name: case(jax) for name, case in cases.items()}

    def forbidden(name):
        def raise_(*a, **k):
            raise AssertionError(f"JAX's differentiation was called: {name}")
        return raise_

    for name in ["grad", "value_and_grad", "vjp", "jvp", "linearize", "linear_transpose",
                 "jacrev", "jacfwd", "hessian"]:
        setattr(jax, name, forbidden("jax." + name))
    for name in ["jvp", "vjp", "linearize", "backward_pass", "linearize_jaxpr", "jvp_jaxpr"]:
        if hasattr(ad, name):
            setattr(ad, name, forbidden("ad." + name))
    ad.JVPTrace.__init__ = forbidden("JVPTrace")
    ad.LinearizeTrace.__init__ = forbidden("LinearizeTrace")
    try:
        jax.jvp(loss, (params, x), (v, x))
        raise SystemExit("patch failed")
    except AssertionError:
        pass

    import chainrule as cr
    for name, case in cases.items():
        modes = [("eager", lambda: case(cr))]
        if name in ("hvp", "jacfwd"):
            modes.append(("jit", jax.jit(lambda: case(cr))))
        for mode, run in modes:
            got = run()
            for g, e in zip(jax.tree_util.tree_leaves(got),
                            jax.tree_util.tree_leaves(expected[name]), strict=True):
                np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)
            print(name, mode, "ok")
    """
)


def test_forward_mode_never_calls_jax_differentiation():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok") == 10, result.stdout


@pytest.mark.slow
def test_long_fuzz_run():
    """The properties above with 40 examples each (CHAINRULE_FUZZ_EXAMPLES)."""
    import os

    env = dict(os.environ, CHAINRULE_FUZZ_EXAMPLES="40")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", __file__, "-k", "match_jax"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_forward_mode_of_a_custom_vjp_function_is_refused_as_by_jax():
    @jax.custom_vjp
    def clipped(x):
        return jnp.sin(x)

    clipped.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (jnp.clip(g * jnp.cos(x), -0.1, 0.1),))
    x = jnp.array([0.3, -1.2, 2.0])
    for m in (jax, cr):
        calls = (
            lambda m=m: m.jvp(clipped, (x,), (jnp.ones(3),)),
            lambda m=m: m.jacfwd(clipped)(x),
            lambda m=m: jax.jit(lambda v: m.jvp(clipped, (v,), (x,)))(x),
        )
        for call in calls:
            with pytest.raises(TypeError, match="custom_vjp"):
                call()
        # linearize hands back the value (equinox's checkpointed while loop and
        # diffrax call it for that), and refuses when the linear map is applied
        for wrap in (lambda f: f, jax.jit):
            out, f_jvp = wrap(lambda v, m=m: m.linearize(clipped, v))(x)
            np.testing.assert_allclose(out, jnp.sin(x), rtol=1e-6)
            with pytest.raises(TypeError, match="custom_vjp"):
                f_jvp(x)
    np.testing.assert_allclose(cr.grad(lambda x: clipped(x).sum())(x), [0.1, 0.1, -0.1])
