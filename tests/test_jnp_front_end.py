"""jax.numpy code through chainrule's trace: every JAX primitive the function
applies reaches `Trace.process_primitive` and chainrule's rule table, in one
run, eagerly, under `jax.jit` and nested. Each test checks against jax.grad /
jax.vjp. (Random compositions in the jax.numpy spelling are
`tests/test_compositions.py::test_grad_of_random_composition_matches_jax`.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import chainrule as cr
from chainrule.engine import host
from tests.test_jnp_coverage import FUNCTIONS, X, _scalar


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_jnp_idioms_match_jax(name):
    """cond/switch, scatter and gather (`.at[]`), jax.nn's custom_jvp functions, ..."""
    loss = _scalar(FUNCTIONS[name])
    got = cr.value_and_grad(loss)(X)
    want = jax.value_and_grad(loss)(X)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, jax.Array) and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_relu_at_zero_follows_its_custom_jvp_rule():
    """jax.nn.relu's custom JVP rule gives 0 at 0, where max(x, 0)'s own rule
    would split the gradient (0.5): chainrule must use the custom rule."""

    def f(w1, w2, x):
        return jnp.sum(w2 * jax.nn.relu(w1 * x))

    args = (np.array([0.0, 1.0, -1.0]), np.array([2.0, 3.0, 4.0]), np.array([1.0, 1.0, 1.0]))
    got = cr.grad(f, argnums=(0, 1))(*args)
    want = jax.grad(f, argnums=(0, 1))(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert float(got[0][0]) == 0.0


def test_custom_jvp_vjp_fn_can_be_called_twice():
    f = lambda w: jax.nn.softplus(w) * jax.nn.relu(w - 0.5)  # noqa: E731
    w = np.linspace(-1.0, 2.0, 7)
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
    got = cr.value_and_grad(mlp)(w, x)
    want = jax.value_and_grad(mlp)(w, x)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-12)


@pytest.mark.parametrize("where", ["eager", "jit", "second order"])
def test_custom_vjp_uses_the_users_bwd(where):
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * 100.0 * x,))  # deliberately not cos
    loss = lambda w: jnp.sum(f(w))  # noqa: E731
    w = np.array([0.1, 0.2])
    if where == "eager":
        got, want = cr.grad(loss)(w), jax.grad(loss)(w)
    elif where == "jit":
        got, want = jax.jit(cr.grad(loss))(w), jax.grad(loss)(w)
    else:
        second = lambda g: lambda w: jnp.sum(g(loss)(w) ** 2)  # noqa: E731
        got, want = cr.grad(second(cr.grad))(w), jax.grad(second(jax.grad))(w)
    np.testing.assert_allclose(got, want, rtol=1e-12)


_C = jnp.array([1.0, 2.0, 3.0])


@jax.custom_vjp
def _scale(x):
    return x * _C  # closes over a jax.Array: a jit body hoists it as a constant


_scale.defvjp(lambda x: (x * _C, None), lambda _, g: (g * _C * 10.0,))  # 10x: bwd is used


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_custom_vjp_closing_over_a_constant_inside_jit(mode):
    """JAX marks only traced arguments as perturbed; the constant a jit body
    hoisted into the call is not (JAX refuses a perturbed closed-over value)."""
    loss = lambda x: jnp.sum(jax.jit(_scale)(x))  # noqa: E731
    grad = cr.grad(loss) if mode == "eager" else jax.jit(cr.grad(loss))
    x = jnp.ones(3)
    np.testing.assert_allclose(grad(x), jax.grad(loss)(x), rtol=1e-12)
    np.testing.assert_allclose(cr.jacrev(loss)(x), jax.jacrev(loss)(x), rtol=1e-12)


