"""Regression tests for answers that were silently wrong (issue 12, engine items).

Each case is checked against `jax.value_and_grad` eagerly, under `jax.jit` and
under `jax.vmap`, so a bug that shows only on one path (an index wrapped twice
under `jit`, a dtype corner) cannot hide.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import chainrule as cr
from tests.test_compositions import fuzz_settings

X = jnp.arange(1.0, 5.0)  # [1, 2, 3, 4]: every entry distinct


def _check(f, *args, rtol=1e-12):
    """f's value and gradient (argument 0) by chainrule, eagerly and under jit,
    against jax.value_and_grad; returns chainrule's eager result."""
    want = jax.value_and_grad(f)(*args)
    for name, got in (
        ("eager", cr.value_and_grad(f)(*args)),
        ("jit", jax.jit(cr.value_and_grad(f))(*args)),
    ):
        for g, w in zip(
            jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
        ):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-14, err_msg=name)
            assert g.dtype == w.dtype, name
    return want


# --- 1. out-of-bounds dynamic indices: JAX clamps, chainrule must not wrap twice ---------

INDICES = st.integers(-12, 12)


@fuzz_settings(25)
@given(i=INDICES)
def test_out_of_bounds_index_matches_jax_eager_jit_vmap(i):
    f = lambda x, i: x[i] * 10.0  # noqa: E731
    _check(f, X, i)
    idx = jnp.array([i, -i, 2 * i])
    got = jax.vmap(cr.value_and_grad(f), (None, 0))(X, idx)
    want = jax.vmap(jax.value_and_grad(f), (None, 0))(X, idx)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@fuzz_settings(25)
@given(start=INDICES, size=st.integers(1, 4))
def test_dynamic_slice_and_update_clamp_like_jax(start, size):
    sliced = lambda x, s: jnp.sum(lax.dynamic_slice(x, (s,), (size,)) ** 2)  # noqa: E731
    updated = (
        lambda x, s: jnp.sum(  # noqa: E731
            lax.dynamic_update_slice(x, x[:size] * 3.0, (s,)) ** 2
        )
    )
    indexed = lambda x, s: jnp.sum(  # noqa: E731
        lax.dynamic_update_index_in_dim(x, x[0] * 7.0, s, 0) * X
    )
    for f in (sliced, updated, indexed):
        _check(f, X, start)
        starts = jnp.array([start, -start, start - 3])
        got = jax.vmap(cr.grad(f), (None, 0))(X, starts)
        np.testing.assert_array_equal(got, jax.vmap(jax.grad(f), (None, 0))(X, starts))


# --- 2. integer exponents ------------------------------------------------------------------


@pytest.mark.parametrize("x", [0.0, 0.5, -1.5, 2.0])
@pytest.mark.parametrize(
    "exponent", [jnp.array([0, 1, 2]), jnp.array([3, 0, -1]), jnp.array(0), jnp.array(2)]
)
def test_integer_array_exponents_match_jax(x, exponent):
    f = lambda x: jnp.sum(jnp.power(x, exponent))  # noqa: E731
    if x == 0.0 and bool(jnp.any(exponent < 0)):
        return  # 0 ** -1 is inf for both; nothing to compare but infinities
    _check(f, x)
    np.testing.assert_allclose(cr.grad(cr.grad(f))(x), jax.grad(jax.grad(f))(x), rtol=1e-12)
    xs = jnp.array([x, x + 1.0])
    np.testing.assert_allclose(jax.vmap(cr.grad(f))(xs), jax.vmap(jax.grad(f))(xs), rtol=1e-12)


def test_zero_integer_exponent_at_zero_is_zero_like_jax():
    f = lambda x: x ** jnp.array(0)  # noqa: E731
    assert float(cr.grad(f)(0.0)) == float(jax.grad(f)(0.0)) == 0.0
    assert float(jax.jit(cr.grad(f))(0.0)) == 0.0


