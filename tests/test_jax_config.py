"""JAX's configuration flags that change what a function does hold for
chainrule's transforms too: `jax_numpy_rank_promotion` for the operators on
chainrule's values, `jax_debug_nans`/`jax_debug_infs` for eager gradients
(which chainrule otherwise computes with NumPy, where JAX checks every
primitive's result), results handed back as `jax.Array`s under `vmap` with
a named axis, and eager results placed where JAX places them (on a committed
input's device, or `jax.default_device`'s)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import chainrule as cr

_RANKS = [  # (name, function, whether an operator of chainrule's does the broadcast)
    ("times", lambda x: x[:, None] * x, True),
    ("plus", lambda x: x + x[:, None], True),
    ("greater", lambda x: jnp.where(x[:, None] > x, x, 0.0), True),
    ("power", lambda x: jnp.abs(x[:, None]) ** x, True),
    ("maximum", lambda x: jnp.maximum(x[:, None], x), False),
    ("mask times", lambda x: x * (jnp.ones((2, 3)) > 0.5), True),
    ("integer exponents", lambda x: x[:, None] ** jnp.arange(3), True),
]


@pytest.mark.parametrize("fun, operator", [c[1:] for c in _RANKS], ids=[c[0] for c in _RANKS])
@pytest.mark.parametrize("mode", ["eager", "jit", "jvp"])
def test_rank_promotion_raise_and_warn_as_in_jax(fun, operator, mode):
    """With `jax_numpy_rank_promotion='raise'` an operation on operands of
    different ranks raises JAX's ValueError, with 'warn' it warns, with
    'allow' it broadcasts; on host values too (NumPy would broadcast).
    (A `jnp` function warns when JAX traces it, not on a cached call: only
    the operators' warnings are asserted.)"""
    x = jnp.array([0.5, -1.0, 2.0])

    def run(grad, jvp):
        loss = lambda x: jnp.sum(fun(x))  # noqa: E731
        if mode == "jvp":
            return jvp(loss, (x,), (x,))[1]
        g = grad(loss)
        return (jax.jit(g) if mode == "jit" else g)(x)

    with jax.numpy_rank_promotion("raise"):
        for grad, jvp in ((jax.grad, jax.jvp), (cr.grad, cr.jvp)):
            with pytest.raises(ValueError, match="jax_numpy_rank_promotion='raise'"):
                run(grad, jvp)
    with jax.numpy_rank_promotion("warn"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = run(cr.grad, cr.jvp)
    if operator:
        assert any("rank promotion" in str(w.message) for w in seen), seen
    want = run(jax.grad, jax.jvp)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(run(cr.grad, cr.jvp), want, rtol=1e-12)


_NAN_CASES = [
    ("log of a negative", lambda x: jnp.sum(jnp.log(x)), FloatingPointError),
    ("sqrt of a negative", lambda x: jnp.sum(jnp.sqrt(x)), FloatingPointError),
    ("0/0", lambda x: jnp.sum((x - x) / (x - x)), FloatingPointError),
]


@pytest.mark.parametrize("fun", [c[1] for c in _NAN_CASES], ids=[c[0] for c in _NAN_CASES])
@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp"])
def test_debug_nans_raises_in_eager_transforms_as_in_jax(fun, transform):
    """Under `jax.debug_nans(True)` JAX raises FloatingPointError at the first
    primitive that makes a NaN; chainrule's eager transforms then evaluate on
    JAX too (not NumPy), so they raise where JAX does."""
    x = jnp.array([-1.0, 1.0])
    calls = {
        "grad": lambda m: m.grad(fun)(x),
        "vjp": lambda m: m.vjp(fun, x)[1](1.0),
        "jvp": lambda m: m.jvp(fun, (x,), (x,)),
    }
    with jax.debug_nans(True):
        for m in (jax, cr):
            with pytest.raises(FloatingPointError):
                calls[transform](m)
    # without the flag both answer, NaNs and all
    for got, want in zip(
        jax.tree_util.tree_leaves(calls[transform](cr)),
        jax.tree_util.tree_leaves(calls[transform](jax)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_debug_infs_raises_in_eager_transforms_as_in_jax():
    fun = lambda x: jnp.sum(1.0 / x)  # noqa: E731
    x = jnp.array([0.0, 2.0])
    with jax.debug_infs(True):
        for m in (jax, cr):
            with pytest.raises(FloatingPointError):
                m.grad(fun)(x)
    np.testing.assert_array_equal(cr.grad(fun)(x), jax.grad(fun)(x))


@pytest.mark.parametrize(
    "collective",
    [
        lambda w: lax.all_gather(w, "i") ** 2,
        lambda w: lax.psum(w, "i") * w,
        lambda w: lax.psum_scatter(jnp.outer(w, w), "i", tiled=True),
    ],
    ids=["all_gather", "psum", "psum_scatter"],
)
def test_vmap_with_a_named_axis_hands_back_jax_arrays(collective):
    """`jax.vmap(cr.grad(f), axis_name=...)` with a collective in `f`: the
    values of jax.grad's, as `jax.Array`s (a batching rule once handed a host
    cotangent back as a NumPy array)."""
    w = jnp.arange(8.0).reshape(2, 4) / 4.0
    f = lambda w: jnp.sum(jnp.sin(collective(w)))  # noqa: E731
    want = jax.vmap(jax.grad(f), axis_name="i")(w)
    for got in (
        jax.vmap(cr.grad(f), axis_name="i")(w),
        jax.jit(jax.vmap(cr.grad(f), axis_name="i"))(w),
    ):
        assert isinstance(got, jax.Array), type(got)
        np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize(
    "fun, x",
    [
        (lambda x: jnp.sum(jnp.exp(x * 1000.0)), jnp.array([1.0, 2.0])),  # inf values
        (lambda x: jnp.sum(jnp.sqrt(x)), jnp.array([0.0, 1.0, 2.0])),  # an inf derivative
    ],
    ids=["overflowing exp", "sqrt at 0"],
)
@pytest.mark.parametrize("flag", ["debug_nans", "debug_infs"])
def test_forward_mode_under_debug_flags_checks_the_tangents_only(fun, x, flag):
    """Forward mode transposes a backward pass run at zero cotangents, whose
    values (0 * inf) are never read: JAX's checks must not fire there, only
    where jax.jvp's own computation makes a NaN or inf."""
    t = jnp.ones_like(x)
    with getattr(jax, flag)(True):
        try:
            want = jax.jvp(fun, (x,), (t,))
        except FloatingPointError:
            with pytest.raises(FloatingPointError):
                cr.jvp(fun, (x,), (t,))
            return
        got = cr.jvp(fun, (x,), (t,))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12)


@pytest.mark.parametrize("reduce", [lax.pmax, lax.pmin], ids=["pmax", "pmin"])
def test_pmax_pmin_over_a_vmap_axis_eagerly_and_under_jit(reduce):
    """`pmax`/`pmin` over a `vmap` axis name (which `jax.grad` cannot
    differentiate) against the same loss written with `all_gather` and
    `jnp.max`/`jnp.min` under `jax.grad`; under `jit` chainrule's rule once
    bound a collective JAX rejects there."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3)), jnp.float32)
    w = jnp.ones(3, jnp.float32)
    extreme = jnp.max if reduce is lax.pmax else jnp.min
    score = lambda w, x: jnp.sum(jnp.tanh(x * w))  # noqa: E731

    def per_example(grad, loss):
        return lambda w, x: jax.vmap(grad(loss), in_axes=(None, 0), axis_name="b")(w, x)

    gathered = lambda w, x: extreme(lax.all_gather(score(w, x), "b"))  # noqa: E731
    want = per_example(jax.grad, gathered)(w, x)
    got = per_example(cr.grad, lambda w, x: reduce(score(w, x), "b"))
    np.testing.assert_allclose(got(w, x), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jax.jit(got)(w, x), want, rtol=1e-6, atol=1e-7)
    # second order: the gradient of the squared norm of the gradient of a loss
    # whose cotangent at the reduction depends on w (the sine): the rule's VJP,
    # its psum of that cotangent, differentiated again
    w2 = jnp.asarray(np.random.default_rng(4).normal(size=3), jnp.float32)

    def second(grad, loss):
        return per_example(grad, lambda w, x: jnp.sum(grad(loss)(w, x) ** 2))

    want = second(jax.grad, lambda w, x: jnp.sin(gathered(w, x)))(w2, x)
    got = second(cr.grad, lambda w, x: jnp.sin(reduce(score(w, x), "b")))
    np.testing.assert_allclose(got(w2, x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(got)(w2, x), want, rtol=1e-5, atol=1e-6)


_PLACEMENT = """
import jax, jax.numpy as jnp, chainrule as cr
jax.config.update("jax_num_cpu_devices", 2)
d1 = jax.devices()[1]
f = lambda x: jnp.sum(jnp.sin(x) ** 2)
x1 = jax.device_put(jnp.arange(3.0), d1)
for T in (jax, cr):
    g = T.grad(f)(x1)
    v, _ = T.value_and_grad(f)(x1)
    out, vjp_fn = T.vjp(jnp.sin, x1)
    y, t = T.jvp(jnp.sin, (x1,), (x1,))
    for a in (g, v, out, vjp_fn(out)[0], y, t):
        assert a.devices() == {d1} and a.committed, (T.__name__, a.devices())
    with jax.default_device(d1):
        g = T.grad(f)(jnp.arange(3.0))
    assert g.devices() == {d1}, (T.__name__, g.devices())
    assert T.grad(f)(jnp.arange(3.0)).devices() == {jax.devices()[0]}
print("ok")
"""


def test_eager_results_are_placed_where_jax_places_them():
    """As under `jax.grad`: the gradient of an array committed to a second CPU
    device lives there (committed), and under `jax.default_device` results go
    to that device; the NumPy path once handed them back on `jax.devices()[0]`.
    (A fresh process: the number of CPU devices is fixed when JAX starts.)"""
    run = subprocess.run([sys.executable, "-c", _PLACEMENT], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


_CONTEXTS = """
from jax._src import config as jax_config
from jax._src import core as jcore
from jax.experimental.compute_on import compute_on
from jax.experimental.xla_metadata import set_xla_metadata

from chainrule.engine.rules.calls import current_context

seen = [current_context()]
assert seen[0] is jcore.JaxprEqnContext()
flip = not jax_config.threefry_partitionable.value
with jax_config.threefry_partitionable(flip):
    seen.append(current_context())
    assert seen[-1] is jcore.JaxprEqnContext()
with compute_on("device_host"):
    seen.append(current_context())
    assert seen[-1] is jcore.JaxprEqnContext()
    with set_xla_metadata(priority="high"):
        seen.append(current_context())
        assert seen[-1] is jcore.JaxprEqnContext()
assert len({id(c) for c in seen}) == len(seen)  # (four settings, four contexts)
assert current_context() is seen[0]
print("ok")
"""


def test_the_remembered_equation_context_is_jaxs_under_each_setting():
    """`rules.calls.current_context` remembers JAX's interned equation context
    by `trace_context()`: under every setting that context reads (PRNG
    partitioning, `compute_on`, XLA metadata, nested) it is JAX's own object,
    so an equation traced under another one is still told apart. (In a
    process of its own: importing `compute_on` and `xla_metadata` registers
    primitives that `tests/test_registry_coverage.py` would then ask about.)"""
    run = subprocess.run([sys.executable, "-c", _CONTEXTS], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