def test_odeint_neural_ode_gradient():
    """`jax.experimental.ode.odeint`: a custom_vjp whose closed-over constants
    come from a jit body, and whose bwd scans over its residuals with a traced
    index (residuals and cotangents reach it as jax.Arrays, as from JAX)."""
    from jax.experimental.ode import odeint

    def loss(w):
        ts = jnp.linspace(0.0, 1.0, 4)
        return jnp.sum(odeint(lambda y, t, w: jnp.tanh(w @ y), jnp.ones(3), ts, w) ** 2)

    w = jnp.eye(3) * 0.5 + 0.1
    np.testing.assert_allclose(cr.grad(loss)(w), jax.grad(loss)(w), rtol=1e-9)


def _sum_of_squares(x):
    return lax.fori_loop(0, x.shape[0], lambda i, acc: acc + x[i] ** 2, 0.0)


@jax.custom_vjp
def _looped_vjp(x):
    return _sum_of_squares(x)


def _looped_bwd(x, g):
    return (lax.fori_loop(0, x.shape[0], lambda i, a: a.at[i].set(2 * x[i] * g), x * 0),)


_looped_vjp.defvjp(lambda x: (_sum_of_squares(x), x), _looped_bwd)


@jax.custom_jvp
def _looped_jvp(x):
    return _sum_of_squares(x)


@_looped_jvp.defjvp
def _looped_jvp_rule(primals, tangents):
    (x,), (t,) = primals, tangents
    return _sum_of_squares(x), lax.fori_loop(0, 3, lambda i, acc: acc + 2 * x[i] * t[i], 0.0)


def _masked_loop(x):
    m = (x > 1.5).astype(jnp.int32)  # no derivative: a host value eagerly
    return lax.fori_loop(0, 3, lambda i, acc: acc + x[m[i]] * jnp.sum(m * x), 0.0)


@pytest.mark.parametrize("fun", [_looped_vjp, _looped_jvp, _masked_loop])
def test_host_values_indexed_by_a_loop_index_in_the_users_code(fun):
    """Eagerly, values without a derivative and a custom rule's arguments are
    host (NumPy) values; indexed by a tracer of a loop the user's code traces
    they act as the jax.Arrays JAX would have handed over."""
    x = jnp.array([1.0, 2.0, 3.0])
    for grad in (cr.grad(fun), jax.jit(cr.grad(fun))):
        np.testing.assert_allclose(grad(x), jax.grad(fun)(x), rtol=1e-12)


@pytest.mark.parametrize(
    "case",
    ["host off", "jax.jit", "jax.vmap", "second order", "weakly typed input"],
)
def test_same_results_on_every_path(case):
    f = lambda w: jnp.sum(jnp.tanh(w) ** 2)  # noqa: E731
    w = np.array([0.3, -0.7])
    want = jax.grad(f)(w)
    previous = host.set_enabled(case != "host off")
    try:
        if case == "jax.jit":
            got = jax.jit(cr.grad(f))(w)
        elif case == "jax.vmap":
            got = jax.vmap(cr.grad(f))(w[None].repeat(3, 0))[1]
        elif case == "second order":
            got = cr.grad(lambda v: cr.grad(f)(v).sum())(w)
            want = jax.grad(lambda v: jax.grad(f)(v).sum())(w)
        elif case == "weakly typed input":
            got, want = cr.grad(f)(0.3), jax.grad(f)(0.3)
        else:
            got = cr.grad(f)(w)
    finally:
        host.set_enabled(previous)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable])
def test_jax_checkpoint_bodies_are_differentiated_inline(policy):
    block = jax.checkpoint(lambda w, x: jnp.tanh(x @ w) * 2.0, policy=policy)
    loss = lambda w, x: jnp.sum(block(w, block(w, x)) ** 2)  # noqa: E731
    w, x = np.linspace(-1.0, 1.0, 9).reshape(3, 3), np.linspace(0.0, 1.0, 6).reshape(2, 3)
    want = jax.grad(loss)(w, x)
    np.testing.assert_allclose(cr.grad(loss)(w, x), want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(cr.grad(loss))(w, x), want, rtol=1e-12)
    second = lambda g: lambda w: jnp.sum(g(loss)(w, x) ** 2)  # noqa: E731
    np.testing.assert_allclose(
        cr.grad(second(cr.grad))(w), jax.grad(second(jax.grad))(w), rtol=1e-10
    )


