"""Sorting and ranking: `sort`, `top_k`, `approx_top_k` against `jax.vjp`.

The oracle checks (`tests/oracle.py`) compare values, first- and second-order
cotangents, eagerly, under `jit` and under `vmap`, in float64 (1e-12) and
float32. Ties are compared with `jax.vjp` only (their gradient is a
convention: each output's cotangent goes to the input the sort put there).
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
from tests.oracle import check_against_jax, emitted

EXAMPLES = int(os.environ.get("CHAINRULE_FUZZ_EXAMPLES", "6"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
SLOW_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


def normal(shape, dtype=jnp.float64, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def assert_same_vjp(fun, *args, ct_seed=3):
    """chainrule's output and cotangents equal jax.vjp's (first order, eager, 1e-12:
    a tie given to the wrong element is off by O(1), rounding is not)."""
    want_out, want_vjp = jax.vjp(fun, *args)
    got_out, got_vjp = cr.vjp(fun, *args)
    ct = jax.tree_util.tree_map(
        lambda o: jax.random.normal(jax.random.PRNGKey(ct_seed), o.shape, o.dtype), want_out
    )
    for got, want in zip(
        jax.tree_util.tree_leaves((got_out, got_vjp(ct))),
        jax.tree_util.tree_leaves((want_out, want_vjp(ct))),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)


# --- sort ----------------------------------------------------------------------------


def sorts(x, y):
    """Every sort variant: each dimension, several operands, two keys, unstable."""
    keys = jnp.round(2 * y)  # ties in the first key: the second one decides
    return {
        "last": jnp.sort(x),
        "first": jnp.sort(x, axis=0),
        "operands": lax.sort((x, y, x * y), dimension=1, num_keys=1),
        "two_keys": lax.sort((keys, x, y), dimension=0, num_keys=2),
        "unstable": lax.sort(x, dimension=2, is_stable=False),
    }


def test_sort_variants():
    x, y = normal((3, 4, 5)), normal((3, 4, 5), seed=1)
    assert "sort" in emitted(sorts, x, y)
    check_against_jax(sorts, x, y)


def test_sort_float32():
    def fun(x, y):
        return lax.sort((x, y), dimension=0), jnp.sort(y, axis=1)

    x, y = normal((3, 4), jnp.float32), normal((3, 4), jnp.float32, seed=1)
    check_against_jax(fun, x, y)


def test_sort_ties_follow_jax():
    """Equal keys: stable order, the permutation of the sort itself (JAX's rule)."""
    x = jnp.array([[2.0, 1.0, 2.0, 1.0, 2.0], [0.0, -0.0, 0.0, 3.0, 0.0]])
    payload = normal((2, 5), seed=2)
    assert_same_vjp(jnp.sort, x)
    assert_same_vjp(lambda x, p: lax.sort((x, p), num_keys=1), x, payload)
    assert_same_vjp(lambda x, p: lax.sort((x, p), num_keys=2), x, payload)
    assert_same_vjp(lambda x: jnp.sort(x, axis=0), x)


def test_sort_with_nan_and_infinities():
    x = jnp.array([np.nan, 1.0, -np.inf, np.inf, 1.0, -np.nan, 0.0])
    payload = normal((7,), seed=4)
    assert_same_vjp(lambda x, p: lax.sort((x, p), num_keys=1), x, payload)


def sort_property(shape, data):
    """Random shapes, dimensions, key counts and tie patterns (small integers)."""
    dimension = data.draw(st.integers(0, len(shape) - 1))
    num_keys = data.draw(st.integers(1, 2))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    ties = jnp.asarray(rng.integers(-2, 3, shape), jnp.float64)
    other = jnp.asarray(rng.normal(size=shape))

    def fun(a, b):
        return lax.sort((a, b, a * b), dimension=dimension, num_keys=num_keys)

    assert_same_vjp(fun, ties, other)


SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=3)
test_sort_property = FUZZ(given(shape=SHAPES, data=st.data())(sort_property))
test_sort_property_long = pytest.mark.slow(
    SLOW_FUZZ(given(shape=SHAPES, data=st.data())(sort_property))
)


