"""Users' own `jax.custom_jvp` / `jax.custom_vjp` functions, in the idioms of
JAX's own custom-derivative tests (`tests/custom_api_test.py`), against
`jax.grad`/`jax.jvp` eagerly, under `jit`, `vmap` and at second order."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental.ode import odeint

import chainrule as cr


def _modes(fun, *args, argnums=0):
    """`fun`'s gradient by JAX and by chainrule: eager, jit, and vmapped over
    the first argument (a batch of 2)."""
    batch = [jnp.stack([a, a * 0.5]) if i == 0 else a for i, a in enumerate(args)]
    axes = [0 if i == 0 else None for i in range(len(args))]
    for want, got in (
        (jax.grad(fun, argnums)(*args), cr.grad(fun, argnums)(*args)),
        (jax.grad(fun, argnums)(*args), jax.jit(cr.grad(fun, argnums))(*args)),
        (
            jax.vmap(jax.grad(fun, argnums), axes)(*batch),
            jax.vmap(cr.grad(fun, argnums), axes)(*batch),
        ),
    ):
        for w, g in zip(
            jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True
        ):
            np.testing.assert_allclose(g, w, rtol=1e-6)


def _same_answers_and_rule_calls(call, seen: list) -> None:
    """`call(jax)` and `call(cr)` agree, and the user's rule, which appends
    what it saw to `seen`, saw the same in both."""
    seen.clear()
    want, want_seen = call(jax), list(seen)
    seen.clear()
    got = call(cr)
    assert seen == want_seen
    for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_closure_convert_hoists_closed_over_differentiated_values():
    """`jax.closure_convert` hoists the closed-over values that may carry a
    tangent, so a custom_vjp written with it differentiates them through its
    rule: chainrule's traced values count (they were left in the closure,
    whose gradient was silently zero)."""

    @partial(jax.custom_vjp, nondiff_argnums=(0,))
    def cos_after(fn, x, *args):
        return jnp.cos(fn(x, *args))

    def fwd(fn, x, *args):
        return cos_after(fn, x, *args), (x, args)

    def bwd(fn, res, g):
        x, args = res
        return (17.0 * x * g, *[42.0 * a * g for a in args])

    cos_after.defvjp(fwd, bwd)

    def solve(c, x):
        conv, consts = jax.closure_convert(lambda x: jnp.sum((x - c) ** 2.0), x)
        return jnp.sum(cos_after(conv, x, *consts))

    c, x = 2.0 * jnp.ones(2), jnp.ones(2)
    _modes(solve, c, x, argnums=(0, 1))


def test_odeint_differentiates_parameters_its_dynamics_close_over():
    """`odeint` closure-converts its dynamics: a parameter they close over gets
    its gradient through the adjoint (chainrule raised JAX's CustomVJPException)."""

    def loss(a, y0):
        ys = odeint(lambda y, t: -a * y + jnp.sin(t), y0, jnp.array([0.0, 0.5, 1.0]))
        return jnp.sum(ys[-1] ** 2)

    a, y0 = jnp.asarray(0.5), jnp.array([1.0, 2.0])
    for want, got in (
        (jax.grad(loss, (0, 1))(a, y0), cr.grad(loss, (0, 1))(a, y0)),
        (jax.grad(loss, (0, 1))(a, y0), jax.jit(cr.grad(loss, (0, 1)))(a, y0)),
    ):
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6)


def test_a_custom_vjp_output_computed_from_python_numbers_is_differentiated_by_bwd():
    """fwd may compute the output without the differentiated inputs (here from
    a Python number alone): it is still the call's output, and bwd gives the
    gradient (it was silently zero: a Python float was not traced)."""

    @jax.custom_vjp
    def f(x, c=1.0):
        return c * x

    f.defvjp(lambda x, c=1.0: (c * c, None), lambda _, g: (g, g))

    def loss(x):
        return jnp.square(f(x, c=2.0)) + x

    _modes(loss, jnp.asarray(3.0))
    np.testing.assert_allclose(cr.vjp(lambda x: f(x, 2.0), 10.0)[1](1.0), (1.0,))


