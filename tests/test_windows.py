"""chainrule's windowed reductions against `jax.vjp` (tests/oracle.py).

`reduce_window_sum`, `reduce_window_max` and `reduce_window_min` with strides,
SAME/VALID/explicit padding, base and window dilation; max pooling with ties
(the cotangent goes where JAX's goes); `select_and_scatter_add` and
`select_and_gather_add`, which max pooling emits at second order and beyond;
flax-style max and average pooling; the generic `reduce_window`, which
neither JAX nor chainrule differentiates.
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from jax import lax
from jax._src.lax import windowed_reductions as jax_windows

import chainrule as cr
from chainrule.errors import NoVJPRuleError
from tests.oracle import check_against_jax, emitted

REDUCERS = {  # name: (computation, its identity, the primitive JAX emits)
    "sum": (lax.add, 0.0, "reduce_window_sum"),
    "max": (lax.max, -jnp.inf, "reduce_window_max"),
    "min": (lax.min, jnp.inf, "reduce_window_min"),
}


def normal(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def window(reducer, dims, strides, padding, **dilations):
    op, init, _ = REDUCERS[reducer]
    return lambda x: lax.reduce_window(x, init, op, dims, strides, padding, **dilations)


def check_window(reducer, fun, x, **kw):
    assert REDUCERS[reducer][2] in emitted(fun, x)
    check_against_jax(fun, x, **kw)


VARIANTS = {
    "VALID, strided": dict(dims=(1, 3, 2), strides=(1, 2, 1), padding="VALID"),
    "SAME": dict(dims=(2, 3, 3), strides=(1, 1, 2), padding="SAME"),
    "explicit, base dilation": dict(
        dims=(1, 2, 3), strides=(1, 2, 1), padding=((0, 1), (2, 1), (1, 0)), base_dilation=(1, 2, 2)
    ),
    "negative padding": dict(dims=(1, 2, 2), strides=(1, 1, 2), padding=((0, 0), (-1, 1), (0, -1))),
}


@pytest.mark.parametrize(
    "reducer, variant",
    # JAX cannot differentiate max/min with negative padding: see
    # test_negative_padding_of_max_and_min
    [(r, v) for r in REDUCERS for v in VARIANTS if r == "sum" or v != "negative padding"],
)
def test_variants_first_and_second_order(reducer, variant):
    fun = window(reducer, **VARIANTS[variant])
    check_window(reducer, fun, normal((2, 7, 6)), modes=("eager",))


@pytest.mark.parametrize("reducer", ["max", "min"])
@pytest.mark.parametrize("base_dilation", [(1, 1, 1), (1, 2, 1)])
def test_negative_padding_of_max_and_min(reducer, base_dilation):
    """JAX's own rule fails on negative padding (its select_and_scatter_add
    slices at -1); chainrule's equals JAX's on the cropped input, the same function."""
    op, init, name = REDUCERS[reducer]
    padding = ((0, 0), (-1, 1), (0, -1))
    fun = window(reducer, (1, 2, 2), (1, 1, 2), padding, base_dilation=base_dilation)

    def cropped(x):
        dilated = lax.pad(x, init, [(0, 0, d - 1) for d in base_dilation])[:, 1:, :-1]
        return lax.reduce_window(dilated, init, op, (1, 2, 2), (1, 1, 2), ((0, 0), (0, 1), (0, 0)))

    x = normal((2, 7, 6))
    assert name in emitted(fun, x)
    with pytest.raises(TypeError, match="nonnegative"):
        jax.grad(lambda x: fun(x).sum())(x)
    np.testing.assert_array_equal(fun(x), cropped(x))
    ct, v = normal(fun(x).shape, seed=1), normal(x.shape, seed=2)
    loss = lambda f: lambda x: jnp.vdot(jnp.sin(f(x)), ct)  # noqa: E731
    np.testing.assert_allclose(cr.grad(loss(fun))(x), jax.grad(loss(cropped))(x), rtol=1e-12)
    second = lambda grad, f: grad(lambda x: jnp.vdot(grad(loss(f))(x), v))  # noqa: E731
    np.testing.assert_allclose(second(cr.grad, fun)(x), second(jax.grad, cropped)(x), rtol=1e-12)


def test_window_dilation_of_a_sum():
    fun = window("sum", (1, 2, 3), (1, 2, 1), ((0, 0), (1, 2), (0, 1)), window_dilation=(1, 2, 2))
    check_window("sum", fun, normal((2, 7, 6)), modes=("eager", "jit"))


@pytest.mark.parametrize("reducer", ["max", "min"])
def test_window_dilation_of_max_and_min_is_refused_as_by_jax(reducer):
    fun = window(reducer, (1, 2, 2), (1, 1, 1), "VALID", window_dilation=(1, 2, 1))
    x = normal((2, 6, 5))
    assert REDUCERS[reducer][2] in emitted(fun, x)
    with pytest.raises(NotImplementedError, match="window dilation"):
        jax.grad(lambda x: fun(x).sum())(x)
    with pytest.raises(NoVJPRuleError, match=r"window_dilation=\(1, 2, 1\)"):
        cr.grad(lambda x: fun(x).sum())(x)


@pytest.mark.parametrize("reducer", list(REDUCERS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_eager_jit_vmap(reducer, dtype):
    fun = window(reducer, (2, 2, 1), (1, 2, 1), "SAME")
    check_window(reducer, fun, normal((3, 6, 4), dtype))


@pytest.mark.parametrize("reducer", ["max", "min"])
def test_ties_follow_jax(reducer):
    """Overlapping windows over many equal values: each window's cotangent goes
    to the one element JAX's selection picks."""
    x = np.round(normal((2, 8, 7)) * 0.7)  # a handful of distinct values, ties everywhere
    fun = window(reducer, (1, 3, 2), (1, 1, 1), "SAME")
    check_window(reducer, fun, x, modes=("eager", "jit"))
    fun = window(reducer, (1, 2, 3), (1, 2, 1), ((0, 0), (0, 1), (1, 1)), base_dilation=(1, 2, 1))
    check_window(reducer, fun, x, modes=("eager",))


