"""float16 and bfloat16: eager answers are XLA's, as under `jit` and `jax.grad`.

The eager host path (`chainrule.engine.host`) computes with NumPy only in
dtypes where NumPy and XLA's CPU kernels agree (float32, float64, integers,
booleans: `host.host_dtype`). Half precision stays JAX's: XLA computes
float16/bfloat16 arithmetic in float32 and accumulates sums in float32, where
NumPy rounds every step (a bfloat16 sum stalls at 256); ml_dtypes' bfloat16 is
not even a NumPy float to `dtype.kind` or `np.issubdtype`, which once let it
skip the subnormal, signed-zero and saturating-cast handling and sent its
exponents down the integer branch of `pow`'s rule. Each case below was a wrong
answer before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import chainrule as cr
from chainrule.engine import host

HALF = (jnp.float16, jnp.bfloat16)
TOL = {jnp.float16: 2e-3, jnp.bfloat16: 2e-2}


def _close(got, want, dtype) -> None:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.array_equal(np.isnan(got), np.isnan(want)), (got, want)
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)


def _same(got, want) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_half_precision_is_never_a_host_dtype():
    for dtype in HALF:
        assert not host.host_dtype(np.dtype(dtype))
    for dtype in (np.float32, np.float64, np.int32, np.uint8, np.bool_):
        assert host.host_dtype(np.dtype(dtype))


@pytest.mark.parametrize("dtype", HALF)
def test_a_bias_gradient_summed_over_a_large_batch(dtype):
    """Summed over 4096 rows: 4096, not the 256 where a half-precision sum stalls."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4096, 8)), dtype)
    w = jnp.asarray(rng.normal(size=(8, 4)) * 0.1, dtype)

    def loss(b):
        return jnp.sum(x @ w + b)

    b = jnp.zeros(4, dtype)
    for grad in (cr.grad(loss), jax.jit(cr.grad(loss))):
        _same(grad(b), jax.grad(loss)(b))


@pytest.mark.parametrize("dtype", HALF)
def test_subnormals_signed_zeros_and_saturating_casts(dtype):
    tiny = jnp.asarray(float(jnp.finfo(dtype).smallest_normal) / 4, dtype)  # subnormal
    cases = [
        (jax.nn.relu, tiny),
        (lambda x: jnp.maximum(x, 0.0), tiny),
        (lambda x: jnp.remainder(x, -1.5), tiny),
        (lambda x: jnp.hypot(x, 0.0 * x), tiny),
        (lambda x: 1.0 / jnp.maximum(x, 0.0), jnp.asarray(-0.0, dtype)),
        (lambda x: 1.0 / jnp.minimum(x, 0.0), jnp.asarray(0.0, dtype)),
        # saturating float -> integer conversions (x * 1.0 is computed eagerly)
        (lambda x: jnp.sum((x * 1.0).astype(jnp.uint8).astype(x.dtype) * x), None),
        (lambda x: jnp.sum((x * 1.0).astype(jnp.int8).astype(x.dtype) * x), None),
        # a float exponent 0 at a zero base: 0 * inf = nan, as JAX's
        (lambda x: jnp.sum(jnp.power(x, x)), jnp.asarray([0.0, 1.0, 2.0], dtype)),
    ]
    wide = jnp.asarray([300.0, 1e4, -3.5, 200.0], dtype)
    for f, x in cases:
        x = wide if x is None else x
        got = cr.value_and_grad(f)(x)
        want = jax.value_and_grad(f)(x)
        for g, w in zip(got, want, strict=True):
            _same(g, w)
        jitted = jax.jit(cr.value_and_grad(f))(x)
        for g, w in zip(jitted, jax.jit(jax.value_and_grad(f))(x), strict=True):
            _same(g, w)


@pytest.mark.parametrize("dtype", HALF)
def test_check_finite_sees_half_precision_nans(dtype):
    x = jnp.asarray([0.0, 1.0], dtype)
    with pytest.raises(cr.errors.NonFiniteGradientError):
        cr.grad(lambda x: jnp.sum(jnp.log(x) * 0), check_finite=True)(x)