def test_a_custom_jvp_rule_applying_the_function_to_its_tangent():
    """A linear function whose rule is the function itself on the tangent:
    reverse mode transposes the rule, in which the function applied to a
    tangent is its body (JAX's linearization keeps no custom rule), not the
    rule again (a RecursionError)."""

    @jax.custom_jvp
    def neg(x):
        return -x

    @neg.defjvp
    def neg_jvp(primals, tangents):
        return neg(primals[0]), neg(tangents[0])

    @jax.custom_jvp
    def scale(x, y):
        return x / y

    @scale.defjvp
    def scale_jvp(primals, tangents):
        x, y = primals
        x_dot, y_dot = tangents
        return scale(x, y), scale(x_dot, y) - x * y_dot / y**2

    def loss(x, y):
        z = lax.scan(lambda c, _: (neg(c) * 0.9, None), x, None, length=3)[0]
        return jnp.sin(scale(z, y)) ** 2

    x, y = jnp.asarray(3.0), jnp.asarray(1.5)
    _modes(loss, x, y, argnums=(0, 1))
    np.testing.assert_allclose(cr.hessian(loss)(x, y), jax.hessian(loss)(x, y), rtol=1e-6)
    got, want = cr.jvp(loss, (x, y), (1.0, 0.5)), jax.jvp(loss, (x, y), (1.0, 0.5))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("x64", [False, True])
def test_closure_convert_of_a_function_without_traced_closures_hoists_nothing(x64):
    """The other side of the perturbed test: constants that are not
    differentiated stay in the closure, as under jax.grad."""
    data = np.arange(3.0)
    with jax.enable_x64(x64):
        x = jnp.ones(3)
        conv, consts = jax.closure_convert(lambda x: jnp.sum(x * data), x)
        assert len(consts) == 0

        def under(x):
            conv, consts = jax.closure_convert(lambda y: jnp.sum(y * x * data), x)
            assert len(consts) == 1  # x, traced by the transform, is hoisted
            return conv(x, *consts)

        np.testing.assert_allclose(cr.grad(under)(x), jax.grad(under)(x), rtol=1e-6)


def test_a_symbolic_zeros_rule_gets_symbolic_zeros_for_what_is_not_differentiated():
    """`defjvp(..., symbolic_zeros=True)`: the rule sees JAX's SymbolicZero as
    the tangent of each argument the transform does not differentiate (a
    constant, or an argument outside argnums), in forward and reverse mode."""
    seen = []

    @jax.custom_jvp
    def f(c, x):
        return c * jnp.sin(x)

    def f_jvp(primals, tangents):
        (c, x), (tc, tx) = primals, tangents
        seen.append(tuple(type(t) is jax.custom_derivatives.SymbolicZero for t in tangents))
        tc = jnp.zeros_like(c) if type(tc) is jax.custom_derivatives.SymbolicZero else tc
        tx = jnp.zeros_like(x) if type(tx) is jax.custom_derivatives.SymbolicZero else tx
        return f(c, x), tc * jnp.sin(x) + c * jnp.cos(x) * tx

    f.defjvp(f_jvp, symbolic_zeros=True)
    x, c = jnp.asarray(0.3), jnp.asarray(2.0)
    for call in (
        lambda m: m.grad(lambda x: f(2.0, x))(x),
        lambda m: m.grad(f, argnums=1)(c, x),
        lambda m: m.grad(f, argnums=0)(c, x),
        lambda m: m.grad(f, argnums=(0, 1))(c, x),
        lambda m: m.jvp(lambda x: f(2.0, x), (x,), (1.0,)),
    ):
        _same_answers_and_rule_calls(call, seen)