def test_a_vjp_fn_runs_on_the_callers_trace():
    """A vjp_fn made eagerly can be jitted, vmapped and differentiated, as JAX's."""
    f = lambda x: jnp.sin(x) * x  # noqa: E731
    x = jnp.arange(1.0, 4.0)
    _, vjp_fn = cr.vjp(f, x)
    _, want_fn = jax.vjp(f, x)
    np.testing.assert_allclose(jax.jit(vjp_fn)(jnp.ones(3))[0], want_fn(jnp.ones(3))[0], rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(vjp_fn)(jnp.eye(3))[0], jax.vmap(want_fn)(jnp.eye(3))[0])
    got = cr.grad(lambda c: jnp.sum(vjp_fn(c)[0] ** 2))(jnp.ones(3))
    want = jax.grad(lambda c: jnp.sum(want_fn(c)[0] ** 2))(jnp.ones(3))
    np.testing.assert_allclose(got, want, rtol=1e-12)


_INTEGER_MASK_ARITHMETIC = {
    "floor division by zero": lambda m: m // 0,
    "remainder by zero": lambda m: m % 0,
    "reflected floor division": lambda m: 7 // (m + 0),
    "true division": lambda m: m / 3,
    "shift past the width": lambda m: (m << 40) + 1,
    "a boolean mask over 2": lambda m: (m > 0) / 2,
    "a negative power": lambda m: (m + 1) ** -1,
}


@pytest.mark.parametrize("name", sorted(_INTEGER_MASK_ARITHMETIC))
def test_the_users_integer_arithmetic_on_host_values_is_jaxs(name):
    """Eagerly, an integer computed from a traced value (a mask) is a host
    value; the user's arithmetic on it has JAX's semantics and dtypes (XLA's
    division by zero, shifts, `/` to float32), not NumPy's."""
    op = _INTEGER_MASK_ARITHMETIC[name]

    def loss(x):
        return jnp.sum(x * op((x > 0).astype(jnp.int32)))

    x = jnp.array([1.0, -2.0, 3.0], jnp.float32)
    try:
        want = jax.value_and_grad(loss)(x)
    except TypeError:
        with pytest.raises(TypeError):
            cr.value_and_grad(loss)(x)
        return
    got = cr.value_and_grad(loss)(x)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("transform", ["eager", "jit", "vmap"])
def test_custom_vjp_symbolic_zeros_sees_what_this_transform_differentiates(transform):
    """With symbolic_zeros=True fwd reads which arguments are perturbed: only
    those this transform differentiates, not every traced value (a closed-over
    `y` under jit or vmap is not), as JAX tells it."""

    @jax.custom_vjp
    def f(x, y):
        return x * y

    def f_fwd(x, y):
        return x.value * y.value, (y.value, jnp.float32(y.perturbed))

    f.defvjp(f_fwd, lambda res, g: (g * res[0] * (1 + res[1]), None), symbolic_zeros=True)
    x, y = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])
    wrap = {"eager": lambda h: h, "jit": jax.jit, "vmap": jax.vmap}[transform]
    got = wrap(lambda x, y: cr.grad(lambda x: f(x, y).sum())(x))(x, y)
    want = wrap(lambda x, y: jax.grad(lambda x: f(x, y).sum())(x))(x, y)
    np.testing.assert_allclose(got, want)


def test_a_custom_vjp_whose_fwd_calls_the_function_itself():
    """The common `f_fwd = lambda x: (f(x), x)`: the inner call's body gets a
    value it can index with a loop's tracer, as from JAX."""

    @jax.custom_vjp
    def f(x):
        return _sum_of_squares(x)

    f.defvjp(lambda x: (f(x), x), lambda x, g: (2 * g * x,))
    x = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(cr.grad(f)(x), jax.grad(f)(x))