FUNCTIONS = {
    "tanh sum": lambda x, y: jnp.sum(jnp.tanh(x) * y),
    "softmax": lambda x, y: jnp.sum(jax.nn.softmax(x) * y),
    "logsumexp": lambda x, y: jax.nn.logsumexp(x * y),
    "mean square": lambda x, y: jnp.mean((x - y) ** 2),
    "max": lambda x, y: jnp.max(x + y),
    "matmul": lambda x, y: jnp.sum(jnp.outer(x, y) @ y),
    "where": lambda x, y: jnp.sum(jnp.where(x > y, x * y, x - y)),
    "exp log1p": lambda x, y: jnp.sum(jnp.exp(x) * jnp.log1p(jnp.abs(y))),
    "clip": lambda x, y: jnp.sum(jnp.clip(x, -0.5, 0.5) * y),
    "cumsum": lambda x, y: jnp.sum(jnp.cumsum(x) * y),
}
VALUES = st.sampled_from([0.0, -0.0, 1e-6, -2.5, 3.0, 100.0, 0.5, -1e-3])


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(sorted(FUNCTIONS)),
    dtype=st.sampled_from(HALF),
    xs=st.lists(VALUES, min_size=5, max_size=5),
    ys=st.lists(VALUES, min_size=5, max_size=5),
)
def test_half_precision_gradients_are_jax_grads(name, dtype, xs, ys):
    """Values and both gradients against `jax.value_and_grad`, eagerly and
    under jit, and the eager answer against the jitted one."""
    f = FUNCTIONS[name]
    x, y = jnp.asarray(xs, dtype), jnp.asarray(ys, dtype)
    want = jax.value_and_grad(f, argnums=(0, 1))(x, y)
    got = cr.value_and_grad(f, argnums=(0, 1))(x, y)
    jitted = jax.jit(cr.value_and_grad(f, argnums=(0, 1)))(x, y)
    leaves = (jax.tree.leaves(got), jax.tree.leaves(jitted), jax.tree.leaves(want))
    for g, j, w in zip(*leaves, strict=True):
        assert g.dtype == w.dtype == j.dtype
        _close(g, w, dtype)
        _close(g, j, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_tracer_sum_and_mean_methods_accumulate_in_float32(dtype):
    """`x.sum()` and `x.mean()` on a traced half-precision value: summed in
    float32 and rounded once, as jax.numpy's (a half-precision running sum is
    off by percents)."""
    x = jnp.asarray(np.random.default_rng(3).uniform(0.5, 1.5, (3000, 2)), dtype)
    for f in (
        lambda x: x.sum(axis=0).sum() * 1.0,
        lambda x: x.mean() * 2.0,
        lambda x: (x * x).sum(),
    ):
        for transform in (cr.value_and_grad(f), jax.jit(cr.value_and_grad(f))):
            for g, w in zip(transform(x), jax.value_and_grad(f)(x), strict=True):
                _same(g, w)


@jax.custom_vjp
def _f32_cotangent(x):
    return jnp.sum(x.astype(jnp.float32))


_f32_cotangent.defvjp(
    lambda x: (_f32_cotangent(x), x.shape),
    lambda shape, g: (lax.full(shape, g, jnp.float32),),  # wider than its bfloat16 primal
)


@pytest.mark.parametrize(
    "index",
    [
        lambda t: t[np.array([1, 2, 1])],  # gather (JAX's gather cotangent-dtype test)
        lambda t: t.at[np.array([0, 3])].get(mode="clip"),
        lambda t: lax.dynamic_update_slice(t, t[:2][::-1], (1, 0)),
    ],
    ids=["gather", "gather-clip", "dynamic_update_slice"],
)
def test_a_cotangent_wider_than_its_primal_passes_through_indexing(index):
    """A `custom_vjp` may hand back a float32 cotangent for a bfloat16 input:
    JAX's transposes write it into zeros of its own dtype. chainrule's did into
    zeros of the primal's, which lax refused (a dtype mismatch)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 4)), jnp.bfloat16)
    f = lambda t: _f32_cotangent(index(t))  # noqa: E731
    for wrap in (lambda g: g, jax.jit):
        want, got = wrap(jax.grad(f))(x), wrap(cr.grad(f))(x)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    xs = jnp.stack([x, 2 * x])
    want, got = jax.vmap(jax.grad(f))(xs), jax.vmap(cr.grad(f))(xs)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
