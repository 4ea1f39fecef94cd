"""Scatter variants and gather modes against `jax.vjp`: all of `.at[...]`.

`set/add/subtract/multiply/divide/power/min/max` and `get`, in every mode
(clip, fill/drop, promise_in_bounds with in-bounds indices), with
`unique_indices`/`indices_are_sorted`, duplicate indices, out-of-bounds
indices, and ties between updates (and with the original value) for min/max,
where JAX shares the cotangent evenly.
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
from chainrule.errors import NoVJPRuleError
from tests.oracle import check_against_jax, emitted
from tests.test_sorting import assert_same_vjp, normal

EXAMPLES = int(os.environ.get("CHAINRULE_FUZZ_EXAMPLES", "8"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
SLOW_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

SCATTERS = {"scatter", "scatter-add", "scatter-sub", "scatter-mul", "scatter-min", "scatter-max"}
OPS = ("set", "add", "subtract", "multiply", "divide", "power", "min", "max")
MODES = ("clip", "drop", "promise_in_bounds")

DUPLICATES = np.array([3, 0, 3, 1])  # rows of a (4, 3) operand; row 2 untouched
OUT_OF_BOUNDS = np.array([3, 7, 0, -9, 7])
UNIQUE = np.array([2, 0, 3])


def at_ops(x, y, z, mode):
    """Every `.at` update of `x` (4, 3): by rows `y` (4, 3) at duplicate indices
    (out-of-bounds ones too, except where the mode promises they are not), and
    by `z` (3, 3) at unique indices, where the updates' gradient of multiply,
    divide and power is defined. `x` is rounded so that min/max meet ties."""
    rows = DUPLICATES if mode == "promise_in_bounds" else OUT_OF_BOUNDS
    y = y[: len(rows)] if len(rows) <= len(y) else jnp.concatenate([y, y[:1] * 0.5])
    fixed = lax.stop_gradient(y)  # multiply's factors at duplicates: only x is differentiated
    at, unique = x.at[rows], x.at[UNIQUE]
    return {
        "set": at.set(y, mode=mode),
        "add": at.add(y, mode=mode),
        "subtract": at.subtract(y, mode=mode),
        "multiply": at.multiply(fixed, mode=mode),
        "divide": at.divide(fixed + 3.0, mode=mode),
        "power": jnp.abs(x).at[rows].power(2, mode=mode),
        "min": at.min(y, mode=mode),
        "max": at.max(y, mode=mode),
        "multiply_unique": unique.multiply(z, mode=mode, unique_indices=True),
        "divide_unique": unique.divide(z + 3.0, mode=mode, unique_indices=True),
        "power_unique": jnp.abs(x).at[UNIQUE].power(z, mode=mode, unique_indices=True),
        "max_sorted_unique": x.at[np.array([0, 2, 3])].max(
            z, mode=mode, unique_indices=True, indices_are_sorted=True
        ),
        "get": (at.get(mode="fill", fill_value=0.5) if mode == "drop" else at.get(mode=mode)) * y,
    }


def operands(dtype=jnp.float64):
    x = jnp.round(2 * normal((4, 3), dtype))
    y = normal((4, 3), dtype, seed=1).at[0, 1].set(x[3, 1])  # a tie with the original
    y = y.at[2, 0].set(y[0, 0])  # two updates of row 3 tie with each other
    return x, y, normal((3, 3), dtype, seed=2)


@pytest.mark.parametrize("mode", MODES)
def test_at_ops_float64(mode):
    x, y, z = operands()
    assert SCATTERS <= emitted(lambda x, y, z: at_ops(x, y, z, mode), x, y, z)
    check_against_jax(lambda x, y, z: at_ops(x, y, z, mode), x, y, z)


def test_at_ops_float32():
    x, y, z = operands(jnp.float32)
    check_against_jax(lambda x, y, z: at_ops(x, y, z, "drop"), x, y, z, modes=("eager", "jit"))


def test_duplicates_and_ties_follow_jax():
    """Ties among updates and with the original share the cotangent as JAX does
    (1/(number of winners), the original counted when it also wins)."""
    x = jnp.array([1.0, 5.0, 2.0, 4.0])
    index = np.array([0, 2, 2, 2, 3, 3, 1])
    y = jnp.array([1.0, 2.0, 2.0, 0.5, 4.0, 4.0, 3.0])
    for op in OPS:
        if op in ("multiply", "divide", "power"):
            assert_same_vjp(lambda x, op=op: getattr(x.at[index], op)(y), x)
        else:
            assert_same_vjp(lambda x, y, op=op: getattr(x.at[index], op)(y), x, y)
    for op in ("multiply", "divide"):
        assert_same_vjp(
            lambda x, y, op=op: getattr(x.at[index[:2]], op)(y[:2], unique_indices=True), x, y
        )


def test_out_of_bounds_in_clip_mode_match_jax():
    """With clip, an out-of-bounds index writes at the edge. JAX's min/max rule
    looks values up at the unclipped index (its inner gathers use their default
    mode), which gives inf for an edge update that won; chainrule gives what
    jax.grad gives."""
    x = jnp.array([1.0, 5.0, 2.0])
    index = np.array([0, 7, 7, 2, -9])
    y = jnp.array([3.0, 4.0, 6.0, 2.0, 0.5])
    for op in ("set", "add", "subtract", "min", "max"):
        assert_same_vjp(lambda x, y, op=op: getattr(x.at[index], op)(y, mode="clip"), x, y)


def test_multiply_updates_at_duplicate_indices_is_refused_as_in_jax():
    x, y = normal((3,)), normal((4,))
    index = np.array([0, 2, 2, 1])

    def loss(x, y):
        return jnp.sum(x.at[index].multiply(y))

    with pytest.raises(NotImplementedError, match="unique_indices"):
        jax.grad(loss, argnums=1)(x, y)
    with pytest.raises(NoVJPRuleError, match="unique_indices=True"):
        cr.grad(loss, argnums=1)(x, y)
    np.testing.assert_allclose(cr.grad(loss)(x, y), jax.grad(loss)(x, y), rtol=1e-12)


def test_scatter_dimension_numbers():
    """Window dimensions, several index dimensions and batching dimensions."""

    def fun(x, u, v):
        index = np.array([[0, 1], [2, 0], [0, 1]])  # (row, column) pairs, one duplicate
        dn = lax.ScatterDimensionNumbers(
            update_window_dims=(1,),
            inserted_window_dims=(0, 1),
            scatter_dims_to_operand_dims=(0, 1),
        )
        batched = lax.ScatterDimensionNumbers(
            update_window_dims=(),
            inserted_window_dims=(1,),
            scatter_dims_to_operand_dims=(1,),
            operand_batching_dims=(0,),
            scatter_indices_batching_dims=(0,),
        )
        rows = np.array([[1], [0], [1]])  # one column per batch row
        return (
            lax.scatter_max(x, index, u, dn),
            lax.scatter_mul(x, index[:2], v[:2], dn, unique_indices=True),
            lax.scatter_sub(x, index, u, dn, mode="clip"),
            lax.scatter_min(x[:, :, 0], rows, v[:, 0], batched),
        )

    x, u, v = normal((3, 2, 4)), normal((3, 4), seed=1), normal((3, 4), seed=2)
    check_against_jax(fun, x, u, v, modes=("eager", "jit"))


def scatter_property(data):
    """Random indices (duplicates, out of bounds when the mode allows), ops and
    integer-valued operands (ties everywhere), against jax.vjp."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    n, m = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))
    mode = data.draw(st.sampled_from(MODES))
    op = data.draw(st.sampled_from(OPS))
    low, high = (0, n) if mode == "promise_in_bounds" else (-n - 2, n + 2)
    index = rng.integers(low, high, m)
    x = jnp.asarray(rng.integers(-2, 3, (n, 2)), jnp.float64)
    y = jnp.asarray(rng.integers(-2, 3, (m, 2)), jnp.float64)
    if op not in ("multiply", "divide", "power"):
        assert_same_vjp(lambda x, y: getattr(x.at[index], op)(y, mode=mode), x, y)
        return
    y = jnp.abs(y) + 1.0  # factors, divisors, exponents of |x|
    if mode == "promise_in_bounds" and len(set(index)) == m:  # the updates' gradient exists
        fun = lambda x, y: getattr(jnp.abs(x).at[index], op)(y, mode=mode, unique_indices=True)  # noqa: E731
        assert_same_vjp(fun, x, y)
    else:
        assert_same_vjp(lambda x: getattr(jnp.abs(x).at[index], op)(y, mode=mode), x)