def test_a_rule_tangent_of_another_shape_than_the_output_is_refused():
    """A custom_jvp rule's tangent must have its output's shape (JAX's check).
    Under `jax.vmap` a function whose output ignores the batched input gives an
    unbatched output beside a batched tangent: JAX answers with the rule's
    batched primal, chainrule (which takes the output from the function)
    refuses with the same TypeError and the fix, instead of a gradient of
    the wrong shape."""

    @jax.custom_jvp
    def f(x):
        return np.zeros(x.shape, x.dtype)

    f.defjvp(lambda p, t: (f(p[0]), t[0]))
    x = jnp.arange(3.0)
    with pytest.raises(TypeError, match="corresponding shapes"):
        cr.grad(lambda x: jax.vmap(f)(x).sum())(x)

    @jax.custom_jvp
    def g(x):
        return x * 0.0  # computed from x: batched with it

    g.defjvp(lambda p, t: (g(p[0]), t[0]))
    loss = lambda x: jax.vmap(g)(x).sum()  # noqa: E731
    np.testing.assert_allclose(cr.grad(loss)(x), jax.grad(loss)(x))


def test_a_symbolic_zeros_bwd_gets_symbolic_zeros_for_outputs_no_cotangent_reached():
    """`defvjp(..., symbolic_zeros=True)`: bwd sees JAX's SymbolicZero as the
    cotangent of each output the loss does not use, and fwd sees which inputs
    are differentiated (`x.perturbed`), as under jax.grad."""
    seen = []

    @jax.custom_vjp
    def f(x, y):
        return x * y, jnp.sin(x)

    def fwd(x, y):
        return f(x.value, y.value), (x.value, y.value)

    def bwd(res, g):
        (x, y), (g1, g2) = res, g
        seen.append(tuple(type(t) is jax.custom_derivatives.SymbolicZero for t in g))
        g1 = jnp.zeros_like(x) if type(g1) is jax.custom_derivatives.SymbolicZero else g1
        g2 = jnp.zeros_like(x) if type(g2) is jax.custom_derivatives.SymbolicZero else g2
        return g1 * y + g2 * jnp.cos(x), g1 * x

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    x, y = jnp.asarray(0.3), jnp.asarray(2.0)
    for call in (
        lambda m: m.grad(lambda x, y: f(x, y)[0], (0, 1))(x, y),
        lambda m: m.grad(lambda x, y: f(x, y)[1])(x, y),
        lambda m: m.grad(lambda x, y: f(x, y)[0] + f(x, y)[1])(x, y),
        lambda m: jax.jit(m.grad(lambda x, y: f(x, y)[1]))(x, y),
    ):
        _same_answers_and_rule_calls(call, seen)


def test_a_custom_jvp_closing_over_a_differentiated_value_raises_jaxs_error():
    """JAX raises UnexpectedTracerError for a custom_jvp function that closes
    over a value being differentiated; so does chainrule (it leaked JAX's
    internal 'Store occupied' error), with the fix in the message."""

    def f(w, x):
        @jax.custom_jvp
        def g(x):
            return x * w

        g.defjvp(lambda p, t: (p[0] * w, t[0] * w * 2))
        return jnp.sum(g(x))

    x = jnp.arange(1.0, 4.0)
    for grad in (jax.grad, cr.grad):
        with pytest.raises(jax.errors.UnexpectedTracerError):
            grad(f, argnums=(0, 1))(2.0, x)
    with pytest.raises(jax.errors.UnexpectedTracerError, match="pass the value as an argument"):
        cr.grad(f, argnums=(0, 1))(2.0, x)


def test_custom_jvp_with_a_python_bool_output_and_symbolic_zero_tangent():
    """Eagerly a `custom_jvp` function may return a Python bool beside arrays
    (diffrax's steady-state event does); its rule answers a `SymbolicZero`
    tangent for it, which chainrule instantiated with a zero of the bool's
    dtype and raised AttributeError (a Python bool has no `.dtype`)."""
    from jax.custom_derivatives import SymbolicZero

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x), True

    def f_jvp(primals, tangents):
        (x,), (tx,) = primals, tangents
        out = f(x)
        return out, (jnp.cos(x) * tx, SymbolicZero(jax.typeof(out[1]).to_tangent_aval()))

    f.defjvp(f_jvp, symbolic_zeros=True)
    loss = lambda x: jnp.sum(f(x)[0]) * (2.0 if f(x)[1] else 1.0)
    x = jnp.array([0.1, 0.2])
    np.testing.assert_allclose(cr.grad(loss)(x), jax.grad(loss)(x), rtol=1e-6)