def test_float_exponent_zero_at_zero_is_nan_like_jax():
    f = lambda x: jnp.sum(jnp.power(x, jnp.array([0.0, 2.0])))  # noqa: E731
    got, want = cr.grad(f)(jnp.zeros(2)), jax.grad(f)(jnp.zeros(2))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


# --- 3. parameters are honoured or refused ------------------------------------------------


@pytest.mark.parametrize("x", [np.float32(2.0), np.array([1.5, -2.0], np.float32)])
def test_mul_out_dtype_is_honoured(x):
    f = lambda x: jnp.sum(lax.mul(x, x * 3.0, out_dtype=jnp.float64))  # noqa: E731
    want = _check(f, x)
    assert want[0].dtype == jnp.float64 and want[1].dtype == jnp.float32
    np.testing.assert_allclose(cr.grad(cr.grad(f))(np.float32(2.0)), 6.0)


def test_an_unknown_parameter_is_refused_not_ignored():
    prim = cr.PRIMITIVES["mul"]
    with pytest.raises(cr.errors.NoVJPRuleError, match="accumulation_type='f64'"):
        prim.taken({"accumulation_type": "f64"})
    assert prim.taken({"sharding": None, "out_sharding": None}) == {}


# --- 4. Tracers are jax.Arrays --------------------------------------------------------


def test_isinstance_jax_array_filters_see_tracers():
    def is_array(x):  # equinox's eqx.is_array
        return isinstance(x, (jax.Array, np.ndarray, np.generic))

    def loss(p):
        leaves = [v for v in jax.tree_util.tree_leaves(p) if is_array(v)]
        return sum(jnp.sum(v * v) for v in leaves)

    p = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    got = cr.grad(loss)(p)
    want = jax.grad(loss)(p)
    for k in p:
        np.testing.assert_allclose(got[k], want[k])
    assert float(jnp.abs(got["w"]).sum()) > 0


# --- 5. argnums naming one argument twice ---------------------------------------------


@pytest.mark.parametrize("argnums", [(1, -1), (0, -2), (0, 1, 0)])
def test_duplicate_argnums_after_normalisation_raise(argnums):
    with pytest.raises(cr.errors.ArgnumsError, match="twice|duplicates"):
        cr.grad(lambda a, b: a * b, argnums=argnums)(1.0, 2.0)


# --- 7. a transform in another thread --------------------------------------------------


def test_transform_in_another_thread_inside_a_transform():
    pool = ThreadPoolExecutor(1)

    def f(x):
        inner = pool.submit(lambda: cr.grad(lambda y: x * y)(1.0)).result()  # = x
        return x * inner

    assert float(cr.grad(f)(3.0)) == 6.0
    pool.shutdown()


# --- 10. primitives that used to be missing --------------------------------------------


@pytest.mark.parametrize("shape", [(3,), (2, 3)])
def test_reshape_with_dimensions(shape):
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape) + 1.0
    for f in (
        lambda x: jnp.sum(jnp.column_stack([x, 2.0 * x]) ** 2),
        lambda x: jnp.sum(
            lax.reshape(x, (np.prod(shape),), tuple(reversed(range(len(shape)))))
            * jnp.arange(x.size)
        ),
    ):
        _check(f, x)
        second = lambda grad, f=f: lambda x: jnp.sum(grad(f)(x) ** 2)  # noqa: E731
        np.testing.assert_allclose(cr.grad(second(cr.grad))(x), jax.grad(second(jax.grad))(x))


def test_bitcast_convert_type_passes_through_without_a_gradient():
    f = lambda x: jnp.sum(jnp.where(jnp.signbit(x), -x, 2.0 * x))  # noqa: E731
    x = np.array([-1.5, 0.0, 2.0, -0.0])
    _check(f, x)
    xs = np.stack([x, -x])
    np.testing.assert_array_equal(jax.vmap(cr.grad(f))(xs), jax.vmap(jax.grad(f))(xs))


