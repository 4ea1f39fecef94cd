"""The JAX-trace front end (`engine/jaxtrace.py`): jax.numpy code run eagerly
through chainrule's rules, the fast path of jaxpr replay for eager host calls.

Each test checks against jax.grad / jax.vjp. `replay_forbidden` makes falling
back to jaxpr replay of the whole function an error, so a passing test shows the fast path itself
computed the gradient; the fallback tests show the opposite direction.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import chainrule as cr
from chainrule.engine import host, jaxtrace, transforms
from tests.test_compositions import (
    ARGNUMS,
    SEEDS,
    Composition,
    assert_grads_match,
    check_finite,
    compositions,
    fuzz_settings,
    random_inputs,
)
from tests.test_jnp_coverage import FUNCTIONS, X, _scalar


@contextlib.contextmanager
def replay_forbidden():
    def refuse(*args, **kwargs):
        raise AssertionError("the JAX-trace front end fell back to jaxpr replay")

    with mock.patch.object(transforms, "_replay", refuse):
        yield


@contextlib.contextmanager
def replay_counted():
    calls = []
    original = transforms._replay

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with mock.patch.object(transforms, "_replay", counting):
        yield calls


@fuzz_settings(60)
@given(composition=compositions, seed=SEEDS)
def test_random_compositions_match_jax_without_replay(composition: Composition, seed: int):
    f = composition.function(jnp)
    inputs = random_inputs(seed)
    want = jax.grad(f, argnums=ARGNUMS)(*inputs)
    check_finite(want)
    with replay_forbidden():
        got = cr.grad(f, argnums=ARGNUMS)(*inputs)
    assert_grads_match(got, want, inputs)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_jnp_idioms_match_jax_without_replay(name):
    """cond/switch, scatter and gather (`.at[]`), jax.nn's custom_jvp functions, ..."""
    loss = _scalar(FUNCTIONS[name])
    with replay_forbidden():
        got = cr.value_and_grad(loss)(X)
    want = jax.value_and_grad(loss)(X)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, jax.Array) and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_relu_at_zero_follows_its_custom_jvp_rule():
    """jax.nn.relu's custom JVP rule gives 0 at 0, where max(x, 0)'s own rule
    would split the gradient (0.5): the fast path must use the custom rule."""

    def f(w1, w2, x):
        return jnp.sum(w2 * jax.nn.relu(w1 * x))

    args = (np.array([0.0, 1.0, -1.0]), np.array([2.0, 3.0, 4.0]), np.array([1.0, 1.0, 1.0]))
    with replay_forbidden():
        got = cr.grad(f, argnums=(0, 1))(*args)
    want = jax.grad(f, argnums=(0, 1))(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert float(got[0][0]) == 0.0


def test_custom_jvp_vjp_fn_can_be_called_twice():
    f = lambda w: jax.nn.softplus(w) * jax.nn.relu(w - 0.5)  # noqa: E731
    w = np.linspace(-1.0, 2.0, 7)
    with replay_forbidden():
        out, vjp_fn = cr.vjp(f, w)
        first = vjp_fn(jnp.ones(7))
        second = vjp_fn(2.0 * jnp.ones(7))
    want_out, want_vjp = jax.vjp(f, w)
    np.testing.assert_allclose(out, want_out, rtol=1e-12)
    np.testing.assert_allclose(first[0], want_vjp(jnp.ones(7))[0], rtol=1e-12)
    np.testing.assert_allclose(second[0], 2.0 * first[0], rtol=1e-12)


def test_users_jitted_function_with_a_custom_jvp_inside():
    @jax.jit
    def mlp(w, x):
        return jnp.mean(jax.nn.relu(x @ w) ** 2)

    w = np.linspace(-1.0, 1.0, 12).reshape(4, 3)
    x = np.linspace(-2.0, 2.0, 20).reshape(5, 4)
    with replay_forbidden():
        got = cr.value_and_grad(mlp)(w, x)
    want = jax.value_and_grad(mlp)(w, x)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-12)