def _sampler(a):
    return 2.0 * a * jnp.sin(a)


@jax.custom_jvp
def _resampled(a):
    return _sampler(a)


@_resampled.defjvp
def _resampled_jvp(primals, tangents):
    """A rule that recomputes its primal by the function's code and gives a
    tangent that is not that code's derivative (an implicit reparameterization
    gradient, as TFP's gamma sampler's)."""
    (a,), (da,) = primals, tangents
    out = _sampler(a) + 0.0
    return out, (out / a + 1.0) * da


@pytest.mark.parametrize(
    "second",
    [
        lambda f: cr.hessian(f),
        lambda f: jax.jit(cr.hessian(f)),
        lambda f: cr.jacrev(cr.grad(f)),
        lambda f: cr.jacfwd(cr.grad(f)),
        lambda f: jax.jacrev(cr.grad(f)),
        lambda f: jax.jacfwd(cr.grad(f)),
        lambda f: cr.jacrev(jax.grad(f)),
        lambda f: lambda x: jax.vmap(cr.hessian(f))(x[None])[0],
    ],
    ids=["hessian", "jit", "rev-rev", "fwd-rev", "jax-rev", "jax-fwd", "rev-jax", "vmap"],
)
def test_second_order_differentiates_the_rules_primal(second):
    """At second order JAX's inner level hands the rule's primal outputs to the
    outer one, which differentiates the code that computed them (here the
    sampler, not the function through its rule again): the Hessian of a loss
    of TFP's reparameterized gamma samples depends on it."""
    f = lambda a: jnp.sum(_resampled(a) ** 2 / 2)  # noqa: E731
    x = jnp.asarray([1.0, 0.7, -1.3])
    np.testing.assert_allclose(second(f)(x), jax.hessian(f)(x), rtol=1e-6, atol=1e-6)


def _sin_with_rule(rule):
    """`sin` with the JVP rule `rule(x, t)` (the tangent map under test)."""

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), rule(x, t)

    return f


_A = jnp.asarray(np.arange(9.0).reshape(3, 3) / 10 + 2 * np.eye(3))
NONLINEAR_RULES = {
    "square": lambda x, t: t**2,
    "clip": lambda x, t: jnp.clip(t, -1, 1),
    "product of tangents": lambda x, t: t * t,
    "divided by a tangent": lambda x, t: t / jnp.sum(t),
    "sin of the tangent": lambda x, t: jnp.sin(t),
    "relu of the tangent": lambda x, t: jax.nn.relu(t),
    "maximum": lambda x, t: jnp.maximum(t, 0) + jnp.minimum(t, 0),
    "norm": lambda x, t: t * jnp.linalg.norm(t),
    "where on the tangent": lambda x, t: jnp.where(t > 0, t, 0.0),
    "sign": lambda x, t: jnp.sign(t) * jnp.cos(x),
    "stop_gradient, then scaled": lambda x, t: lax.stop_gradient(t) * 2.0,
    "stop_gradient, added": lambda x, t: t + lax.stop_gradient(t) * 2.0 * jnp.cos(x),
}
LINEAR_RULES = {
    "scaled": lambda x, t: t * jnp.cos(x),
    "where on the primal": lambda x, t: jnp.where(x > 0, t, 0.0),
    "matrix product": lambda x, t: _A @ t,
    "cumsum": lambda x, t: jnp.cumsum(t) * jnp.cos(x),
    "sum, broadcast": lambda x, t: jnp.sum(t) * jnp.ones_like(x),
    "divided by the primal": lambda x, t: t / (jnp.cos(x) + 2),
    "gather by the primal's order": lambda x, t: t[jnp.argsort(x)],
    "fft round trip": lambda x, t: jnp.real(jnp.fft.ifft(jnp.fft.fft(t))),
    "scatter at the primal's argmax": lambda x, t: t.at[jnp.argmax(x)].multiply(3.0),
    "solve": lambda x, t: jnp.linalg.solve(_A, t),
    "scan": lambda x, t: lax.scan(lambda c, a: (c * 0.5 + a, c), 0.0, t)[1],
    "cond on the primal": lambda x, t: lax.cond(x[0] > 0, lambda u: 2 * u, lambda u: -u, t),
    "jit helper": lambda x, t: jax.jit(lambda u: u * 3.0)(t),
    "complex detour": lambda x, t: jnp.real(t * (1 + 2j)),
    "checkpoint": lambda x, t: jax.checkpoint(lambda u: u * 2.0)(t),
    "a cast to an integer (JAX transposes it: zero)": (
        lambda x, t: t + t.astype(jnp.int32).astype(t.dtype)
    ),
    "a dropped check of the tangent": lambda x, t: (jnp.isfinite(t), t * jnp.cos(x))[1],
}
_X = jnp.array([0.3, -0.5, 1.2])
_T = jnp.array([0.7, -0.2, 0.4])
_W = jnp.array([1.0, 2.0, 3.0])