# --- pooling as flax writes it, and what it emits at higher order ----------------------


def max_pool(x):  # flax.linen.max_pool(x, (2, 2), strides=(2, 2)), NHWC
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def avg_pool(x):  # flax.linen.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME")
    summed = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
    return summed / 9.0


@pytest.mark.parametrize("pool", [max_pool, avg_pool])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_flax_style_pooling(pool, dtype):
    check_against_jax(lambda x: jnp.tanh(pool(x)), normal((2, 6, 6, 3), dtype))


def test_max_pooling_differentiated_three_times():
    """jax's gradient of a max-pooled loss emits select_and_scatter_add, its
    second derivative select_and_gather_add: chainrule's agree at each order."""
    loss = lambda x: jnp.sum(max_pool(x) ** 3)  # noqa: E731
    x = normal((1, 4, 6, 2))
    assert "select_and_scatter_add" in emitted(jax.grad(loss), x)
    v = normal(x.shape, seed=1)
    second = lambda grad: grad(lambda x: jnp.vdot(grad(loss)(x), v))  # noqa: E731
    assert "select_and_gather_add" in emitted(second(jax.grad), x)
    np.testing.assert_allclose(second(cr.grad)(x), second(jax.grad)(x), rtol=1e-12)
    third = lambda grad: grad(lambda x: jnp.sum(second(grad)(x) ** 2))  # noqa: E731
    np.testing.assert_allclose(third(cr.grad)(x), third(jax.grad)(x), rtol=1e-12)


WINDOW = dict(
    window_dimensions=(1, 3, 2), window_strides=(1, 2, 1), padding=((0, 0), (1, 1), (0, 1))
)