test_scatter_property = FUZZ(given(data=st.data())(scatter_property))
test_scatter_property_long = pytest.mark.slow(SLOW_FUZZ(given(data=st.data())(scatter_property)))


@pytest.mark.parametrize("mode", ["eager", "jit", "vmap"])
def test_scatter_apply_has_jaxs_value_and_no_gradient_as_in_jax(mode):
    """`x.at[i].apply(fn)` is a scatter whose combiner is fn: its value is
    JAX's (fn applied, not the dummy update written), and differentiating it
    raises, as `jax.grad` does, instead of a gradient that ignores fn."""
    x = jnp.arange(1.0, 5.0)
    idx = jnp.array([1, 3, 1])

    def f(x):
        return x.at[idx].apply(jnp.sin) * 2.0

    def value(run):
        if mode == "jit":
            return jax.jit(run)(x)
        if mode == "vmap":
            return jax.vmap(run)(jnp.stack([x, -x]))
        return run(x)

    # (jax.vjp refuses even the value: it linearizes first)
    np.testing.assert_allclose(value(lambda x: cr.vjp(f, x)[0]), value(f), rtol=1e-6)
    loss = lambda x: jnp.sum(f(x) ** 2)  # noqa: E731
    with pytest.raises(NotImplementedError):
        jax.grad(loss)(x)
    with pytest.raises(NotImplementedError, match="apply"):
        cr.grad(loss)(x)
    with pytest.raises(NotImplementedError, match="apply"):
        cr.jvp(loss, (x,), (x,))