@pytest.mark.parametrize("name", list(NONLINEAR_RULES))
def test_a_rule_not_linear_in_its_tangents_is_refused(name):
    """JAX's reverse mode cannot transpose such a rule and raises; chainrule's
    transposed it at zero tangents and silently gave its slope there (0 for a
    square, which `jax.jvp` gives as 9 at t = 3). Now it raises in reverse
    mode, eagerly, under `jit` and `vmap`; forward mode applies the rule to
    the tangents, as `jax.jvp` does (`test_forward_mode_applies_the_rule`)."""
    f = _sin_with_rule(NONLINEAR_RULES[name])

    def loss(x):
        return jnp.sum(f(x) * _W)

    # JAX refuses it, in its own words (no transpose rule, a nonlinear div, ...)
    with pytest.raises((AssertionError, NotImplementedError, RuntimeError, ValueError)):
        jax.grad(loss)(_X)
    for call in (
        lambda: cr.grad(loss)(_X),
        lambda: jax.jit(cr.grad(loss))(_X),
        lambda: jax.vmap(cr.grad(loss))(jnp.stack([_X, -_X])),
    ):
        with pytest.raises(cr.errors.NotLinearError, match="not linear in its tangents"):
            call()


FORWARD_ONLY_RULES = {
    **NONLINEAR_RULES,
    "while loop on the tangent": lambda x, t: lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * jnp.cos(x)), (0, t)
    )[1],
    "fori loop on the tangent": lambda x, t: lax.fori_loop(0, 2, lambda i, u: u * x + t, t),
}


WHERE = {
    "called directly": lambda f: f,
    "in a scan step": lambda f: lambda x: lax.scan(lambda c, _: (f(c) * 0.9, None), x, None, 2)[0],
    "in a cond branch": lambda f: lambda x: lax.cond(jnp.sum(x) > -1e3, f, jnp.cos, x),
    "in a checkpoint body": lambda f: jax.checkpoint(lambda x: f(x) * x),
    "in a while loop body": lambda f: (
        lambda x: lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, f(c[1]) * 0.9), (0, x))[1]
    ),
}


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("name", list(FORWARD_ONLY_RULES))
def test_forward_mode_applies_the_rule(name, where):
    """`jax.jvp` evaluates a custom_jvp rule at the tangents; so does chainrule's
    forward mode (`cr.jvp`, `cr.linearize`, `cr.jacfwd`, eagerly, under `jit`
    and `vmap`), where it transposed the transposed rule: a rule that is not
    linear in its tangents, or that reverse mode cannot transpose (a while
    loop on the tangents), raised. Inside a scan step, a cond branch or a
    checkpoint body the enclosing call answers forward mode with its JVP
    (`forward_only.needs_forward`), where the rule is applied the same way.
    Reverse mode over forward mode differentiates the rule's code, as JAX does."""
    f = WHERE[where](_sin_with_rule(FORWARD_ONLY_RULES[name]))
    ts = jnp.stack([_T, -2 * _T])
    calls = (
        lambda m: m.jvp(f, (_X,), (_T,)),
        lambda m: jax.jit(lambda x, t: m.jvp(f, (x,), (t,)))(_X, _T),
        lambda m: jax.vmap(lambda t: m.jvp(f, (_X,), (t,))[1])(ts),
        lambda m: m.linearize(f, _X)[1](_T),
        lambda m: m.jacfwd(f)(_X),
        lambda m: m.grad(lambda t: jnp.sum(m.jvp(f, (_X,), (t,))[1] * _W))(_T),
    )
    for call in calls:
        try:
            want = call(jax)
        except ValueError:  # (reverse mode through a while loop: JAX refuses it)
            with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
                call(cr)
            continue
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), call(cr), want
        )