@pytest.mark.parametrize("jit", [False, True])
def test_float_of_a_differentiated_value_raises_as_jax_does(jit):
    """float() would make the value a constant and silently lose its gradient path."""

    def f(x):
        return float(x) * x

    for grad in (jax.grad, cr.grad):
        run = jax.jit(grad(f)) if jit else grad(f)
        with pytest.raises(jax.errors.ConcretizationTypeError):
            run(2.0)
    if not jit:
        with pytest.raises(jax.errors.ConcretizationTypeError, match="stop_gradient"):
            cr.grad(f)(2.0)
    # int() and .item() work in jax.grad (a constant), and so they do in chainrule
    for g in (lambda x: int(x) * x, lambda x: x.item() * x):
        assert float(cr.grad(g)(2.0)) == float(jax.grad(g)(2.0)) == 2.0
    keep = cr.grad(lambda x: float(jax.lax.stop_gradient(x)) * x)(2.0)
    assert float(keep) == 2.0


def test_in_place_operators_on_values_computed_eagerly_rebind_as_in_jax():
    """`c *= 100` on a value computed on the host must not write into the tape's saved
    copy (a silently wrong gradient, 100x here), nor into another name's array."""

    def f(w):
        c = jnp.sin(jnp.ones(3))  # a constant: computed with NumPy on the host
        y = w * c  # c is saved for the backward pass
        c *= 100.0
        mask = c > 0
        mask &= w < 10  # a non-differentiable result, updated in place
        return jnp.sum(y) + jnp.sum(c) + jnp.sum(jnp.where(mask, w, 0.0))

    @jax.custom_jvp
    def g(x):  # eagerly, the body runs on the host too
        x2 = jnp.square(x)
        p = x2
        for _ in range(2):
            p *= x2
        return p + x2

    g.defjvp(lambda p, t: (g(p[0]), (6 * p[0] ** 5 + 2 * p[0]) * t[0]))
    w = jnp.array([1.0, 2.0, 3.0])
    for fun in (f, lambda x: jnp.sum(g(x))):
        for run in (cr.value_and_grad(fun), jax.jit(cr.value_and_grad(fun))):
            got, want = run(w), jax.value_and_grad(fun)(w)
            np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_abs_gives_jaxs_signed_zero_where_the_cotangent_is_zero(dtype):
    """JAX transposes abs's select(x >= 0, g, -g): where x < 0 a zero cotangent
    comes back as +0, not -0 (sqrt(|x|) at -inf, the max-norm's losers)."""
    x = np.array([-np.inf, -2.0, -0.0, 0.0, 3.0], dtype)
    for f in (
        lambda x: jnp.sum(jnp.sqrt(jnp.abs(x))),
        lambda x: jnp.linalg.norm(x[1:], jnp.inf),
        lambda x: jnp.sum(jnp.abs(x) * jnp.array([1.0, 0.0, 1.0, 0.0, 1.0], dtype)),
    ):
        want = np.asarray(jax.grad(f)(x))
        for got in (cr.grad(f)(x), jax.jit(cr.grad(f))(x)):
            got = np.asarray(got)
            np.testing.assert_allclose(got, want, rtol=1e-6)
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_a_python_int_out_of_a_narrow_integer_types_range_wraps_as_in_jax():
    """`n * 200` for an int8 array n: XLA converts the weak 200 to int8 and
    wraps, where NumPy refuses it (OverflowError); chainrule answers JAX's."""
    n = jnp.array([3, 4], jnp.int8)

    def f(x):
        wrapped = jnp.sum(n * 200) + jnp.sum(n * 2**30)  # (int8: 120 + 0)
        return x * wrapped.astype(jnp.float32)

    for got, want in [
        (cr.grad(f)(2.0), jax.grad(f)(2.0)),
        (jax.jit(cr.grad(f))(2.0), jax.jit(jax.grad(f))(2.0)),
        (cr.jvp(f, (2.0,), (1.0,)), jax.jvp(f, (2.0,), (1.0,))),
    ]:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
