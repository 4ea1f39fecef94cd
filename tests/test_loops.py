"""Loops (issue 13, items 1-2): `scan` and what JAX builds on it, and `while`.

Each scan variant is checked by the oracle (`tests/oracle.py`: values, first
and second order against `jax.vjp`, eager, under `jit` and `vmap`) in float64
and float32, on random inputs, and asserts it emits `scan`. Then the
structural promises: the backward pass is a scan (the jitted gradient's
program does not grow with the length, and eagerly one node is recorded,
not one per step); `while` runs forward and refuses reverse mode as JAX does;
a character-level RNN trained with optax and a neural ODE give `jax.grad`'s
numbers.
"""

from __future__ import annotations

import os
import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from jax import lax

import chainrule as cr
from chainrule.engine import core
from chainrule.engine.rules import PRIMITIVES
from chainrule.errors import NoVJPRuleError
from tests.oracle import check_against_jax, emitted

DTYPES = (jnp.float64, jnp.float32)


def _randn(seed: int, *shape: int, dtype=jnp.float64) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# --- scan: every parameter variant ------------------------------------------------------


def _cell(c, x, w):
    return jnp.tanh(c * w + x)


def scan_basic(w, xs, c0):
    c, ys = lax.scan(lambda c, x: (_cell(c, x, w), c * x), c0, xs)
    return c, ys


def scan_reverse(w, xs, c0):
    return lax.scan(lambda c, x: (_cell(c, x, w), jnp.sin(c) * x), c0, xs, reverse=True)


def scan_unroll2(w, xs, c0):  # 5 steps: two unrolled pairs and a remainder
    return lax.scan(lambda c, x: (_cell(c, x, w), c * x), c0, xs, unroll=2)


def scan_unroll_full(w, xs, c0):
    return lax.scan(lambda c, x: (_cell(c, x, w), c * x), c0, xs, unroll=True)


def scan_reverse_unroll(w, xs, c0):
    return lax.scan(lambda c, x: (_cell(c, x, w), c * x), c0, xs, reverse=True, unroll=3)


def scan_no_xs(w, xs, c0):  # xs=None, length given; xs enters as a constant
    def step(c, _):
        c = _cell(c, xs[0], w)
        return c, c**2

    return lax.scan(step, c0, None, length=4)


def scan_pytree(w, xs, c0):  # dict/tuple carries and outputs, several xs
    def step(carry, x):
        a, (b, _) = carry["a"], carry["b"]
        new_a = _cell(a, x["u"], w)
        new_b = b * jnp.cos(x["v"]) + a
        return {"a": new_a, "b": (new_b, x["u"])}, {"ab": new_a * new_b, "s": (jnp.sum(b),)}

    carry = {"a": c0, "b": (c0 * 2.0, xs[0])}
    return lax.scan(step, carry, {"u": xs, "v": xs[::-1] * 0.5})


def scan_int_carry(w, xs, c0):  # a counter and an index carried beside the float state
    def step(carry, x):
        i, k, c = carry
        c = _cell(c, x * i.astype(x.dtype), w) + xs[k]
        return (i + 1, (k + 2) % xs.shape[0], c), (c, i)

    return lax.scan(step, (jnp.int32(1), 0, c0), xs)


def scan_nested(w, xs, c0):
    def inner(c, x):
        ys = x * jnp.arange(1.0, 4.0, dtype=x.dtype)
        return lax.scan(lambda d, y: (_cell(d, y, w), d * y), c, ys)

    def outer(c, x):
        c, ys = inner(c, x)
        return c, ys.sum()

    return lax.scan(outer, c0, xs)


def scan_checkpoint(w, xs, c0):
    @jax.checkpoint
    def step(c, x):
        return _cell(_cell(c, x, w), x, w), c * x

    return lax.scan(step, c0, xs)


def scan_matrix(w, xs, c0):  # a vector carry, a matrix constant, a matrix output per step
    W = jnp.outer(xs, xs) * 0.1 + w

    def step(h, x):
        h = jnp.tanh(W @ h + x)
        return h, jnp.outer(h, h)

    return lax.scan(step, c0 * jnp.ones_like(xs), xs)


def scan_split_transpose(w, xs, c0):  # a hint for JAX's own transpose: same value
    return lax.scan(lambda c, x: (_cell(c, x, w), c * x), c0, xs, _split_transpose=True)


def scan_empty(w, xs, c0):  # length 0: the carry passes through
    return lax.scan(lambda c, x: (_cell(c, x, w), c * x), c0, xs[:0])


SCANS = [
    scan_basic,
    scan_reverse,
    scan_unroll2,
    scan_unroll_full,
    scan_reverse_unroll,
    scan_no_xs,
    scan_pytree,
    scan_int_carry,
    scan_nested,
    scan_checkpoint,
    scan_matrix,
    scan_split_transpose,
    scan_empty,
]


