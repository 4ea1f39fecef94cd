"""Randomness, bits, placement, printing and callbacks inside a differentiated loss
(`chainrule.engine.rules.effects`), against `jax.grad` / `jax.vjp`.

* Randomness: dropout, noise injection and VAE reparameterisation with
  `jax.random`, old-style (`PRNGKey`) and new-style (`jax.random.key`) keys,
  eager, under `jit` and `vmap`, first and second order (the oracle).
* Bits: shifts, `population_count`, `clz` and `bitcast_convert_type` next to
  a differentiated path.
* Placement: `device_put`, `sharding_constraint`, `copy`, `optimization_barrier`,
  `set_xla_metadata` pass the cotangent through; `compute_on`'s body is
  differentiated inline (results in another memory space are refused, as by
  `jax.grad`).
* Printing and callbacks: `jax.debug.print` and `jax.debug.callback` see what
  they see under `jax.grad` (captured stdout and callback arguments compared);
  `pure_callback` / `io_callback` on values that need no gradient run, on
  values that do they raise JAX's `ValueError`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src.core import MemorySpace  # (compute_on's memory spaces; JAX 0.10, pinned)
from jax.experimental import checkify, io_callback
from jax.experimental.compute_on import compute_on2
from jax.experimental.xla_metadata import set_xla_metadata
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

import chainrule as cr
from chainrule.engine.rules import PRIMITIVES
from tests.oracle import check_against_jax, emitted

KEYS = {"PRNGKey": lambda s: jax.random.PRNGKey(s), "key": lambda s: jax.random.key(s)}


def _params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(6, 5)), dtype), jnp.asarray(rng.normal(size=(4, 6)), dtype)


# --- randomness ---------------------------------------------------------------------------


def dropout_loss(w, x, key, rate=0.3):
    h = jnp.tanh(x @ w)
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    h = jnp.where(keep, h / (1.0 - rate), 0.0)
    return jnp.sum(h**2)


def noise_loss(w, x, key):
    k1, k2 = jax.random.split(key)
    noisy = x + 0.1 * jax.random.normal(k1, x.shape, x.dtype)
    scale = jax.random.uniform(jax.random.fold_in(k2, 3), (w.shape[1],), w.dtype, 0.5, 1.5)
    return jnp.mean(jnp.sin(noisy @ w) * scale)


def vae_loss(w, x, key):
    """Reparameterisation: z = mu + sigma * eps, a Gaussian KL and a decoder."""
    mu, logvar = x @ w, jnp.tanh(x @ w) - 1.0
    eps = jax.random.normal(key, mu.shape, mu.dtype)
    z = mu + jnp.exp(0.5 * logvar) * eps
    kl = -0.5 * jnp.sum(1.0 + logvar - mu**2 - jnp.exp(logvar))
    return jnp.sum((z @ w.T - x) ** 2) + kl


@pytest.mark.parametrize("key_style", sorted(KEYS))
def test_vae_reparameterisation_matches_jax(key_style):
    """The oracle (values, first and second order, eager, jit; vmap for one style)."""
    w, x = _params(jnp.float64)
    key = KEYS[key_style](3)
    names = emitted(vae_loss, w, x, key)
    assert "random_bits" in names
    assert ("random_wrap" in names) == (key_style == "PRNGKey")
    modes = ("eager", "jit", "vmap") if key_style == "key" else ("eager", "jit")
    check_against_jax(vae_loss, w, x, key, argnums=(0, 1), modes=modes)


@pytest.mark.parametrize(
    "key_style, dtype",
    [("PRNGKey", jnp.float64), ("key", jnp.float64), ("key", jnp.float32)],
)
def test_dropout_and_noise_match_jax(key_style, dtype):
    w, x = _params(dtype)
    key = KEYS[key_style](5)
    for loss in (dropout_loss, noise_loss):
        assert {"random_bits", "shift_right_logical"} <= emitted(loss, w, x, key)
        for wrap in (lambda f: f, jax.jit):
            got = wrap(cr.grad(loss, argnums=(0, 1)))(w, x, key)
            want = jax.grad(loss, argnums=(0, 1))(w, x, key)
            for g, v in zip(got, want, strict=True):
                assert g.dtype == v.dtype == dtype
                np.testing.assert_allclose(g, v, **_tol(dtype))


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == jnp.float64 else dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("key_style", sorted(KEYS))
def test_keys_made_split_and_unwrapped_inside_the_loss(key_style):
    """random_seed, random_split, random_fold_in, random_unwrap, random_clone inside a loss."""

    def loss(w, seed):
        key = jax.random.key(seed) if key_style == "key" else jax.random.PRNGKey(seed)
        keys = jax.random.split(jax.random.clone(key), 3)
        data = jax.random.key_data(jax.random.fold_in(keys[1], 7))
        bits = jax.random.bits(keys[2], (5,), jnp.uint32)
        frac = (bits >> 8).astype(w.dtype) / 2.0**24
        return jnp.sum(jnp.sin(w) * frac) + jnp.sum(w * data[0].astype(w.dtype) * 1e-10)

    w, seed = jnp.linspace(-1.0, 1.0, 5), jnp.int32(4)
    names = emitted(loss, w, seed)
    assert {"random_seed", "random_split", "random_fold_in", "random_unwrap", "random_bits"} <= (
        names
    )
    check_against_jax(loss, w, seed, argnums=(0,), modes=("eager", "jit"))


def test_random_bits_primitives_are_in_the_table_and_not_differentiable():
    for name in (
        "random_seed random_bits random_wrap random_unwrap random_split random_fold_in "
        "random_clone threefry2x32 shift_left shift_right_logical shift_right_arithmetic "
        "population_count clz bitcast_convert_type"
    ).split():
        assert not PRIMITIVES[name].differentiable, name


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_bit_operations_beside_a_differentiated_path(dtype):
    """The bits of x (shifts, population_count, clz) scale x; no gradient flows
    through the bits, as in JAX."""
    uint = jnp.uint64 if dtype == jnp.float64 else jnp.uint32
    sint = jnp.int64 if dtype == jnp.float64 else jnp.int32

    def f(x):
        bits = lax.bitcast_convert_type(x, uint)
        signed = lax.bitcast_convert_type(x, sint)
        count = lax.population_count(bits) + lax.clz(bits >> uint(40 if uint == jnp.uint64 else 20))
        mixed = lax.shift_left(bits, uint(3)) ^ lax.shift_right_arithmetic(signed, sint(2)).astype(
            uint
        )
        return x * count.astype(dtype) + jnp.sin(x) * (mixed % uint(7)).astype(dtype)

    x = jnp.linspace(0.3, 2.0, 7).astype(dtype)
    names = emitted(f, x)
    assert {
        "bitcast_convert_type",
        "population_count",
        "clz",
        "shift_left",
        "shift_right_logical",
        "shift_right_arithmetic",
    } <= names
    check_against_jax(f, x, modes=("jit",) if dtype == jnp.float32 else ("eager", "jit"))


# --- placement ------------------------------------------------------------------------------


def _one_device_mesh():
    return Mesh(np.array(jax.devices()[:1]), ("data",))


PLACEMENTS = {
    "device_put": (lambda x: jax.device_put(x), "device_put"),
    "device_put to a device": (lambda x: jax.device_put(x, jax.devices()[0]), "device_put"),
    "device_put of a tuple": (lambda x: jax.device_put((x, 2.0 * x))[1], "device_put"),
    "sharding_constraint (single device)": (
        lambda x: lax.with_sharding_constraint(x, SingleDeviceSharding(jax.devices()[0])),
        "sharding_constraint",
    ),
    "sharding_constraint (named)": (
        lambda x: lax.with_sharding_constraint(
            x, NamedSharding(_one_device_mesh(), PartitionSpec("data"))
        ),
        "sharding_constraint",
    ),
    "copy": (lambda x: jnp.copy(x), "copy"),
    "optimization_barrier": (
        lambda x: lax.optimization_barrier((x, jnp.cos(x)))[0] * 3.0,
        "optimization_barrier",
    ),
    "xla metadata": (lambda x: set_xla_metadata(x, tag="a") * x, "xla_metadata_value"),
    "compute_on the host": (
        lambda x: _on_host(lambda y, z: (jnp.cos(y) * y, z * z))(x, 2.0 * x)[0] * x,
        "compute_on",
    ),
}


def _on_host(f, spaces=MemorySpace.Device):
    return compute_on2(f, compute_type="device_host", out_memory_spaces=spaces)


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_placement_passes_the_cotangent_through(name):
    place, prim = PLACEMENTS[name]

    def f(x):
        return jnp.sin(place(jnp.tanh(x) * x))

    x = jnp.linspace(-1.0, 1.0, 4)
    assert prim in emitted(f, x)
    modes = ("eager", "jit", "vmap") if name in ("device_put", "copy") else ("eager", "jit")
    check_against_jax(f, x, modes=modes)
    x32 = x.astype(jnp.float32)
    for wrap in (lambda f: f, jax.jit):
        got, want = wrap(cr.grad(lambda x: f(x).sum()))(x32), jax.grad(lambda x: f(x).sum())(x32)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, **_tol(jnp.float32))


def test_xla_metadata_stays_on_the_value_under_jit():
    """The value keeps its XLA attributes in the program `jit` stages; the
    cotangent passes through without them, as in JAX."""

    def f(x):
        return jnp.sum(jnp.sin(set_xla_metadata(x * 2.0, tag="kept")))

    jaxpr = jax.make_jaxpr(cr.grad(f))(jnp.ones(3))
    params = [e.params for e in jaxpr.eqns if e.primitive.name == "xla_metadata_value"]
    assert params == [{"xla_metadata_kvs": (("tag", "kept"),)}]


def test_compute_on_results_in_host_memory_are_refused():
    """Results of a differentiated `compute_on` asked for in host memory: refused
    with the reason and the fix (`jax.grad` refuses them too)."""
    g = _on_host(lambda y: jnp.cos(y) * y, MemorySpace.Host)
    x = jnp.linspace(-1.0, 1.0, 3)
    with pytest.raises(ValueError):
        jax.grad(lambda x: jnp.sum(g(x)))(x)
    with pytest.raises(ValueError, match=r"out_memory_spaces=.*Host.*device memory"):
        cr.grad(lambda x: jnp.sum(g(x)))(x)


# --- printing and callbacks ----------------------------------------------------------------


_NUMBER = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?")


def _printing_loss(w, x):
    h = jnp.tanh(x @ w)
    jax.debug.print("h[0] = {h}, sum {s:.6f}", h=h[0], s=jnp.sum(h))
    loss = jnp.mean(h**2)
    jax.debug.print("loss = {}", loss)
    return loss


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_debug_print_prints_what_jax_grad_prints(capfd, jit):
    w, x = _params(jnp.float64)
    assert "debug_print" in emitted(_printing_loss, w, x)
    wrap = jax.jit if jit else (lambda f: f)

    want = wrap(jax.grad(_printing_loss))(w, x)
    jax.effects_barrier()
    want_out = capfd.readouterr().out
    got = wrap(cr.grad(_printing_loss))(w, x)
    jax.effects_barrier()
    got_out = capfd.readouterr().out

    assert "loss = " in want_out
    # The same text; the numbers to float64 rounding (eagerly chainrule computes
    # with NumPy, whose sums may round differently in the last bit).
    assert _NUMBER.sub("#", got_out) == _NUMBER.sub("#", want_out)
    got_numbers = [float(v) for v in _NUMBER.findall(got_out)]
    want_numbers = [float(v) for v in _NUMBER.findall(want_out)]
    np.testing.assert_allclose(got_numbers, want_numbers, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("ordered", [False, True])
def test_debug_callback_sees_the_primal_values(jit, ordered):
    seen = {"cr": [], "jax": []}

    def loss_for(who):
        def loss(w, x):
            h = jnp.sin(x @ w)
            jax.debug.callback(
                lambda a, b: seen[who].append((np.asarray(a), float(b))),
                h,
                jnp.sum(h),
                ordered=ordered,
            )
            return jnp.sum(h**2)

        return loss

    w, x = _params(jnp.float64)
    assert "debug_callback" in emitted(loss_for("jax"), w, x)
    wrap = jax.jit if jit else (lambda f: f)
    want = wrap(jax.grad(loss_for("jax")))(w, x)
    got = wrap(cr.grad(loss_for("cr")))(w, x)
    jax.effects_barrier()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert len(seen["cr"]) == len(seen["jax"]) == 1
    # (eagerly chainrule computes with NumPy: equal to float64 rounding)
    np.testing.assert_allclose(seen["cr"][0][0], seen["jax"][0][0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(seen["cr"][0][1], seen["jax"][0][1], rtol=1e-12, atol=1e-12)


def _checked_log(x):
    checkify.check(jnp.all(x > 0), "x must be positive, got {}", x[0])
    return jnp.sum(jnp.log(x) ** 2)


def _checked_in_a_scan(x):
    def step(c, xi):
        checkify.check(xi > 0, "xi = {} is not positive", xi)
        return c + jnp.log(xi) * c, None

    return lax.scan(step, 1.0, x)[0]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["passes", "fails"])
def test_checkify_checks_see_the_primal_values(jit, sign):
    wrap = jax.jit if jit else (lambda f: f)
    x = jnp.asarray([1.0, 2.0]) * sign
    assert "check" in emitted(_checked_log, jnp.abs(x))
    for transform in (cr.grad, cr.hessian):
        err, got = wrap(checkify.checkify(transform(_checked_log)))(x)
        want_err, want = checkify.checkify(getattr(jax, transform.__name__)(_checked_log))(x)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert err.get() == want_err.get()
    # a check in a scan step: jax.grad drops it (err.get() is None for negative
    # x); chainrule reports it, as jax.jvp does
    err, _ = wrap(checkify.checkify(cr.grad(_checked_in_a_scan)))(x)
    want_err, _ = checkify.checkify(lambda x: jax.jvp(_checked_in_a_scan, (x,), (x,)))(x)
    assert want_err.get() == (None if sign > 0 else "xi = -1.0 is not positive (`check` failed)")
    assert err.get() == want_err.get()


def _int_division(x):  # (checkify checks integer division)
    return jnp.sum(x**2) + jnp.sum(jnp.int32(2) // (x - 1.0).astype(jnp.int32))


AUTOMATIC_CHECKS = {
    # (loss, an input where its check fails, the errors checkify looks for)
    "nan": (lambda x: jnp.sum(jnp.log(x) ** 2), [-1.0, 2.0], checkify.float_checks),
    "division": (_int_division, [1.0, 2.0], checkify.div_checks),
    "index": (lambda x: x[jnp.int32(5)] * x[0] ** 2, [1.0, 2.0], checkify.index_checks),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", sorted(AUTOMATIC_CHECKS))
def test_checkify_automatic_checks_see_the_transform(case, jit):
    # checkify stages the function closed over its concrete arguments: the
    # operations chainrule evaluates must be staged there too (not computed
    # with NumPy), or the checks checkify adds to them never run
    loss, x, errors = AUTOMATIC_CHECKS[case]
    x = jnp.asarray(x, jnp.float32)
    wrap = jax.jit if jit else (lambda f: f)
    for transform in (cr.grad, cr.hessian):
        err, got = wrap(checkify.checkify(transform(loss), errors=errors))(x)
        jax_transform = getattr(jax, transform.__name__)
        want_err, want = checkify.checkify(jax_transform(loss), errors=errors)(x)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert want_err.get() is not None and err.get() is not None
        if transform is cr.grad:  # (second order: which gather fails first may differ)
            assert err.get() == want_err.get()


def _host_square(a):
    return np.asarray(a) ** 2


CALLBACKS = {
    "pure_callback": lambda v: jax.pure_callback(
        _host_square, jax.ShapeDtypeStruct(v.shape, v.dtype), v
    ),
    "io_callback": lambda v: io_callback(_host_square, jax.ShapeDtypeStruct(v.shape, v.dtype), v),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_callback_on_values_without_gradient_runs(name, jit):
    callback = CALLBACKS[name]

    def loss(w, x):
        scale = callback(lax.stop_gradient(jnp.sum(w)) + x)  # no gradient flows into it
        return jnp.sum(jnp.sin(w) * scale)

    w, x = jnp.linspace(0.1, 1.0, 3), jnp.linspace(-1.0, 1.0, 3)
    assert name in emitted(loss, w, x)
    wrap = jax.jit if jit else (lambda f: f)
    np.testing.assert_allclose(
        wrap(cr.grad(loss))(w, x), jax.grad(loss)(w, x), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_differentiating_through_a_callback_raises_jax_error(name, jit):
    callback = CALLBACKS[name]

    def loss(w):
        return jnp.sum(callback(jnp.sin(w)))

    w = jnp.linspace(0.1, 1.0, 3)
    wrap = jax.jit if jit else (lambda f: f)
    with pytest.raises(ValueError) as want:
        wrap(jax.grad(loss))(w)
    with pytest.raises(ValueError, match="do not support JVP") as got:
        wrap(cr.grad(loss))(w)
    assert type(want.value) is ValueError
    message = str(got.value)
    assert name in message and "test_runtime_rules.py" in message
    assert "custom_vjp" in message and "stop_gradient" in message
    assert str(want.value).split(" ")[:5] == message.split(" ")[:5]  # "Pure callbacks do not ..."