@FUZZ
@given(data=st.data())
def test_host_sort_gives_xla_order(data):
    """The NumPy sort used eagerly gives lax.sort's result bit for bit, ties,
    NaN, infinities and signed zeros included."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    dimension = data.draw(st.integers(0, len(shape) - 1))
    num_keys = data.draw(st.integers(1, 3))
    pool = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 2.5])
    operands = [
        rng.choice(pool, shape),
        rng.integers(-2, 2, shape).astype(np.int32),
        rng.choice(pool, shape).astype(np.float32),
    ]
    host = PRIMITIVES["sort"].host_impl(
        *operands, dimension=dimension, is_stable=True, num_keys=num_keys
    )
    want = lax.sort(tuple(operands), dimension=dimension, is_stable=True, num_keys=num_keys)
    for h, w in zip(host, want, strict=True):
        assert h.dtype == w.dtype
        np.testing.assert_array_equal(h.view(np.uint8), np.asarray(w).view(np.uint8))


# --- top_k and approx_top_k ------------------------------------------------------------


def top_ks(x):
    values, indices = lax.top_k(x, 3)
    return {
        "top_k": values * jnp.take_along_axis(x, indices, axis=-1),
        "approx_max_k": lax.approx_max_k(x, 2)[0],
        "approx_min_k_dim0": lax.approx_min_k(x, 2, reduction_dimension=0)[0],
        "approx_max_k_no_aggregate": lax.approx_max_k(
            x, 2, reduction_dimension=1, recall_target=0.9, aggregate_to_topk=False
        )[0],
    }


def test_top_k_variants():
    x = normal((4, 6))
    assert {"top_k", "approx_top_k"} <= emitted(top_ks, x)
    check_against_jax(top_ks, x)


def test_top_k_float32():
    x = normal((4, 6), jnp.float32)
    check_against_jax(lambda x: (lax.top_k(x, 2)[0], lax.approx_min_k(x, 3)[0]), x)


def test_top_k_ties_follow_jax():
    x = jnp.array([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert_same_vjp(lambda x: lax.top_k(x, 2)[0], x)
    assert_same_vjp(lambda x: lax.approx_max_k(x, 3)[0], x)
    assert_same_vjp(lambda x: lax.approx_min_k(x, 1, reduction_dimension=0)[0], x)


# --- integer results pass through -----------------------------------------------------


def test_integer_results_need_no_gradient():
    """argsort, argmax/argmin, searchsorted and top_k's indices used as indices."""
    x, table = normal((5,)), jnp.sort(normal((7,), seed=1))

    def fun(x):
        order = jnp.argsort(x)
        where_sort = jnp.searchsorted(table, x, method="sort")
        where_all = jnp.searchsorted(table, x, method="compare_all")
        _, top = lax.top_k(x, 2)
        return (
            jnp.sum(x[order] * jnp.arange(5.0))
            + jnp.sum(x * (where_sort + where_all))
            + x[jnp.argmax(x)] * x[jnp.argmin(x)]
            + jnp.sum(x[top])
        )

    assert {"sort", "argmax", "argmin", "top_k"} <= emitted(fun, x)
    check_against_jax(fun, x)


# --- functions users write ------------------------------------------------------------


def test_median_and_quantile():
    def stats(x):
        return {
            "median": jnp.median(x, axis=0),
            "quantile": jnp.quantile(x, jnp.array([0.1, 0.5, 0.9]), axis=1),
            "nearest": jnp.quantile(x, 0.3, method="nearest"),
        }

    x = normal((4, 5))
    assert "sort" in emitted(stats, x)
    check_against_jax(stats, x)


def ranking_loss(scores, relevance):
    """A listwise ranking loss: sort by score, discount, keep the top 3."""
    order = jnp.argsort(-scores, axis=-1)
    ranked = jnp.take_along_axis(relevance, order, axis=-1)
    sorted_scores = -jnp.sort(-scores, axis=-1)
    top, _ = lax.top_k(scores, 3)
    log_norm = jax.nn.logsumexp(sorted_scores, axis=-1, keepdims=True)
    tail = jnp.cumsum(jnp.exp(sorted_scores - log_norm)[..., ::-1], axis=-1)[..., ::-1]
    listnet = -jnp.sum(ranked * (sorted_scores - log_norm - jnp.log(tail)), axis=-1)
    return jnp.mean(listnet) - jnp.mean(jax.nn.log_sigmoid(top[..., 0] - top[..., 2]))


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_ranking_loss_matches_jax_grad(mode):
    scores = normal((6, 8))
    relevance = jnp.abs(normal((6, 8), seed=1))
    assert {"sort", "top_k", "cumsum"} <= emitted(ranking_loss, scores, relevance)
    wrap = jax.jit if mode == "jit" else (lambda f: f)
    got = wrap(cr.grad(ranking_loss))(scores, relevance)
    want = jax.grad(ranking_loss)(scores, relevance)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