def _scan_params(fun, *args) -> list[dict]:
    jaxpr = jax.make_jaxpr(fun)(*args)
    return [e.params for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]


def _check_scan(fun, dtype, modes=("eager", "jit", "vmap")):
    w, xs, c0 = _randn(0, dtype=dtype), _randn(1, 5, dtype=dtype), _randn(2, dtype=dtype)
    assert "scan" in emitted(fun, w, xs, c0)
    check_against_jax(fun, w, xs, c0, modes=modes)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("fun", SCANS, ids=[f.__name__ for f in SCANS])
def test_scan_against_jax(fun, dtype):
    _check_scan(fun, dtype)


# The bounded run (XLA compiles every scan: the full matrix above takes minutes):
# every mode for one variant, then one mode per variant, spread over the modes.
def test_scan_every_mode_float64():
    _check_scan(scan_basic, jnp.float64)


@pytest.mark.parametrize(
    "fun, dtype, mode",
    [
        (fun, DTYPES[i % 2], ("jit", "eager", "vmap")[i % 3])
        for i, fun in enumerate(SCANS)
        if fun is not scan_basic
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_scan_variant_in_one_mode(fun, dtype, mode):
    _check_scan(fun, dtype, modes=(mode,))


def test_the_variants_emit_their_parameters():
    args = (1.0, jnp.ones(5), 0.5)
    assert _scan_params(scan_reverse, *args)[0]["reverse"] is True
    assert _scan_params(scan_unroll2, *args)[0]["unroll"] == 2
    assert _scan_params(scan_reverse_unroll, *args)[0]["unroll"] == 3
    assert _scan_params(scan_no_xs, *args)[0]["length"] == 4
    pytree = _scan_params(scan_pytree, *args)[0]
    assert pytree["num_carry"] == 3 and len(pytree["jaxpr"].out_avals) > 4
    assert _scan_params(scan_int_carry, *args)[0]["num_carry"] == 3
    assert "remat2" in emitted(scan_checkpoint, *args)
    assert _scan_params(scan_empty, *args)[0]["length"] == 0
    nested = _scan_params(scan_nested, *args)[0]["jaxpr"].jaxpr.eqns
    assert any(e.primitive.name == "scan" for e in nested)


def test_scan_parameters_are_honoured_or_refused():
    params = _scan_params(scan_basic, 1.0, jnp.ones(5), 0.5)[0]
    scan = PRIMITIVES["scan"]
    assert set(scan.taken(params)) == set(params)
    # Hints of older JAX versions that do not change the value are accepted...
    hinted = dict(params, linear=(False, False, False), _split_transpose=True)
    assert scan.taken(hinted) == scan.taken(params)
    # ...a parameter chainrule does not know is refused, never ignored.
    with pytest.raises(NoVJPRuleError, match="its parameter mystery=1"):
        scan.taken(dict(params, mystery=1))


@settings(max_examples=int(os.environ.get("CHAINRULE_FUZZ_EXAMPLES", 6)), deadline=None)
@given(
    length=st.integers(0, 7),
    reverse=st.booleans(),
    unroll=st.integers(1, 4),
    f32=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_scan_parameters_property(length, reverse, unroll, f32, seed):
    dtype = jnp.float32 if f32 else jnp.float64
    w, xs, c0 = (
        _randn(seed, dtype=dtype),
        _randn(seed + 1, length, 2, dtype=dtype),
        _randn(seed + 2, 2, dtype=dtype),
    )

    def loss(w, xs, c0):
        step = lambda c, x: (jnp.tanh(c * w + x), jnp.sin(c) * x)  # noqa: E731
        c, ys = lax.scan(step, c0, xs, reverse=reverse, unroll=unroll)
        return jnp.sum(c**2) + jnp.sum(ys * jnp.arange(1.0, 3.0, dtype=dtype))

    got = jax.jit(cr.grad(loss, argnums=(0, 1, 2)))(w, xs, c0)
    want = jax.grad(loss, argnums=(0, 1, 2))(w, xs, c0)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == jnp.float64 else dict(rtol=2e-5, atol=2e-5)
    for g, v in zip(got, want, strict=True):
        np.testing.assert_allclose(g, v, **tol)


def test_scan_with_closed_over_constant_gets_its_gradient():
    # The constant's cotangent is summed over the steps inside the backward scan.
    def f(w, xs):
        return lax.scan(lambda c, x: (c * w + x, None), 0.0, xs)[0]

    w, xs = _randn(3), _randn(4, 6)
    assert _scan_params(f, w, xs)[0]["num_consts"] == 1
    check_against_jax(f, w, xs, modes=("jit",))


def test_third_order_through_scan():
    def f(w):
        return lax.scan(lambda c, x: (jnp.sin(c * w + x), c * x), 0.5, jnp.linspace(0, 1, 5))[0]

    w = jnp.float64(1.3)
    got = cr.grad(cr.grad(cr.grad(f)))(w)
    want = jax.grad(jax.grad(jax.grad(f)))(w)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_scan_on_values_not_differentiated_runs_as_is():
    # The scan sees only constants of the differentiated function: evaluated, no node.
    def f(w):
        c, _ = lax.scan(lambda c, x: (c + x, c), 0.0, jnp.arange(4.0))
        return w * c

    nodes = []
    with core.recording(lambda node, where: nodes.append(node.prim.name)):
        assert float(cr.grad(f)(2.0)) == float(jax.grad(f)(2.0))
    assert "scan" not in nodes


# --- built on scan -------------------------------------------------------------------------


def fori_static(w, x):
    return lax.fori_loop(0, 6, lambda i, c: jnp.sin(c * w) + x * i, x)


def fori_static_pytree(w, x):
    def body(i, carry):
        a, b = carry
        return b * w, a + jnp.cos(b) * i

    return lax.fori_loop(2, 7, body, (x, w * x))


def lax_map(w, x):
    return lax.map(lambda v: jnp.tanh(v * w) ** 2, x)


def lax_map_batched(w, x):
    return lax.map(lambda v: jnp.tanh(v * w) ** 2, x, batch_size=2)


def assoc_scan(w, x):
    return lax.associative_scan(jnp.multiply, x * w)


def assoc_scan_reverse(w, x):
    return lax.associative_scan(lambda a, b: a + jnp.sin(b), x * w, reverse=True)


def polyval(w, x):
    return jnp.polyval(x * w, 0.7)


def interp(w, x):
    xp = jnp.cumsum(jnp.exp(x))  # increasing
    return jnp.interp(jnp.linspace(1.0, 8.0, 4) * w, xp, jnp.sin(xp) * w)


BUILT_ON_SCAN = [fori_static, fori_static_pytree, lax_map, lax_map_batched, polyval, interp]


def _check_built_on_scan(fun, dtype, modes=("eager", "jit", "vmap")):
    w, x = _randn(4, dtype=dtype) * 0.5 + 1.0, _randn(5, 5, dtype=dtype)
    assert "scan" in emitted(fun, w, x)
    check_against_jax(fun, w, x, modes=modes)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("fun", BUILT_ON_SCAN, ids=[f.__name__ for f in BUILT_ON_SCAN])
def test_built_on_scan_against_jax(fun, dtype):
    _check_built_on_scan(fun, dtype)


@pytest.mark.parametrize(
    "fun, dtype, mode",
    [(fun, DTYPES[i % 2], ("jit", "eager", "vmap")[i % 3]) for i, fun in enumerate(BUILT_ON_SCAN)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_built_on_scan_in_one_mode(fun, dtype, mode):
    _check_built_on_scan(fun, dtype, modes=(mode,))


@pytest.mark.parametrize("fun", [assoc_scan, assoc_scan_reverse])
def test_associative_scan_against_jax(fun):
    # associative_scan unrolls into slices and pads (no scan primitive): it must work too.
    w, x = _randn(6) * 0.5 + 1.0, _randn(7, 7)
    assert {"slice", "pad"} <= emitted(fun, w, x)
    check_against_jax(fun, w, x, modes=("jit",))


def test_searchsorted_integer_output_inside_a_differentiated_loss():
    def loss(x, q):
        idx = jnp.searchsorted(jnp.cumsum(jnp.exp(x)), q)  # an increasing grid
        return jnp.sum(jnp.take(x, jnp.clip(idx, 0, x.shape[0] - 1)) * q) + idx.sum()

    x, q = _randn(8, 9), jnp.exp(_randn(9, 4)) * 3.0
    assert "scan" in emitted(loss, x, q)
    idx = jnp.searchsorted(jnp.cumsum(jnp.exp(x)), q)
    assert idx.dtype == jnp.int32
    for f in (cr.grad, lambda f: jax.jit(cr.grad(f))):
        np.testing.assert_allclose(f(loss)(x, q), jax.grad(loss)(x, q), rtol=1e-12)
    check_against_jax(loss, x, q, modes=("vmap",))


# --- the backward pass is a scan ---------------------------------------------------------


def _long_loss(n: int):
    xs = jnp.sin(jnp.arange(n, dtype=jnp.float64))

    def loss(w):
        c, ys = lax.scan(lambda c, x: (jnp.tanh(c * w + x), c * c), 0.1, xs)
        return c + ys.mean()

    return loss


def test_jitted_gradient_does_not_grow_with_length():
    sizes = {}
    for n in (10, 10_000):
        jaxpr = jax.make_jaxpr(jax.jit(cr.grad(_long_loss(n))))(0.5)
        sizes[n] = _count_eqns(jaxpr.jaxpr)
    assert sizes[10] == sizes[10_000], sizes
    w = jnp.float64(0.5)
    np.testing.assert_allclose(
        jax.jit(cr.grad(_long_loss(10_000)))(w), jax.grad(_long_loss(10_000))(w), rtol=1e-10
    )


def _count_eqns(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a closed jaxpr's jaxpr
                if hasattr(sub, "eqns"):
                    total += _count_eqns(sub)
    return total


def test_eager_gradient_records_one_node_not_one_per_step():
    nodes = []
    loss = _long_loss(10_000)
    with core.recording(lambda node, where: nodes.append(node.prim.name)):
        got = cr.grad(loss)(0.5)
    assert nodes.count("scan") == 1 and len(nodes) < 20, nodes
    np.testing.assert_allclose(got, jax.grad(loss)(0.5), rtol=1e-10)


# --- while ---------------------------------------------------------------------------------


def test_while_over_a_counter_runs_forward():
    def loss(x):
        def body(c):
            i, acc = c
            return i + 1, acc + i

        n, total = lax.while_loop(lambda c: c[0] < 5, body, (0, 0))
        return jnp.sum(x**2) * total + n

    x = _randn(10, 3)
    assert "while" in emitted(loss, x)
    want = jax.grad(loss)(x)
    np.testing.assert_allclose(cr.grad(loss)(x), want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(cr.grad(loss))(x), want, rtol=1e-12)
    batch = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(
        jax.vmap(cr.grad(loss))(batch), jax.vmap(jax.grad(loss))(batch), rtol=1e-12
    )


def test_while_whose_condition_reads_a_differentiated_value():
    # The condition decides the number of steps; the carry is not a function of x:
    # JAX treats the result as a constant, and so does chainrule.
    def loss(x):
        n = lax.while_loop(lambda c: c < 3.0 * x, lambda c: c + 1.0, 0.0)
        return n * x**2

    x = jnp.float64(1.7)
    assert "while" in emitted(loss, x)
    for f in (cr.grad, lambda f: jax.jit(cr.grad(f))):
        np.testing.assert_allclose(f(loss)(x), jax.grad(loss)(x), rtol=1e-12)


def test_while_carry_not_reached_by_the_differentiated_value_is_a_constant():
    def loss(x):
        i, y, z = lax.while_loop(
            lambda c: c[0] < 4, lambda c: (c[0] + 1, c[1] * 1.5, c[2] * x), (0, 1.0, x)
        )
        return y * x  # z depends on x, but the loss does not use it

    x = jnp.float64(0.8)
    np.testing.assert_allclose(cr.grad(loss)(x), jax.grad(loss)(x), rtol=1e-12)


def test_differentiating_through_while_raises_jax_error_naming_the_line():
    def loss(x):
        return lax.while_loop(lambda c: c < 10.0, lambda c: c * 2.0, x)  # the loop line

    x = jnp.float64(0.3)
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        jax.grad(loss)(x)
    line = loss.__code__.co_firstlineno + 1
    for f in (cr.grad(loss), jax.jit(cr.grad(loss))):
        with pytest.raises(ValueError) as info:
            f(x)
        message = str(info.value)
        assert "Reverse-mode differentiation does not work for lax.while_loop" in message
        assert f"test_loops.py:{line}" in message and "lax.scan" in message
        assert "static" in message and "cr.jvp" in message
    _, vjp_fn = cr.vjp(loss, x)  # a vjp_fn refuses even a zero cotangent
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        vjp_fn(jnp.zeros_like(x))
    # forward only (the value) works
    assert float(cr.value_and_grad(lambda x: loss(lax.stop_gradient(x)) + x)(x)[0]) == float(
        loss(x) + x
    )


def _ode(x):
    """A loop whose trip count depends on data and whose body reads a constant
    (x) and an integer carry."""

    def body(c):
        i, y = c
        return i + 1, jnp.sin(y) * x + y * (1.0 + 0.1 * i)

    return lax.while_loop(lambda c: c[0] < 4, body, (0, x))[1]


def _newton_sqrt(a):
    """Newton's iteration to a tolerance: the condition reads the float carry."""

    def body(c):
        y, _ = c
        return 0.5 * (y + a / y), y

    return lax.while_loop(lambda c: jnp.max(jnp.abs(c[0] - c[1])) > 1e-9, body, (a, a + 1.0))[0]


def _nested(x):
    def outer(c):
        i, y = c
        inner = lax.while_loop(lambda d: d[0] < 3, lambda d: (d[0] + 1, d[1] * 0.9 + x), (0, y))
        return i + 1, jnp.tanh(inner[1])

    return lax.while_loop(lambda c: c[0] < 2, outer, (0, x))[1]


def _forward_mode_as_jax(fun):
    """cr.jvp (eager and under jit), cr.linearize, cr.jacfwd, vmap of cr.jvp and
    jacfwd of jacfwd of `fun` at a fixed point, against JAX's; returns the point."""
    x = jnp.array([0.3, 0.7, 1.9])
    t = jnp.array([1.0, -2.0, 0.5])
    want = jax.jvp(fun, (x,), (t,))
    for got in (
        cr.jvp(fun, (x,), (t,)),
        jax.jit(lambda x, t: cr.jvp(fun, (x,), (t,)))(x, t),
        (fun(x), cr.linearize(fun, x)[1](t)),
    ):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cr.jacfwd(fun)(x), jax.jacfwd(fun)(x), rtol=1e-10, atol=1e-12)
    xs, ts = jnp.stack([x, 2 * x]), jnp.stack([t, -t])
    jvp_of = lambda j: jax.vmap(lambda x, t: j(fun, (x,), (t,))[1])  # noqa: E731
    np.testing.assert_allclose(jvp_of(cr.jvp)(xs, ts), jvp_of(jax.jvp)(xs, ts), rtol=1e-10)
    np.testing.assert_allclose(
        cr.jacfwd(cr.jacfwd(fun))(x), jax.jacfwd(jax.jacfwd(fun))(x), rtol=1e-9, atol=1e-12
    )
    return x


@pytest.mark.parametrize("fun", [_ode, _newton_sqrt, _nested, jax.jit(_ode)])
def test_forward_mode_goes_through_while_loops_as_jax_jvp(fun):
    """jax.jvp, jax.linearize and jax.jacfwd go through a while loop; so do
    chainrule's (the loop's VJP, recorded at zero, is transposed into the loop
    run with its tangents): eagerly, under jit and vmap, jacfwd of jacfwd."""
    _forward_mode_as_jax(fun)


def test_forward_mode_through_a_while_loop_keeps_jax_types():
    """A weakly typed float carry, an integer operand (float0 tangent), float32."""

    def fun(x, n):
        return lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1.0, c[1] * x), (0.0, 1.0))[1]

    zero = np.zeros((), jax.dtypes.float0)
    for x in (2.0, jnp.float32(1.5)):
        got = cr.jvp(fun, (x, 3), (x, zero))
        want = jax.jvp(fun, (x, 3), (x, zero))
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.weak_type == w.weak_type
            np.testing.assert_allclose(g, w, rtol=1e-6)


def test_forward_mode_through_a_vmapped_while_loop_with_a_predicate_per_lane():
    """`jax.vmap` of a loop whose condition reads the batched value: one
    predicate per lane, and a step updates only the lanes still running; the
    tangents too (they once kept being scaled in finished lanes)."""

    def fun(x):
        return lax.while_loop(lambda c: c[1].sum() < 5.0, lambda c: (c[0] + 1, c[1] * 1.7), (0, x))[
            1
        ]

    xs = jnp.array([[0.3, 0.7], [1.0, 2.0], [0.1, 0.1]])
    ts = jnp.array([[1.0, -1.0], [0.5, 2.0], [3.0, 1.0]])
    want = jax.jvp(jax.vmap(fun), (xs,), (ts,))
    for batched in (jax.vmap(fun), jax.jit(jax.vmap(fun))):
        got = cr.jvp(batched, (xs,), (ts,))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
    # and a loop that is batched by vmap from outside cr.jvp
    per_example = jax.vmap(lambda x, t: cr.jvp(fun, (x,), (t,))[1])(xs, ts)
    np.testing.assert_allclose(per_example, want[1], rtol=1e-12)


def _in_scan(x):
    """A while loop in a scan step, reading the step's slice and a constant."""

    def step(c, t):
        c = _ode(c * t) + x
        return c, jnp.sum(c**2)

    c, ys = lax.scan(step, x, jnp.array([1.0, 0.5, 2.0]))
    return c * jnp.sum(ys)


def _in_reversed_scan_of_scan(x):
    def outer(c, t):
        inner = lax.scan(lambda d, _: (_newton_sqrt(d + t), None), c, None, length=2)[0]
        return inner, inner * t

    c, ys = lax.scan(outer, x, jnp.array([1.0, 2.0]), reverse=True)
    return c + ys[0]


def _in_cond(x):
    """Under jit the predicate is traced: a cond node (eagerly the branch is inlined)."""
    return lax.cond(jnp.sum(x) > 1.0, _nested, lambda x: jnp.sin(x) * 2.0, x)


def _in_switch_in_scan(x):
    def step(c, i):
        return lax.switch(i, [lambda c: c * 2.0, _ode, lambda c: _ode(c) ** 2], c), c

    c, ys = lax.scan(step, x, jnp.array([1, 0, 2]))
    return c + jnp.sum(ys, axis=0)


def _in_checkpoint(x):
    return jax.checkpoint(lambda x: _ode(x) * jnp.cos(x))(x) ** 2


def _in_checkpoint_saving(x):
    policy = jax.checkpoint_policies.everything_saveable
    return jax.checkpoint(lambda x: jnp.exp(_nested(jnp.sin(x))), policy=policy)(x)


def _pool_in_scan(x):
    def step(c, _):
        pooled = lax.reduce_window(c, -jnp.inf, lax.max, (2,), (1,), "SAME", window_dilation=(2,))
        return jnp.tanh(pooled) + c, None

    return lax.scan(step, x, None, length=2)[0]


_IN_BODIES = [
    _in_scan,
    _in_reversed_scan_of_scan,
    _in_cond,
    _in_switch_in_scan,
    _in_checkpoint,
    _in_checkpoint_saving,
    _pool_in_scan,
]


@pytest.mark.parametrize("fun", _IN_BODIES + [jax.jit(_in_cond)], ids=lambda f: f.__name__)
def test_forward_mode_goes_through_while_loops_in_scan_cond_and_checkpoint_bodies(fun):
    """A scan step, a cond branch or a checkpoint body holding a while loop (or
    another primitive with a JVP and no VJP): reverse mode traces the body's VJP
    into a jaxpr, where the loop's transposed JVP could only be a constant, so
    in forward mode's pass at zero the enclosing call answers with its own JVP
    (the body run forward with its tangents). As jax.jvp, eagerly, under jit
    and vmap, jacfwd of jacfwd; reverse mode still refuses, as JAX's."""
    x = _forward_mode_as_jax(fun)
    with pytest.raises(Exception) as raised:
        jax.jit(jax.grad(lambda x: jnp.sum(fun(x))))(x)
    with pytest.raises(type(raised.value)):
        jax.jit(cr.grad(lambda x: jnp.sum(fun(x))))(x)


def test_forward_mode_through_a_while_loop_in_a_scan_keeps_float32_and_integer_carries():
    """A float32 carry beside an integer one and an integer `xs`: tangents only
    for the floats, of their types (the scan's carry must keep its type)."""

    def fun(x):
        def step(c, k):
            n, y = c
            y = lax.while_loop(lambda d: d[0] < k, lambda d: (d[0] + 1, d[1] * 0.5 + x), (0, y))[1]
            return (n + k, y), y * 2.0

        (n, y), ys = lax.scan(step, (0, x), jnp.array([1, 3, 2]))
        return y + jnp.sum(ys, axis=0) + n

    x = jnp.array([0.5, 1.5], jnp.float32)
    t = jnp.ones_like(x)
    got, want = cr.jvp(fun, (x,), (t,)), jax.jvp(fun, (x,), (t,))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-6)


def _while_of(y):
    """A loop whose carry depends on `y` only."""
    return lax.while_loop(lambda s: s[1] < 3, lambda s: (s[0] * y + 0.1, s[1] + 1), (y, 0))[0]


def _scan_reading_y(x, y):
    def body(c, t):
        return c * x + _while_of(y) * t, c

    c, ys = lax.scan(body, 1.0, jnp.array([1.0, 0.5]))
    return c + jnp.sum(ys)


def _cond_reading_y(x, y):
    return lax.cond(x > 0.0, lambda: jnp.sin(x) * _while_of(y), lambda: x)


def _checkpoint_closing_over_y(x, y):
    return jax.checkpoint(lambda x: jnp.sin(x) * _while_of(y))(x)


def _floored_carry(x, y):
    """JAX's jax.random.binomial: a while loop whose float carry is floored from
    the differentiated value, so it has a zero tangent (a symbolic zero in JAX)."""
    return (
        lax.while_loop(
            lambda c: c[1] < 3,
            lambda c: (c[0] + jnp.floor(x * c[0] + y), c[1] + 1),
            (jnp.floor(x), 0),
        )[0]
        + x * y
    )


@pytest.mark.parametrize(
    "fun", [_scan_reading_y, _cond_reading_y, _checkpoint_closing_over_y, _floored_carry]
)
def test_a_while_loop_that_no_differentiated_value_reaches_is_not_differentiated(fun):
    """A while loop inside a scan, cond or checkpoint body reading only values
    that are not differentiated (another argument, a closed-over constant), or
    reading a differentiated value only through `floor`: JAX's reverse mode
    goes through it (it has no tangent), and so does chainrule's, at first and
    second order, eagerly and under jit and vmap. Differentiated w.r.t. y, it
    is refused, as by JAX."""
    x, y = jnp.asarray(0.7), jnp.asarray(1.3)
    np.testing.assert_allclose(cr.grad(fun)(x, y), jax.grad(fun)(x, y), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(cr.grad(fun))(x, y), jax.grad(fun)(x, y), rtol=1e-12)
    np.testing.assert_allclose(cr.hessian(fun)(x, y), jax.hessian(fun)(x, y), rtol=1e-10)
    xs = jnp.array([0.7, -0.2, 1.1])
    np.testing.assert_allclose(
        jax.vmap(cr.grad(fun), (0, None))(xs, y), jax.vmap(jax.grad(fun), (0, None))(xs, y)
    )
    np.testing.assert_allclose(cr.jacfwd(fun)(x, y), jax.jacfwd(fun)(x, y), rtol=1e-12)
    if fun is not _floored_carry:
        for grad in (jax.grad, cr.grad):
            with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
                jax.jit(grad(fun, argnums=1))(x, y)


def test_a_while_loop_computing_only_unused_ys_is_not_differentiated():
    """A scan whose ys, computed by a while loop on the differentiated xs, are
    not used: they get no cotangent, so the loop is not differentiated (JAX's
    partial evaluation drops it); used, it is refused as by JAX."""

    def loop(c):
        return lax.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, jnp.sin(s[1])), (0, c))[1]

    def scanned(x):
        return lax.scan(lambda c, xi: (c * xi, loop(xi)), 1.0, x)

    x = jnp.array([0.7, 1.3, -0.4])
    f = lambda x: scanned(x)[0]  # noqa: E731
    for grad in (cr.grad, lambda f: jax.jit(cr.grad(f))):
        np.testing.assert_allclose(grad(f)(x), jax.grad(f)(x), rtol=1e-12)
    np.testing.assert_allclose(cr.hessian(f)(x), jax.hessian(f)(x), rtol=1e-12)
    used = lambda x: scanned(x)[0] + jnp.sum(scanned(x)[1])  # noqa: E731
    for grad in (jax.grad, cr.grad):
        with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
            grad(used)(x)


