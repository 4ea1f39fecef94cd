"""Cumulative and product reductions against `jax.vjp`: cumsum, cumprod, cummax,
cummin, cumlogsumexp (both directions), reduce_prod (zeros included), a user's
`lax.reduce`, the boolean/bitwise reductions and argmax/argmin.

JAX defines the gradients of cumprod/cummax/cummin/cumlogsumexp and of
reduce_prod/reduce through a prefix scan and a pairwise tree; ties (cummax)
and zeros (products) are compared with `jax.vjp` exactly, and products also
with finite differences (a product is linear in each factor, so a central
difference is exact up to rounding).
"""

from __future__ import annotations

import os

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from jax import lax

import chainrule as cr
from chainrule.engine.rules import PRIMITIVES
from chainrule.errors import NoVJPRuleError
from tests.oracle import check_against_jax, emitted
from tests.test_sorting import assert_same_vjp, normal

EXAMPLES = int(os.environ.get("CHAINRULE_FUZZ_EXAMPLES", "6"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
SLOW_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

CUMULATIVE = {
    "cumsum": lax.cumsum,
    "cumprod": lax.cumprod,
    "cummax": lax.cummax,
    "cummin": lax.cummin,
    "cumlogsumexp": lax.cumlogsumexp,
}


def cumulatives(x):
    """Each cumulative reduction once, the axes and directions alternating (the
    hypothesis property below draws them at random)."""
    return {
        "cumsum": lax.cumsum(x, 1, reverse=True),
        "cumprod": lax.cumprod(x, 0, reverse=True),
        "cummax": lax.cummax(x, 1),
        "cummin": lax.cummin(x, 0, reverse=True),
        "cumlogsumexp": lax.cumlogsumexp(x, 1, reverse=True),
        "cumlogsumexp_forward": lax.cumlogsumexp(x, 0),
    }


def test_cumulative_variants():
    x = normal((4, 5))
    assert set(CUMULATIVE) <= emitted(cumulatives, x)
    check_against_jax(cumulatives, x)


def test_float32_and_numpy_spellings():
    def fun(x):
        return jnp.cumprod(x, axis=1), jnp.prod(x, axis=0), lax.cummax(x, 0, reverse=True)

    x = normal((3, 4), jnp.float32)
    assert {"cumprod", "reduce_prod", "cummax"} <= emitted(fun, x)
    check_against_jax(fun, x)


def test_cumulative_ties_and_zeros_follow_jax():
    """cummax/cummin ties share as the scan's max does; cumprod through zeros."""
    ties = jnp.array([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    zeros = jnp.array([[1.5, 0.0, 2.0, -1.0, 0.0, 3.0, 0.5], [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    for op in CUMULATIVE.values():
        for reverse in (False, True):
            assert_same_vjp(lambda x, op=op, r=reverse: op(x, 1, r), ties)
            assert_same_vjp(lambda x, op=op, r=reverse: op(x, 1, r), zeros)
    infinities = jnp.array([-jnp.inf, -jnp.inf, 0.0, jnp.inf, 1.0])
    assert_same_vjp(lambda x: lax.cumlogsumexp(x, 0), infinities[:3])
    assert_same_vjp(lambda x: lax.cummax(x, 0), infinities)


def cumulative_property(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    axis = data.draw(st.integers(0, len(shape) - 1))
    reverse = data.draw(st.booleans())
    name = data.draw(st.sampled_from(sorted(CUMULATIVE)))
    # small integers: ties for cummax/cummin, zeros for cumprod
    x = jnp.asarray(rng.integers(-2, 3, shape), jnp.float64)
    assert_same_vjp(lambda x: CUMULATIVE[name](x, axis, reverse), x)


test_cumulative_property = FUZZ(given(data=st.data())(cumulative_property))
test_cumulative_property_long = pytest.mark.slow(
    SLOW_FUZZ(given(data=st.data())(cumulative_property))
)


# --- products -------------------------------------------------------------------------


@pytest.mark.parametrize("zeros", [0, 1, 2, 3])
def test_reduce_prod_with_zeros(zeros):
    """No zero, one zero (the gradient there is the product of the others), two
    zeros in one row (all gradients 0) and zeros in two rows; against jax.vjp at
    first and second order, and against finite differences."""
    x = normal((3, 5)) + 2.0
    for i, j in ((0, 1), (0, 3), (2, 2))[:zeros]:
        x = x.at[i, j].set(0.0)
    check_against_jax(lambda x: (jnp.prod(x, axis=1), jnp.prod(x)), x, modes=("eager",))

    def loss(x):
        return jnp.sum(jnp.prod(x, axis=1) * jnp.array([1.0, -2.0, 3.0]))

    grad = cr.grad(loss)(x)
    eps = 1e-6
    for i in range(3):
        for j in range(5):
            step = jnp.zeros_like(x).at[i, j].set(eps)
            fd = (loss(x + step) - loss(x - step)) / (2 * eps)
            np.testing.assert_allclose(grad[i, j], fd, rtol=1e-8, atol=1e-8)


def test_reduce_prod_axes_and_float32():
    x = normal((2, 3, 4)) + 1.5
    check_against_jax(lambda x: (jnp.prod(x, axis=(0, 2)), jnp.prod(x, axis=())), x)
    x32 = x.astype(jnp.float32).at[1, 1, 1].set(0.0)
    check_against_jax(lambda x: jnp.prod(x, axis=2), x32, modes=("eager",))


def test_reduce_prod_property_zeros_anywhere():
    rng = np.random.default_rng(0)
    for _ in range(EXAMPLES):
        x = jnp.asarray(rng.integers(-1, 2, (3, 4)) * rng.uniform(0.5, 2.0, (3, 4)))
        for axes in ((0,), (1,), (0, 1)):
            assert_same_vjp(lambda x, a=axes: lax.reduce_prod(x, a), x)


# --- a user's lax.reduce --------------------------------------------------------------


def pair_reduce(x, y):
    """Variadic reduces JAX cannot turn into a monoid primitive: a sum and a
    product side by side, and the `y` that goes with the largest `x`."""

    def sum_and_product(a, b):
        return a[0] + b[0], a[1] * b[1]

    def payload_of_max(a, b):
        first = a[0] >= b[0]
        return jnp.where(first, a[0], b[0]), jnp.where(first, a[1], b[1])

    def init(value):
        return np.asarray(value, x.dtype)

    return (
        lax.reduce((x, y), (init(0), init(1)), sum_and_product, (1,)),
        lax.reduce((x, y), (init(-np.inf), init(0)), payload_of_max, (0,)),
    )


def test_generic_reduce():
    x, y = normal((3, 4)), normal((3, 4), seed=1) + 1.0
    assert "reduce" in emitted(pair_reduce, x, y)
    check_against_jax(pair_reduce, x, y)
    check_against_jax(pair_reduce, x.astype(jnp.float32), y.astype(jnp.float32), modes=("eager",))


def test_generic_reduce_with_traced_initial_values_is_refused():
    def fun(x, init):
        return lax.reduce((x, x), (init, init), lambda a, b: (a[0] + b[1], a[1] * b[0]), (0,))

    with pytest.raises(NotImplementedError):  # JAX too
        jax.grad(lambda x, i: jnp.sum(fun(x, i)[0]), argnums=1)(normal((3,)), 0.5)
    with pytest.raises(NoVJPRuleError, match="initial values"):
        cr.grad(lambda x, i: jnp.sum(fun(x, i)[0]), argnums=1)(normal((3,)), 0.5)


# --- reductions with no gradient -------------------------------------------------------


def test_boolean_and_bitwise_reductions_pass_through():
    def fun(x):
        positive = x > 0
        rows = jnp.all(positive, axis=1, keepdims=True)
        cols = jnp.any(positive, axis=0, keepdims=True)
        parity = lax.reduce_xor(jnp.round(x * 3).astype(jnp.int32), (0,))
        return jnp.where(rows | cols, x, 2 * x) * parity

    x = normal((3, 4))
    assert {"reduce_and", "reduce_or", "reduce_xor"} <= emitted(fun, x)
    check_against_jax(fun, x)


@pytest.mark.parametrize("name", ["reduce_and", "reduce_or", "reduce_xor"])
def test_host_bitwise_reductions_give_xla_result(name):
    rng = np.random.default_rng(1)
    jax_op = {"reduce_and": lax.reduce_and, "reduce_or": lax.reduce_or}.get(name, lax.reduce_xor)
    for x in (
        rng.integers(0, 2, (3, 4)).astype(bool),
        rng.integers(-9, 9, (3, 4)),
        np.ones((0, 2), bool),
    ):
        for axes in ((0,), (1,), (0, 1)):
            host = PRIMITIVES[name].host_impl(x, axes=axes)
            want = np.asarray(jax_op(x, axes))
            assert host.dtype == want.dtype
            np.testing.assert_array_equal(host, want)


def test_argmax_argmin_parameters():
    """axes and index_dtype are honoured; the indices pick values that carry gradients."""

    def fun(x):
        i = jnp.argmax(x, axis=1, keepdims=True)
        j = lax.argmin(x, 0, jnp.int32)
        return jnp.take_along_axis(x, i, axis=1) * x[j, jnp.arange(4)]

    x = normal((3, 4))
    assert {"argmax", "argmin"} <= emitted(fun, x)
    check_against_jax(fun, x)
    x = np.array([[1.0, np.nan, 3.0, np.nan], [2.0, 2.0, -1.0, -1.0]])
    for prim, op in (("argmax", lax.argmax), ("argmin", lax.argmin)):
        for axis in (0, 1):
            host = PRIMITIVES[prim].host_impl(x, axes=(axis,), index_dtype=np.int32)
            want = np.asarray(op(x, axis, jnp.int32))
            assert host.dtype == want.dtype
            np.testing.assert_array_equal(host, want)