@pytest.mark.parametrize(
    "method",
    [
        lambda m, i: m.take(i),
        lambda m, i: m.clip(0, i),
        lambda m, i: m.dot(jnp.ones(3) * i),
        lambda m, i: m.searchsorted(i),
        lambda m, i: m.repeat(2)[i],
    ],
)
def test_host_value_methods_with_a_loop_tracer(method):
    """jax.Array methods NumPy shares, called on a host value with a tracer of
    a loop the user's code traces, act as on the jax.Array JAX hands over."""

    def loss(x):
        m = (x > 1.5).astype(jnp.float32)
        return lax.fori_loop(0, 3, lambda i, acc: acc + jnp.sum(method(m, i)) * x[i], 0.0)

    x = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(cr.grad(loss)(x), jax.grad(loss)(x))


@pytest.mark.parametrize(
    "fun",
    [
        lambda w, x: jnp.sum(jnp.logaddexp(w, x)),
        lambda w, x: jnp.sum(jax.scipy.special.xlogy(x, w)),
        lambda w, x: jnp.sum(jax.scipy.stats.poisson.logpmf(x, w)),
    ],
)
def test_jit_grad_of_closed_over_parameters_through_custom_jvp_functions(fun):
    """Under jit, concrete parameters differentiated beside a traced argument of
    a custom_jvp function: host values reach JAX's trace as jax.Arrays."""
    w, data = jnp.array([1.5, 2.0, 1.2]), jnp.array([0.0, 1.0, 3.0])
    got = jax.jit(lambda x: cr.grad(fun)(w, x))(data)
    np.testing.assert_allclose(got, jax.jit(lambda x: jax.grad(fun)(w, x))(data), rtol=1e-6)


class _Reflected:
    """An operand type of the user's: JAX's operators defer to its reflected methods."""

    def __init__(self, value):
        self.value = value

    def __radd__(self, other):
        return other + self.value

    def __rmul__(self, other):
        return other * self.value

    def __rmatmul__(self, other):
        return other @ self.value


class _ArrayLike:
    def __jax_array__(self):
        return jnp.asarray([1.0, -2.0])


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_operators_defer_to_operand_types_jax_does_not_know(wrap):
    # a Tracer's operator returns NotImplemented for such a type, as jax.Array's
    # does, so the other operand's reflected method runs (a sparse matrix's
    # `__rmatmul__` is tests/test_sparse.py); `__jax_array__` converts
    def loss(x):
        y = (x + _Reflected(2.0)) * _Reflected(3.0) + x * _ArrayLike()
        return jnp.sum(y @ _Reflected(jnp.ones((2, 2))))

    x = jnp.asarray([1.0, 4.0])
    np.testing.assert_allclose(wrap(cr.grad(loss))(x), jax.grad(loss)(x), rtol=1e-12)


@pytest.mark.parametrize(
    "op",
    [
        lambda x: x == [1.0, 2.0],
        lambda x: x != (1.0, 2.0),
        lambda x: x + "a",
        lambda x: x < object(),
        lambda x: x @ {"a": 1},
    ],
)
def test_operators_refuse_what_jaxs_refuse(op):
    x = jnp.asarray([1.0, 4.0])
    with pytest.raises(TypeError):
        jax.grad(lambda x: jnp.sum(op(x)))(x)
    with pytest.raises(TypeError, match="unsupported operand|not supported"):
        cr.grad(lambda x: jnp.sum(op(x)))(x)


@pytest.mark.parametrize("op", [lambda x: x @ jnp.float32(2.0), lambda x: jnp.sum(x) @ x])
def test_matmul_of_a_scalar_raises_jaxs_error(op):
    x = jnp.ones(3)
    with pytest.raises(ValueError, match="must have ndim at least 1") as want:
        jax.grad(lambda x: jnp.sum(op(x)))(x)
    with pytest.raises(ValueError, match="must have ndim at least 1") as got:
        cr.grad(lambda x: jnp.sum(op(x)))(x)
    assert str(got.value) == str(want.value)