def test_reparameterized_gamma_samples_in_a_scan_in_both_modes():
    """`jax.random.gamma`'s derivative w.r.t. its shape runs a while loop on the
    shape (`random_gamma_grad`); inside a scan over keys it is a constant of the
    backward scan, which forward mode then differentiated (a hessian raised)."""
    key = jax.random.key(0)
    keys = jax.random.split(key, 3)

    def fun(a):
        return lax.scan(lambda c, k: (c + jax.random.gamma(k, a) * c, None), 1.0, keys)[0]

    a = jnp.asarray(1.7)
    np.testing.assert_allclose(cr.grad(fun)(a), jax.grad(fun)(a), rtol=1e-10)
    np.testing.assert_allclose(cr.jacfwd(fun)(a), jax.jacfwd(fun)(a), rtol=1e-10)
    np.testing.assert_allclose(cr.hessian(fun)(a), jax.hessian(fun)(a), rtol=1e-8)
    np.testing.assert_allclose(jax.jit(cr.hessian(fun))(a), jax.hessian(fun)(a), rtol=1e-8)


def test_fori_loop_with_traced_bounds_is_a_while():
    def loss(x, n):
        return lax.fori_loop(0, n, lambda i, c: c * x, 1.0)

    x, n = jnp.float64(1.1), jnp.int32(4)
    assert "while" in emitted(loss, x, n)
    with pytest.raises(ValueError, match="fori_loop with static"):
        jax.jit(cr.grad(loss))(x, n)