@pytest.mark.parametrize("select_prim", [lax.ge_p, lax.le_p])
def test_select_and_scatter_add(select_prim):
    x = normal((2, 7, 5))
    source_shape = jax.eval_shape(window("max", (1, 3, 2), (1, 2, 1), WINDOW["padding"]), x).shape

    def fun(source, x):
        return jax_windows._select_and_scatter_add(source, x, select_prim, **WINDOW)

    source = normal(source_shape, seed=1)
    assert "select_and_scatter_add" in emitted(fun, source, x)
    check_against_jax(fun, source, x, argnums=(0,))
    check_against_jax(fun, source, x, argnums=(0, 1), modes=("eager",))  # x: zero cotangent


@pytest.mark.parametrize("select_prim", [lax.ge_p, lax.le_p])
@pytest.mark.parametrize("base_dilation", [(1, 1, 1), (1, 2, 1)])
def test_select_and_gather_add(select_prim, base_dilation):
    ones = (1, 1, 1)

    def fun(tangents, x):
        return jax_windows._select_and_gather_add(
            tangents, x, select_prim, **WINDOW, base_dilation=base_dilation, window_dilation=ones
        )

    t, x = normal((2, 7, 5), seed=1), normal((2, 7, 5))
    assert "select_and_gather_add" in emitted(fun, t, x)
    check_against_jax(fun, t, x, argnums=(0,))
    check_against_jax(fun, t, x, argnums=(0, 1), modes=("eager",))


# --- the generic reduce_window ----------------------------------------------------------


def _generic(x, init):
    return lax.reduce_window(x, init, lambda a, b: a * b + 0.5, (2, 2), (1, 1), "VALID")


def test_generic_reduce_window_evaluates_and_refuses_to_differentiate_as_jax():
    x, init = normal((4, 5)), np.float64(1.0)
    assert "reduce_window" in emitted(_generic, x, init)
    # not on the path to the loss: it just evaluates
    value, grad = cr.value_and_grad(lambda y: jnp.sum(y**2) + _generic(x, init).sum())(x)
    np.testing.assert_allclose(value, jnp.sum(x**2) + _generic(x, init).sum(), rtol=1e-12)
    np.testing.assert_allclose(grad, 2 * x, rtol=1e-12)
    for grad in (jax.grad, cr.grad):
        with pytest.raises((ValueError, NotImplementedError)):
            grad(lambda x: _generic(x, init).sum())(x)
    with pytest.raises(NoVJPRuleError, match="reduce_window_sum, _max or _min"):
        cr.grad(lambda x: _generic(x, init).sum())(x)


# --- forward mode through what reverse mode refuses -------------------------------------


def _loop_jacfwd(fun, x):
    """The Jacobian from one `jax.jvp` per basis vector (JAX's own jacfwd cannot
    batch a generic reduce_window)."""
    cols = [jax.jvp(fun, (x,), (e.reshape(x.shape),))[1] for e in jnp.eye(x.size, dtype=x.dtype)]
    return jnp.moveaxis(jnp.stack(cols), 0, -1).reshape(*cols[0].shape, *x.shape)


def _pair_sum(x):
    """A generic reduction of two operands (not a sum, max or min)."""

    def combine(a, b):
        return a[0] + jnp.sin(b[0]), a[1] + b[1] * jnp.cos(a[0])

    return lax.reduce_window((x, 2.0 * x), (0.0, 0.0), combine, (2, 1), (1, 1), "VALID")[1]


FORWARD_ONLY = {
    "generic product": lambda x: _generic(x, np.float64(1.0)),
    "generic pair": _pair_sum,
    "dilated max": window("max", (2, 2), (1, 1), "VALID", window_dilation=(1, 2)),
    "dilated min, padded": window("min", (2, 2), (1, 1), ((1, 0), (0, 1)), window_dilation=(2, 1)),
}