def test_custom_vjp_falls_back_to_replay_and_uses_the_users_bwd():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * 100.0,))  # deliberately not cos
    w = np.array([0.1, 0.2])
    with replay_counted() as calls:
        got = cr.grad(lambda w: jnp.sum(f(w)))(w)
    assert calls, "custom_vjp is left to replay"
    np.testing.assert_array_equal(got, jax.grad(lambda w: jnp.sum(f(w)))(w))


def test_python_control_flow_on_a_value_still_gets_replays_explanation():
    def f(w):
        if jnp.sum(w) > 0:  # Python control flow on a differentiated value
            return jnp.sum(jnp.sin(w))
        return jnp.sum(w)

    with pytest.raises(cr.errors.UnrecordableJaxCallError, match="Python control flow"):
        cr.grad(f)(np.array([0.1, 0.2]))


@pytest.mark.parametrize(
    "case",
    ["host off", "jax.jit", "second order", "weakly typed input"],
)
def test_fast_path_is_only_taken_eagerly_on_host_values(case):
    f = lambda w: jnp.sum(jnp.tanh(w) ** 2)  # noqa: E731
    w = np.array([0.3, -0.7])
    want = jax.grad(f)(w)
    previous = host.set_enabled(case != "host off")
    try:
        with replay_counted() as calls:
            if case == "jax.jit":
                got = jax.jit(cr.grad(f))(w)
            elif case == "second order":
                got = cr.grad(lambda v: cr.grad(f)(v).sum())(w)
                want = jax.grad(lambda v: jax.grad(f)(v).sum())(w)
            elif case == "weakly typed input":
                got, want = cr.grad(f)(0.3), jax.grad(f)(0.3)
            else:
                got = cr.grad(f)(w)
    finally:
        host.set_enabled(previous)
    assert calls, f"{case}: jaxpr replay handles it"
    np.testing.assert_allclose(got, want, rtol=1e-12)
    with replay_forbidden():  # and eagerly on host values it is not needed
        np.testing.assert_allclose(cr.grad(f)(w), jax.grad(f)(w), rtol=1e-12)


def test_front_end_memo_is_shared_by_transforms_of_one_function_and_not_leaked():
    """`cr.grad(loss)(w)` written inline (a new transform each call) skips the
    failed dynamic attempt after the first call; the memo does not keep the
    function alive."""
    import gc
    import weakref

    runs = []

    def loss(w):
        runs.append(1)  # counts every run of the function body
        return jnp.sum(jnp.sin(w))

    w = np.array([0.1, 0.2])
    cr.grad(loss)(w)
    assert len(runs) == 2  # the dynamic attempt (fails at jnp.sin), then the JAX trace
    for _ in range(3):
        np.testing.assert_allclose(cr.grad(loss)(w), np.cos(w), rtol=1e-12)
    assert len(runs) == 5  # one run per call: straight to the JAX trace

    probe = weakref.ref(loss)
    del loss
    gc.collect()
    assert probe() is None


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_jnp_idioms_by_jaxpr_replay_on_host_values(name):
    """The same idioms with the JAX-trace front end switched off: replay's own
    evaluation of untraced equations on host values (NumPy, inlined calls)."""
    loss = _scalar(FUNCTIONS[name])
    with mock.patch.object(jaxtrace, "eligible", lambda *args: False), replay_counted() as calls:
        got = cr.value_and_grad(loss)(X)
    assert calls
    want = jax.value_and_grad(loss)(X)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_a_function_the_fast_path_cannot_run_goes_straight_to_replay_next_time():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))
    attempts = []
    original = jaxtrace.run

    def counting_run(fun, args):
        attempts.append(1)
        return original(fun, args)

    def loss(w):
        return jnp.sum(f(w) ** 2)

    w = np.array([0.1, 0.2])
    with mock.patch.object(jaxtrace, "run", counting_run), replay_counted() as replays:
        for _ in range(3):
            np.testing.assert_allclose(cr.grad(loss)(w), jax.grad(loss)(w), rtol=1e-12)
    assert len(attempts) == 1 and len(replays) == 3