# --- models --------------------------------------------------------------------------------

VOCAB, EMBED, HIDDEN = 12, 6, 8


def _rnn_params(key, dtype=jnp.float64):
    k = jax.random.split(key, 4)
    scale = 0.3
    return {
        "embed": scale * jax.random.normal(k[0], (VOCAB, EMBED), dtype),
        "W": scale * jax.random.normal(k[1], (EMBED + HIDDEN, 4 * HIDDEN), dtype),
        "b": jnp.zeros(4 * HIDDEN, dtype),
        "out": scale * jax.random.normal(k[2], (HIDDEN, VOCAB), dtype),
    }


def rnn_loss(params, tokens):
    """Character-level LSTM: embed, scan an LSTM cell, softmax cross-entropy on the next char."""
    inputs, targets = tokens[:-1], tokens[1:]

    def cell(carry, token):
        h, c = carry
        z = jnp.concatenate([params["embed"][token], h]) @ params["W"] + params["b"]
        i, f, g, o = jnp.split(z, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h @ params["out"]

    zeros = jnp.zeros(HIDDEN, params["W"].dtype)
    _, logits = lax.scan(cell, (zeros, zeros), inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def test_char_rnn_trains_with_jax_grads_at_every_step():
    text = "hello chainrule, hello scan"
    chars = sorted(set(text))[:VOCAB]
    tokens = jnp.array([chars.index(ch) if ch in chars else 0 for ch in text])
    params = _rnn_params(jax.random.PRNGKey(0))
    assert "scan" in emitted(rnn_loss, params, tokens)
    opt = optax.sgd(0.5)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = cr.value_and_grad(rnn_loss)(params, tokens)
        want_loss, want = jax.value_and_grad(rnn_loss)(params, tokens)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss, grads, want_loss, want

    losses = []
    for _ in range(20):
        params, state, loss, grads, want_loss, want = step(params, state)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
        losses.append(float(loss))
    assert losses[-1] < 0.99 * losses[0], losses  # it learns


@pytest.mark.slow
def test_char_rnn_gradients_eagerly_and_second_order():
    params = _rnn_params(jax.random.PRNGKey(1))
    tokens = jnp.array([1, 4, 2, 7, 3, 3, 0])
    check_against_jax(rnn_loss, params, tokens, argnums=(0,), modes=("eager",))


def ode_rk4(theta, y0):
    """A neural ODE dy/dt = tanh(W y + b), 8 fixed RK4 steps in fori_loop, squared endpoint."""
    W, b = theta
    dt = 0.1

    def f(y):
        return jnp.tanh(W @ y + b)

    def rk4(i, y):
        k1 = f(y)
        k2 = f(y + dt / 2 * k1)
        k3 = f(y + dt / 2 * k2)
        k4 = f(y + dt * k3)
        return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    return jnp.sum(lax.fori_loop(0, 8, rk4, y0) ** 2)


def test_neural_ode_rk4_eager_and_jit():
    theta = (_randn(11, 3, 3), _randn(12, 3))
    y0 = _randn(13, 3)
    assert "scan" in emitted(ode_rk4, theta, y0)
    want = jax.grad(ode_rk4, argnums=(0, 1))(theta, y0)
    for f in (cr.grad, lambda f, **k: jax.jit(cr.grad(f, **k))):
        got = f(ode_rk4, argnums=(0, 1))(theta, y0)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_neural_ode_rk4_against_jax_every_mode():
    theta = (_randn(11, 3, 3), _randn(12, 3))
    check_against_jax(lambda W, b, y0: ode_rk4((W, b), y0), *theta, _randn(13, 3))


# --- the README's example -----------------------------------------------------------------


def test_readme_char_rnn_example_runs():
    with open("README.md", encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Example: a character-level RNN", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))
    assert "lax.scan" in code and "cr.value_and_grad" in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # its asserts check jax.grad's numbers


def _squarings_by_threshold(x):
    # a scan step whose cond reads only the step's x and a constant (not the
    # carry's tangent): jax.scipy.linalg.expm squares its Pade approximant so
    m = jnp.outer(x, x) * 0.2 + jnp.eye(3)

    def step(c, n):
        return lax.cond(n < 2.0, lambda c: c @ c * 0.5, lambda c: jnp.sin(c), c), None

    return jnp.sum(lax.scan(step, m, jnp.arange(4.0))[0], axis=0)


@pytest.mark.parametrize(
    "fun",
    [_squarings_by_threshold, lambda x: jax.scipy.linalg.expm(jnp.outer(x, x) * 0.3)[0]],
    ids=["scan_cond", "expm"],
)
def test_forward_mode_through_a_cond_in_a_scan_step(fun):
    # the pass at zero of forward mode traced the step's VJP, where the cond's
    # predicate was the step's own value and none of its operands chainrule's:
    # it was evaluated eagerly on that traced predicate (UnexpectedTracerError)
    _forward_mode_as_jax(fun)
    x = jnp.array([0.3, 0.7, 1.9])
    np.testing.assert_allclose(cr.hessian(fun)(x), jax.hessian(fun)(x), rtol=1e-9, atol=1e-12)


def test_forward_mode_through_a_while_loop_given_a_literal_constant():
    # in a jaxpr, a Python float passed to a call holding a while loop is a
    # literal (JAX 0.10's TypedFloat), a constant of the loop: the loop's JVP
    # wrapped it in a Tracer whose aval could not be computed, and reading
    # `aval` recursed through __getattr__ (RecursionError in cr.jvp; forward
    # mode of jax.scipy.special.hyp1f1 at second order hit it)
    def g(c, b):
        step = lambda s: (s[0] * c + jnp.sin(b * s[0]), s[1] + 1)  # noqa: E731
        return lax.while_loop(lambda s: s[1] < 3, step, (b, 0))[0]

    _forward_mode_as_jax(jax.jit(lambda b: jax.jit(g)(0.7, b)))
    b = jnp.array([0.2, 0.5, 3.0])
    h = lambda b: jax.scipy.special.hyp1f1(1.5, b, 0.7)  # noqa: E731
    np.testing.assert_allclose(cr.jacfwd(cr.jacfwd(h))(b), jax.jacfwd(jax.jacfwd(h))(b), rtol=1e-9)