@pytest.mark.parametrize("where", list(WHERE))
def test_forward_over_forward_differentiates_the_rule_code(where):
    """JAX's JVP of a body computes a custom_jvp function's value with the
    rule's code, so a JVP enclosing it differentiates that code, not the
    function again by its rule. chainrule's JVP of a scan step or a loop body
    (`core.jvp_flat`, inside JAX's tracing of the new body) staged the function
    itself, and an enclosing forward mode applied the rule to its own tangent:
    with a rule not linear in the tangents, second-order forward mode was off
    (-1.61 for JAX's -1.42). Such a trace now computes the rule's primal
    (`rules/calls.py`, `_custom_jvp_traced`). Every nesting of `jax.jvp` and
    `cr.jvp`, under `jit`, and `jacfwd` of `jacfwd`."""

    @jax.custom_jvp
    def g(x):
        return jnp.sin(x)

    @g.defjvp
    def g_jvp(primals, tangents):  # (its primal is its own code, not a call of g)
        (x,), (t,) = primals, tangents
        return jnp.sin(x), jnp.cos(x) * t + 0.3 * x * t**2

    f = WHERE[where](g)

    def second(outer, inner):
        return lambda a: outer.jvp(lambda b: inner.jvp(f, (b,), (_T,))[1], (a,), (_W,))[1]

    want = second(jax, jax)(_X)
    for outer, inner in ((cr, cr), (jax, cr), (cr, jax)):
        np.testing.assert_allclose(second(outer, inner)(_X), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(second(cr, cr))(_X), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        cr.jacfwd(cr.jacfwd(f))(_X), jax.jacfwd(jax.jacfwd(f))(_X), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", list(LINEAR_RULES))
def test_a_rule_linear_in_its_tangents_is_transposed(name):
    """The check refuses no linear rule: each gives `jax.grad`'s gradient
    (eager, jit, vmap), `jax.jvp`'s tangent, and `jax.hessian`'s Hessian."""
    f = _sin_with_rule(LINEAR_RULES[name])

    def loss(x):
        return jnp.sum(f(x) * _W)

    _modes(loss, _X)
    np.testing.assert_allclose(
        cr.jvp(f, (_X,), (_T,))[1], jax.jvp(f, (_X,), (_T,))[1], rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(cr.hessian(loss)(_X), jax.hessian(loss)(_X), rtol=1e-5, atol=1e-6)


def test_linear_transpose_refuses_what_is_computed_from_a_stop_gradient():
    """`stop_gradient(t)` is a constant to NumPy: what the code computed from
    it with NumPy escaped the linearity check (a silent 0, or the identity
    for `t + 2 * stop_gradient(t)`, where JAX raises)."""
    for f in (lambda t: lax.stop_gradient(t) * 2.0, lambda t: t + lax.stop_gradient(t) * 2.0):
        with pytest.raises(cr.errors.NotLinearError, match="stop_gradient"):
            cr.linear_transpose(f, _X)(_X)


PROMOTIONS = {
    "times an int32 argument": lambda x, k: x * k,
    "an int32 argument times": lambda x, k: k * x,
    "plus a NumPy float64 scalar": lambda x, k: x + np.float64(0.5) * k,
    "minus a NumPy int64 array": lambda x, k: x - np.arange(3, dtype=np.int64) * k,
    "an int32 argument plus 2.5": lambda x, k: x * (k + 2.5),
    "matrix product with an int32 matrix": lambda x, k: x @ (np.eye(3, dtype=np.int32) * k),
}


@pytest.mark.parametrize("name", list(PROMOTIONS))
def test_a_custom_jvp_body_on_the_host_promotes_as_jax(name):
    """An eager custom_jvp body gets NumPy arrays (`host.HostArray`), whose
    operators promoted as NumPy does: float32 times an int32 argument (or a
    NumPy float64 scalar) was float64. Under nested differentiation the rule's
    primal then failed JAX's dtype check (`cr.hessian` raised TypeError where
    `jax.hessian` works; found by a differential hunt). Values, gradients and
    Hessians as JAX's, with the integer given as a Python number and as an
    int32 array."""
    body = PROMOTIONS[name]

    @jax.custom_jvp
    def f(x, k):
        return body(x, k)

    @f.defjvp
    def f_jvp(primals, tangents):
        (x, k), (t, _) = primals, tangents
        return f(x, k), body(t, k) - body(jnp.zeros_like(t), k)

    with jax.enable_x64(False):  # (JAX's default; with x64 a jaxpr literal path differs)
        x = _X.astype(jnp.float32)
        for k in (3, jnp.int32(3)):

            def loss(x, k=k):
                return jnp.sum(f(x, k) ** 2)

            value, grad = cr.value_and_grad(loss)(x)
            want_value, want_grad = jax.value_and_grad(loss)(x)
            assert f(x, k).dtype == jax.jit(f)(x, k).dtype
            assert value.dtype == want_value.dtype and grad.dtype == want_grad.dtype == jnp.float32
            np.testing.assert_allclose(value, want_value, rtol=1e-6)
            np.testing.assert_allclose(grad, want_grad, rtol=1e-6)
            want = jax.hessian(loss)(x)
            np.testing.assert_allclose(cr.hessian(loss)(x), want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                cr.grad(lambda v: jnp.sum(cr.grad(loss)(v) * _W))(x),
                jax.grad(lambda v: jnp.sum(jax.grad(loss)(v) * _W))(x),
                rtol=1e-5,
                atol=1e-5,
            )


# --- custom_vjp functions in a scan step, at second order and in forward mode ----------


@jax.custom_vjp
def _reversed(x):
    """The identity, whose gradient is reversed (a domain-adversarial layer)."""
    return x


_reversed.defvjp(lambda x: (x, None), lambda _, g: (-g,))


@jax.custom_vjp
def _scaled_by_input(x):
    """The identity, whose bwd scales by its input (a residual JAX forwards)."""
    return x


_scaled_by_input.defvjp(lambda x: (x, x), lambda x, g: (3.0 * x * g,))


@jax.custom_vjp
def _sin_twice_steeper(x):
    """sin, whose bwd doubles the slope it saved (a residual fwd computes, and
    an array the function closes over)."""
    return jnp.sin(x) * _W


_sin_twice_steeper.defvjp(lambda x: (jnp.sin(x) * _W, jnp.cos(x) * _W), lambda c, g: (2.0 * c * g,))

CUSTOM_VJPS = {
    "reversed": _reversed,
    "scaled by its input": _scaled_by_input,
    "a saved slope": _sin_twice_steeper,
}
HOLDERS = {
    "a scan step": lambda h: (
        lambda x: lax.scan(lambda c, _: (jnp.sin(h(c * c)) * c, None), x, None, 2)[0]
    ),
    "a fori_loop body": lambda h: lambda x: lax.fori_loop(0, 2, lambda i, c: jnp.sin(h(c)) * c, x),
    "a jit in a scan step": lambda h: (
        lambda x: lax.scan(
            lambda c, _: (jax.jit(lambda u: jnp.sin(h(u * u)))(c) * c, None), x, None, 2
        )[0]
    ),
    "a cond in a scan step": lambda h: (
        lambda x: lax.scan(
            lambda c, _: (lax.cond(c[0] > -5.0, lambda u: jnp.sin(h(u)), jnp.cos, c) * c, None),
            x,
            None,
            2,
        )[0]
    ),
    "a checkpoint in a scan step": lambda h: (
        lambda x: lax.scan(
            lambda c, _: (jax.checkpoint(lambda u: jnp.sin(h(u)) * u)(c), None), x, None, 2
        )[0]
    ),
    "a checkpoint body": lambda h: jax.checkpoint(lambda x: jnp.sin(h(x * x)) * x),
    "a checkpoint saving everything": lambda h: jax.checkpoint(
        lambda x: jnp.sin(h(x * x)) * x, policy=jax.checkpoint_policies.everything_saveable
    ),
    "a cond branch": lambda h: (
        lambda x: lax.cond(x[0] > -5.0, lambda u: jnp.sin(h(u * u)) * u, jnp.cos, x)
    ),
    "a scan in a scan step": lambda h: (
        lambda x: lax.scan(
            lambda c, _: (lax.scan(lambda d, _: (jnp.sin(h(d)) * d, None), c, None, 2)[0], None),
            x,
            None,
            2,
        )[0]
    ),
}


@pytest.mark.parametrize("where", list(HOLDERS))
@pytest.mark.parametrize("name", list(CUSTOM_VJPS))
def test_second_order_through_a_call_differentiates_fwd(name, where):
    """Under JAX the inner transform's JVP of a scan body replaces each
    custom_vjp call by its `fwd` (and a linear call to `bwd`), so the outer
    transform differentiates `fwd`, and `bwd` in the backward scan. chainrule's
    scan handed the outer level the body as written, which applied the user's
    rule there a second time: Hessians through a scan were wrong in every
    entry (a reversed gradient gave -0.036 for JAX's 0.40), and `jax.jacfwd`
    of `cr.grad` through a checkpoint raised JAX's forward-mode error. A
    scan's, cond's or checkpoint's value for the level outside now runs `fwd`
    (`rules/opening.py`)."""
    f_step = HOLDERS[where](CUSTOM_VJPS[name])
    f = lambda x: jnp.sum(f_step(x) * _W)  # noqa: E731
    x = jnp.asarray([0.7, -0.3, 0.4])
    want = jax.hessian(f)(x)
    seconds = [cr.hessian(f), jax.jacfwd(cr.grad(f)), cr.jacrev(cr.grad(f))]
    if name == "reversed":  # (the other compositions once per place: they compile)
        seconds += [
            jax.jit(cr.hessian(f)),
            jax.jacrev(cr.grad(f)),
            lambda x: jax.vmap(cr.hessian(f))(x[None])[0],
        ]
    for second in seconds:
        np.testing.assert_allclose(second(x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cr.grad(f)(x), jax.grad(f)(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("where", list(HOLDERS))
def test_forward_mode_refuses_a_custom_vjp_in_a_call(where):
    """`jax.jvp` refuses a custom_vjp function in a scan step or a checkpoint
    body, as anywhere: its bwd need not be the transpose of any linear map.
    chainrule's forward mode went through the scan's or checkpoint's
    reverse-mode body and silently gave the slope of `bwd`'s transpose; it
    now raises, as it does outside them."""
    f = HOLDERS[where](_reversed)
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(f, (_X,), (_T,))
    for call in (
        lambda: cr.jvp(f, (_X,), (_T,)),
        lambda: cr.jacfwd(f)(_X),
        lambda: cr.linearize(f, _X)[1](_T),
        lambda: jax.jit(lambda x, t: cr.jvp(f, (x,), (t,)))(_X, _T),
    ):
        with pytest.raises(cr.errors.ForwardModeError, match="forward-mode autodiff"):
            call()