@pytest.mark.parametrize("name", list(FORWARD_ONLY))
def test_forward_mode_where_reverse_mode_is_refused(name):
    """jax.jvp goes through a generic reduce_window and dilated max/min
    pooling, which have no VJP; so does chainrule's forward mode (their VJP,
    recorded at zero, is transposed into their JVP: `rules/forward_only.py`),
    eagerly, under jit and vmap, and jacfwd of jacfwd."""
    fun = FORWARD_ONLY[name]
    x, t = normal((4, 5)), normal((4, 5)) * 0.5
    want = jax.jvp(fun, (x,), (t,))
    for got in (
        cr.jvp(fun, (x,), (t,)),
        jax.jit(lambda x, t: cr.jvp(fun, (x,), (t,)))(x, t),
    ):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)
    ts = jnp.stack([t, -2.0 * t])
    batched = jax.vmap(lambda t: cr.jvp(fun, (x,), (t,))[1])(ts)
    np.testing.assert_allclose(batched, jax.vmap(lambda t: jax.jvp(fun, (x,), (t,))[1])(ts))
    np.testing.assert_allclose(cr.jacfwd(fun)(x), _loop_jacfwd(fun, x), rtol=1e-10, atol=1e-12)
    second = cr.jacfwd(cr.jacfwd(fun))(x)
    if "dilated" in name:
        np.testing.assert_allclose(second, jax.jacfwd(jax.jacfwd(fun))(x), atol=1e-12)
    else:  # JAX cannot differentiate its own JVP here: central differences of chainrule's
        eps = 1e-5
        diffs = [
            (
                cr.jacfwd(fun)(x + eps * e.reshape(x.shape))
                - cr.jacfwd(fun)(x - eps * e.reshape(x.shape))
            )
            / (2 * eps)
            for e in jnp.eye(x.size)
        ]
        numeric = jnp.moveaxis(jnp.stack(diffs), 0, -1).reshape(second.shape)
        np.testing.assert_allclose(second, numeric, rtol=1e-6, atol=1e-7)
    with pytest.raises(NoVJPRuleError):
        cr.grad(lambda x: fun(x).sum())(x)


def test_forward_mode_refuses_a_traced_initial_value_as_jax():
    fun = lambda x: lax.reduce_window(x, x[0, 0], lax.add, (2, 2), (1, 1), "VALID")  # noqa: E731
    x = normal((3, 4))
    for jvp in (jax.jvp, cr.jvp):
        with pytest.raises(TypeError, match="init_value_tangent"):
            jvp(fun, (x,), (x,))


# --- properties over the window parameters -------------------------------------------


@st.composite
def window_cases(draw):
    reducer = draw(st.sampled_from(list(REDUCERS)))
    shape, dims, strides, pads, base, wdil = [], [], [], [], [], []
    for _ in range(2):
        n, k = draw(st.integers(1, 6)), draw(st.integers(1, 3))
        s, b = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        d = draw(st.integers(1, 2)) if reducer == "sum" else 1  # max/min: JAX refuses d > 1
        least = -1 if reducer == "sum" else 0  # and fails on negative max/min padding
        lo, hi = draw(st.integers(least, 2)), draw(st.integers(least, 2))
        extent = (n - 1) * b + 1 + lo + hi - ((k - 1) * d + 1)
        assume(extent >= 0)
        drawn = (n, k, s, (lo, hi), b, d)
        for values, v in zip((shape, dims, strides, pads, base, wdil), drawn, strict=True):
            values.append(v)
    named = ["SAME", "VALID"] if max(base) == 1 and max(wdil) == 1 else []
    padding = draw(st.sampled_from([tuple(pads), *named]))
    dilations = dict(base_dilation=tuple(base), window_dilation=tuple(wdil))
    fun = window(reducer, tuple(dims), tuple(strides), padding, **dilations)
    x = normal(shape, seed=draw(st.integers(0, 2**16)))
    return reducer, fun, x


def _window_property(modes, examples):
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(window_cases())
    def prop(case):
        reducer, fun, x = case
        assume(0 not in jax.eval_shape(fun, x).shape)
        check_window(reducer, fun, x, modes=modes)

    return prop


def test_property_first_and_second_order():
    _window_property(("eager",), 8)()


@pytest.mark.slow
def test_property_sweep_eager_jit_vmap():
    _window_property(("eager", "jit", "vmap"), 80)()
