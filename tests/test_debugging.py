"""Gradient debugging: taps and hooks against the zero-perturbation trick under
`jax.grad`, and NaN provenance on the classic traps, eagerly, under `jit` and `vmap`."""

from __future__ import annotations

import functools
import re

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import chainrule as cr
from chainrule.errors import NonFiniteGradientError, TapError

MODES = {"eager": lambda f: f, "jit": jax.jit}


def mlp(params, x, tapping):
    """A two-layer net; `tapping(h, name)` marks the hidden layers."""
    h1 = tapping(jnp.tanh(x @ params["w1"]), "h1")
    h2 = tapping(jax.nn.relu(h1 @ params["w2"]), "h2")
    return jnp.sum((h2 @ params["w3"]) ** 2) + 0.1 * jnp.sum(h1)


def perturbed(params, x, eps):
    """The same net with zero perturbations added where the taps are."""
    return mlp(params, x, lambda h, name: h + eps[name])


def _params(key):
    k = jax.random.split(key, 4)
    params = {
        "w1": jax.random.normal(k[0], (3, 4)),
        "w2": jax.random.normal(k[1], (4, 5)),
        "w3": jax.random.normal(k[2], (5, 2)),
    }
    return params, jax.random.normal(k[3], (6, 3))


def _zeros_for_taps(x):
    return {"h1": jnp.zeros((x.shape[0], 4)), "h2": jnp.zeros((x.shape[0], 5))}


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16))
@pytest.mark.parametrize("mode", MODES)
def test_taps_equal_the_zero_perturbation_gradient(mode, seed):
    params, x = _params(jax.random.PRNGKey(seed))
    value, grads, taps = MODES[mode](cr.value_and_grad(lambda p, x: mlp(p, x, cr.tap), taps=True))(
        params, x
    )
    want_value, (want_grads, want_taps) = jax.value_and_grad(perturbed, argnums=(0, 2))(
        params, x, _zeros_for_taps(x)
    )
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    for k in params:
        np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-12, atol=1e-12)
    assert set(taps) == {"h1", "h2"}
    for k in taps:
        np.testing.assert_allclose(taps[k], want_taps[k], rtol=1e-12, atol=1e-12)


def test_per_example_taps_under_vmap():
    params, x = _params(jax.random.PRNGKey(1))

    def loss(p, xi):
        return mlp(p, xi[None], cr.tap)

    _, grads, taps = jax.vmap(cr.value_and_grad(loss, taps=True), (None, 0))(params, x)
    for i in range(x.shape[0]):
        eps = _zeros_for_taps(x[i : i + 1])
        want_g, want_t = jax.grad(perturbed, argnums=(0, 2))(params, x[i : i + 1], eps)
        np.testing.assert_allclose(taps["h1"][i], want_t["h1"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(taps["h2"][i], want_t["h2"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grads["w1"][i], want_g["w1"], rtol=1e-12, atol=1e-12)


def test_grad_with_taps_and_aux_returns_them_last():
    def loss(w):
        h = cr.tap(w * 2.0, "h")
        return jnp.sum(h**2), {"n": 3}

    g, aux, taps = cr.grad(loss, has_aux=True, taps=True)(jnp.arange(3.0))
    np.testing.assert_allclose(g, 8 * jnp.arange(3.0))
    np.testing.assert_allclose(taps["h"], 4 * jnp.arange(3.0))
    assert aux == {"n": 3}
    g, taps = cr.grad(lambda w: jnp.sum(cr.tap(w, "w") ** 3), taps=True)(jnp.ones(2))
    np.testing.assert_allclose(taps["w"], 3 * jnp.ones(2))


def test_a_pytree_tap_and_a_tapped_constant():
    def loss(w):
        pair = cr.tap({"a": w * 3.0, "b": jnp.sin(w)}, "pair")
        unused = cr.tap(jnp.ones(4), "constant")  # does not depend on w
        return jnp.sum(pair["a"]) + jnp.sum(pair["b"] ** 2) + 0.0 * jnp.sum(unused)

    w = jnp.array([0.5, -1.0])
    _, taps = cr.grad(loss, taps=True)(w)
    np.testing.assert_allclose(taps["pair"]["a"], jnp.ones(2))
    np.testing.assert_allclose(taps["pair"]["b"], 2 * jnp.sin(w))
    np.testing.assert_array_equal(taps["constant"], jnp.zeros(4))


def test_taps_cost_nothing_when_not_requested():
    params, x = _params(jax.random.PRNGKey(2))

    def plain(p, x):
        return mlp(p, x, lambda h, name: h)

    def tapped(p, x):
        return mlp(p, x, cr.tap)

    for transform in (cr.grad, jax.grad):  # a tap is an identity where nothing collects it
        want = jax.make_jaxpr(transform(plain))(params, x)
        got = jax.make_jaxpr(transform(tapped))(params, x)
        assert str(got) == str(want)
    hlo = lambda f: jax.jit(cr.grad(f)).lower(params, x).compile().as_text()  # noqa: E731
    count = lambda text: len(re.findall(r"^\s+\S+ = ", text, re.M))  # noqa: E731
    assert count(hlo(tapped)) == count(hlo(plain))


@pytest.mark.parametrize("mode", MODES)
def test_a_hook_clips_the_cotangent_like_a_custom_vjp(mode):
    @jax.custom_vjp
    def clip_grad(h):
        return h

    clip_grad.defvjp(lambda h: (h, None), lambda _, g: (jnp.clip(g, -0.5, 0.5),))

    def loss(w, clip):
        h = clip(jnp.sin(w) * 4.0)
        return jnp.sum(h**2)

    w = jnp.linspace(-1.0, 1.0, 5)
    hooked = lambda h: cr.tap(h, hook=lambda g: jnp.clip(g, -0.5, 0.5))  # noqa: E731
    got = MODES[mode](cr.grad(functools.partial(loss, clip=hooked)))(w)
    want = jax.grad(loss)(w, clip_grad)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # with a name too, the tap holds what reached it (before the hook)
    both = lambda h: cr.tap(h, "h", hook=lambda g: jnp.clip(g, -0.5, 0.5))  # noqa: E731
    g, taps = MODES[mode](cr.grad(functools.partial(loss, clip=both), taps=True))(w)
    np.testing.assert_allclose(g, want, rtol=1e-12)
    np.testing.assert_allclose(taps["h"], 2 * jnp.sin(w) * 4.0, rtol=1e-12)


def test_a_hook_that_returns_none_only_looks(capsys):
    seen = []
    g = cr.grad(lambda w: jnp.sum(cr.tap(w * 2.0, hook=seen.append) ** 2))(jnp.ones(2))
    np.testing.assert_allclose(g, 8 * jnp.ones(2))
    np.testing.assert_allclose(seen[0], 4 * jnp.ones(2))


def test_tap_mistakes_are_explained():
    with pytest.raises(TapError, match="a name .* or a hook"):
        cr.tap(jnp.ones(2))
    with pytest.raises(TapError, match="tapped twice"):
        cr.grad(lambda w: jnp.sum(cr.tap(w, "h") + cr.tap(w, "h")), taps=True)(jnp.ones(2))
    with pytest.raises(TapError, match="hook returned shape"):
        cr.grad(lambda w: jnp.sum(cr.tap(w, hook=lambda g: g.sum())))(jnp.ones(2))


# --- NaN provenance -----------------------------------------------------------------------


def where_sqrt(x):
    return jnp.sum(jnp.where(x > 0, jnp.sqrt(x), 0.0))  # the where trap


def norm(x):
    return jnp.linalg.norm(x)


def log_softmax_underflow(x):
    return jnp.sum(jnp.log(jax.nn.softmax(x)))


def self_division(x):
    return jnp.sum(x / x)


TRAPS = [
    (where_sqrt, np.array([0.0, 1.0, 4.0]), "sqrt", "double-where"),
    (norm, np.zeros(3), "sqrt", "zero vector"),
    (log_softmax_underflow, np.array([0.0, 800.0]), "log", "log_softmax"),
    (self_division, np.array([0.0, 2.0]), "div", "division by 0"),
]


def _line_of(fun) -> str:
    """`file:line` of the return statement of `fun` (where the trap is)."""
    code = fun.__code__
    return f"{code.co_filename}:{code.co_firstlineno + 1} ({code.co_name})"


@pytest.mark.parametrize("fun,x,prim,hint", TRAPS, ids=[t[0].__name__ for t in TRAPS])
def test_each_trap_is_reported_eagerly_with_its_primitive_and_line(fun, x, prim, hint):
    with pytest.raises(NonFiniteGradientError) as info:
        cr.grad(fun, check_finite=True)(x)
    text = str(info.value)
    assert f"non-finite cotangent at '{prim}'" in text
    assert _line_of(fun) in text
    assert hint in text
    for part in ("forward value:", "upstream cotangent:", "local derivative:", "sent on:"):
        assert part in text
    assert not np.all(np.isfinite(jax.grad(fun)(x)))  # JAX gives the NaN/inf silently


@pytest.mark.parametrize("fun,x,prim,hint", TRAPS, ids=[t[0].__name__ for t in TRAPS])
def test_each_trap_is_reported_under_jit(fun, x, prim, hint):
    with pytest.raises(Exception, match=f"non-finite cotangent at '{prim}'") as info:
        jax.jit(cr.grad(fun, check_finite=True))(x).block_until_ready()
    assert _line_of(fun) in str(info.value) and hint in str(info.value)


def test_the_first_non_finite_node_of_the_backward_pass_is_reported():
    def chain(x):
        y = jnp.sqrt(x)  # infinite derivative at 0: the culprit
        return jnp.sum(jnp.exp(y) * 2.0)  # later nodes see NaN/inf only downstream

    with pytest.raises(NonFiniteGradientError, match="at 'sqrt'"):
        cr.grad(chain, check_finite=True)(jnp.array([0.0, 1.0]))


@settings(max_examples=6, deadline=None)
@given(x=hnp.arrays(np.float64, (4,), elements=st.floats(0.1, 5.0)))
def test_finite_gradients_pass_the_check_unchanged(x):
    for fun, _, _, _ in TRAPS:
        got = cr.grad(fun, check_finite=True)(x)
        np.testing.assert_array_equal(got, cr.grad(fun)(x))  # the check changes nothing
        np.testing.assert_allclose(got, jax.grad(fun)(x), rtol=1e-12, atol=1e-12)
        jitted = CHECKED_JIT[fun.__name__](x)  # compiled once for all examples
        np.testing.assert_allclose(jitted, got, rtol=1e-12, atol=1e-12)


CHECKED_JIT = {fun.__name__: jax.jit(cr.grad(fun, check_finite=True)) for fun, *_ in TRAPS}


def test_the_readme_example_runs():
    import os

    from tests.conftest import ROOT

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = text.split("<!-- tested: debugging -->\n```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "README.md (debugging)", "exec"), namespace)  # noqa: S102
    assert namespace["per_example"]["hidden"].shape == (4, 1, 2)
