"""The eager fast paths for `jax.numpy` code, each against JAX as the oracle.

* `defjvps` rules (`jax.nn.relu`, ...) are transposed without recomputing the
  function's output (`rules/calls.py` `_per_argument_rules`): same numbers as
  `jax.vjp` at first and second order, eagerly, under `jit` and `vmap`, for
  JAX's functions and for users' own (several arguments, `None` rules,
  integer arguments, pytree inputs and outputs), and the function's body runs
  once per eager gradient.
* Constants a loss computes (`jnp.zeros`, `lax.full`, `jnp.eye`, a `jit`-ted
  helper on constants, ...) are `jax.Array`s, as under `jax.grad`, with JAX's
  dtype and weak type and bits: exact primitives are folded with NumPy
  (`Primitive.exact_on_host`), the rest left to JAX.
* A `jit` body is read once into a plan (`rules/calls.py` `_Plan`) and reused.
* The transposed rules of JAX's own functions (`jax.nn.relu`, `jnp.logaddexp`,
  a rule inside a `jit` body) and the bodies of JAX's own functions are read
  once per types and reused; a user's rule and body outside `jit` run on every
  gradient, as under `jax.grad`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax import lax

import chainrule as cr
from chainrule.engine import core
from chainrule.engine.core import PRIMITIVES
from chainrule.engine.rules import calls
from tests.oracle import check_against_jax

# --- defjvps functions --------------------------------------------------------------------


@jax.custom_jvp
def scaled_product(x, y, n):
    """Three arguments, the last an integer; a rule per differentiable one."""
    return jnp.sin(x) * y * n


scaled_product.defjvps(
    lambda t, ans, x, y, n: jnp.cos(x) * t * y * n,
    lambda t, ans, x, y, n: jnp.sin(x) * t * n,
    None,
)


@jax.custom_jvp
def only_first(x, y):
    """The second argument has no rule (`None`): its tangent contributes nothing."""
    return x * x + lax.stop_gradient(y)


only_first.defjvps(lambda t, ans, x, y: 2.0 * x * t, None)


@jax.custom_jvp
def pair_out(p):
    """A pytree input (dict) and a tuple output; the rule uses the output."""
    e = jnp.exp(p["a"])
    return e, e * p["b"]


pair_out.defjvps(lambda t, ans, p: (ans[0] * t["a"], ans[1] * t["a"] + ans[0] * t["b"]))


# JAX's own defjvps functions, each made a function of any real z (logit and
# log1mexp have restricted domains)
JAX_DEFJVPS = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "logit": lambda z: jax.scipy.special.logit(jax.nn.sigmoid(z)),
    "log1mexp": lambda z: jax.nn.log1mexp(jax.nn.softplus(z) + 0.1),
}


def test_the_jax_functions_tested_use_defjvps():
    """The fast path is what these tests exercise: each rule is a defjvps rule."""
    for fn in (jax.nn.relu, jax.nn.relu6, jax.scipy.special.logit, jax.nn.log1mexp):
        assert fn.jvp.__code__ is calls._DEFJVPS_CODE, fn
    assert scaled_product.jvp.__code__ is calls._DEFJVPS_CODE


@pytest.mark.parametrize("name", sorted(JAX_DEFJVPS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_jax_nn_defjvps_functions_against_jax(name, dtype):
    fn = JAX_DEFJVPS[name]
    x = jnp.linspace(-3.0, 7.0, 11, dtype=dtype)  # both sides of relu6's kinks, and 0
    check_against_jax(lambda x: fn(x) * x, x)


def test_user_defjvps_with_several_arguments_and_an_integer():
    x, y = jnp.linspace(-1.0, 1.0, 5), jnp.linspace(0.5, 2.0, 5)
    check_against_jax(lambda x, y: scaled_product(x, y, 3), x, y)
    for argnums in (0, 1, (0, 1)):  # each argument alone: the other's rule is skipped
        got = cr.grad(lambda x, y: jnp.sum(scaled_product(x, y, 3)), argnums)(x, y)
        want = jax.grad(lambda x, y: jnp.sum(scaled_product(x, y, 3)), argnums)(x, y)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_user_defjvps_with_a_none_rule():
    x, y = jnp.linspace(-1.0, 1.0, 4), jnp.linspace(1.0, 2.0, 4)
    check_against_jax(only_first, x, y)
    # y's gradient is zero, as in JAX (its rule is None)
    got = cr.grad(lambda x, y: jnp.sum(only_first(x, y)), 1)(x, y)
    np.testing.assert_array_equal(np.asarray(got), np.zeros(4))


def test_user_defjvps_with_pytree_input_and_tuple_output():
    p = {"a": jnp.linspace(-1.0, 1.0, 3), "b": jnp.linspace(2.0, 3.0, 3)}
    ct = (jnp.asarray([0.3, -1.0, 2.0]), jnp.asarray([1.5, 0.5, -0.25]))

    def pulled(vjp):
        return lambda p: vjp(pair_out, p)[1](ct)[0]

    want = pulled(jax.vjp)(p)
    for got in (pulled(cr.vjp)(p), jax.jit(pulled(cr.vjp))(p)):
        for k in p:
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6)

    def second(vjp, grad):  # gradient of <vjp(ct), p>: through the rule's own backward
        return grad(lambda p: sum(jnp.vdot(v, p[k]) for k, v in pulled(vjp)(p).items()))

    want2, got2 = second(jax.vjp, jax.grad)(p), second(cr.vjp, cr.grad)(p)
    for k in p:
        np.testing.assert_allclose(np.asarray(got2[k]), np.asarray(want2[k]), rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.floats(-5.0, 5.0, allow_nan=False, width=32), min_size=1, max_size=6),
    st.sampled_from(sorted(JAX_DEFJVPS)),
)
def test_defjvps_in_a_composition_against_jax_grad(values, name):
    fn = JAX_DEFJVPS[name]
    x = jnp.asarray(values, jnp.float32)

    def loss(w):
        return jnp.sum(fn(w * x + 0.5) ** 2) + jnp.sum(fn(w) * x)

    w = jnp.float32(0.7)
    want = jax.grad(loss)(w)
    for got in (cr.grad(loss)(w), jax.jit(cr.grad(loss))(w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    # (DESIGN.md's float32 atol: a second derivative that cancels to 2e-12, as
    # logit's at x = 1e-6, is rounding noise in both, 1.96e-12 under jit too)
    np.testing.assert_allclose(
        np.asarray(cr.grad(cr.grad(loss))(w)),
        np.asarray(jax.grad(jax.grad(loss))(w)),
        rtol=1e-4,
        atol=1e-6,
    )


def test_defjvps_body_runs_once_per_eager_gradient():
    """The output is taken from the node, not recomputed by a second call."""
    calls_ = []

    @jax.custom_jvp
    def counted(x):
        calls_.append(1)
        return jnp.tanh(x)

    counted.defjvps(lambda t, ans, x: (1.0 - ans**2) * t)
    x = jnp.linspace(-1.0, 1.0, 3)
    g = cr.grad(lambda x: jnp.sum(counted(x)))(x)
    assert len(calls_) == 1
    np.testing.assert_allclose(np.asarray(g), 1.0 - np.tanh(np.asarray(x)) ** 2, rtol=1e-6)


def test_defjvps_under_vmap_of_the_function_takes_the_general_path():
    """Inside `jax.vmap` JAX wraps the rule in its batching transform: not the
    plain defjvps closure, so the general path (the rule itself) runs."""
    xs = jnp.linspace(-2.0, 2.0, 6).reshape(2, 3)
    got = cr.grad(lambda xs: jnp.sum(jax.vmap(jax.nn.relu)(xs) * xs))(xs)
    want = jax.grad(lambda xs: jnp.sum(jax.vmap(jax.nn.relu)(xs) * xs))(xs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want))


# --- constants in a loss are jax.Arrays --------------------------------------------------

CONSTANTS = {
    "jnp.zeros": lambda: jnp.zeros((3,)),
    "jnp.ones int": lambda: jnp.ones((2, 2), jnp.int32),
    "jnp.full weak": lambda: jnp.full((3,), 2.5),
    "lax.full f64": lambda: lax.full((2,), 1.5, jnp.float64),
    "jnp.eye": lambda: jnp.eye(3),
    "jnp.arange": lambda: jnp.arange(4.0),
    "jnp.sum of numpy": lambda: jnp.sum(np.ones(3, np.float32)),
    "reshape/transpose": lambda: jnp.ones((2, 3)).T.reshape(-1),
    "comparison and select": lambda: jnp.where(jnp.arange(3) > 0, 1.0, -1.0),
    "concatenate": lambda: jnp.concatenate([jnp.ones(2), jnp.zeros(1)]),
    "nan to int": lambda: jnp.asarray([np.nan, 3e9, -1.5], jnp.float32).astype(jnp.int32),
    "jitted helper": lambda: jax.jit(lambda a: jnp.cumsum(a) * 2)(jnp.ones(3)),
}


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constants_a_loss_computes_are_jax_arrays_as_under_jax_grad(name):
    make = CONSTANTS[name]
    want = make()
    seen = {}

    def loss(w):
        c = make()
        seen["c"] = c
        return jnp.sum(w * jnp.sum(jnp.asarray(c, jnp.float32)))

    for grad in (cr.grad, jax.grad):
        grad(loss)(jnp.float32(1.0))
        c = seen["c"]
        assert isinstance(c, jax.Array), (name, type(c))
        assert c.dtype == want.dtype and c.shape == want.shape, name
        assert c.weak_type == want.weak_type, name
        np.testing.assert_array_equal(np.asarray(c), np.asarray(want))


def test_a_constant_can_be_updated_with_at():
    """`jnp.zeros(...).at[i].set(v)` in a loss: the constant is a jax.Array."""

    def loss(w):
        z = jnp.zeros((3,)).at[0].set(1.0)
        return jnp.sum(z * w)

    w = jnp.ones(3)
    np.testing.assert_array_equal(np.asarray(cr.grad(loss)(w)), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(jax.jit(cr.grad(loss))(w)), [1.0, 0.0, 0.0])


def test_exact_primitives_fold_and_others_do_not():
    """Only primitives whose NumPy version gives XLA's bits fold constants."""
    folded = {n for n, p in PRIMITIVES.items() if p.exact_on_host}
    assert {"convert_element_type", "broadcast_in_dim", "select_n", "eq", "reshape"} <= folded
    assert not folded & {"exp", "sin", "add", "mul", "reduce_sum", "dot_general", "cumsum"}
    for name in folded:
        assert PRIMITIVES[name].host_impl is not None, name


# --- the plan of a jit body -------------------------------------------------------------


def test_a_jit_body_is_planned_once_and_reused():
    @jax.jit
    def helper(a, b):
        return a * b + 2.0, a  # a literal, an input returned as it is

    x = jnp.linspace(0.0, 1.0, 3)
    closed = jax.make_jaxpr(helper)(x, x)
    inner = closed.eqns[0].params["jaxpr"].jaxpr
    calls._PLANS.pop(inner, None)

    def loss(x):
        out, same = helper(x, x)
        return jnp.sum(out * same)

    g1 = cr.grad(loss)(x)
    plan = calls._PLANS[inner]
    g2 = cr.grad(loss)(x)
    assert calls._PLANS[inner] is plan
    want = jax.grad(loss)(x)
    for g in (g1, g2):
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-6)


# --- the transposed rules of JAX's functions, read once -------------------------------

# JAX's functions with custom rules: defjvps rules at the top level (relu, logit,
# ...) and rules inside a jit body (`jnp.logaddexp`, softplus, sinc, ...)
JAX_RULES = {
    **JAX_DEFJVPS,
    "softplus": jax.nn.softplus,
    "logaddexp": lambda z: jnp.logaddexp(z, 0.3 * z[::-1]),
    "logaddexp2": lambda z: jnp.logaddexp2(z, 1.0),
    "sinc": jnp.sinc,
    "mish": jax.nn.mish,
    "log_sigmoid": jax.nn.log_sigmoid,
}
EDGES = [0.0, -0.0, 1.0, np.inf, -np.inf, 1e-40, -1e-38, 40.0, -100.0]


def _rule_loss(fn, dtype):
    return lambda z: jnp.sum(fn(z) * jnp.arange(1, z.size + 1, dtype=dtype).reshape(z.shape))


@pytest.mark.parametrize("name", sorted(JAX_RULES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_jax_functions_transposed_rule_is_read_once(monkeypatch, name, dtype):
    """Read once per rule and types, then reused: the same numbers on every
    call, those of the rule transposed anew (to rounding: the rule's operations
    on the host, not one at a time on XLA) and of `jax.grad`."""
    rng = np.random.default_rng(0)
    loss = _rule_loss(JAX_RULES[name], dtype)
    for values in (rng.normal(size=7) * 3, EDGES):
        x = jnp.asarray(np.asarray(values, dtype))
        calls._TRANSPOSED.clear()
        first = cr.grad(loss)(x)
        assert calls._TRANSPOSED, "the fast path was not taken"
        entries = dict(calls._TRANSPOSED)
        again = cr.grad(loss)(x)
        assert calls._TRANSPOSED == entries  # reused, not read again
        with monkeypatch.context() as m:
            m.setattr(calls, "_transposed_rule_key", lambda *a: None)
            anew = cr.grad(loss)(x)
        want = jax.grad(loss)(x)
        assert first.dtype == anew.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
        ulps = 64 * np.finfo(dtype).eps  # (libm against XLA, exp2 of -100: 16 ulp)
        np.testing.assert_allclose(np.asarray(first), np.asarray(anew), rtol=ulps, atol=0)
        np.testing.assert_allclose(np.asarray(first), np.asarray(want), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["softplus", "logaddexp", "sinc", "log_sigmoid"])
def test_jax_functions_with_rules_in_a_jit_body_against_jax(name):
    # (an exact 0, no value within rounding of it: sinc's derivatives there
    # cancel catastrophically, to different noise in any two evaluations)
    x = jnp.asarray([-2.75, -1.5, 0.0, 0.5, 1.25, 3.0, 6.5])
    check_against_jax(JAX_RULES[name], x)


RULE_SCALE = [1.0]  # read by the rule below when it runs


@jax.custom_jvp
def scaled_sin(x):
    return jnp.sin(x)


scaled_sin.defjvps(lambda t, ans, x: RULE_SCALE[0] * jnp.cos(x) * t)


def test_a_users_rule_runs_on_every_gradient():
    """A user's rule may read state that changes (as here, on purpose): it is
    never read once, as `jax.grad` runs it on every eager gradient."""
    calls._TRANSPOSED.clear()
    x = jnp.float32(0.3)
    for scale in (1.0, 3.0, -2.0):
        RULE_SCALE[0] = scale
        assert cr.grad(scaled_sin)(x) == jax.grad(scaled_sin)(x)
    RULE_SCALE[0] = 1.0
    assert not calls._TRANSPOSED


def test_a_users_rule_inside_a_jit_body_against_jax():
    """Inside a `jit` body JAX traces the rule once into a jaxpr (and reuses it
    itself): that jaxpr's transpose is read once per types, here f32 and f64."""

    @jax.jit
    def body(x):
        return scaled_product(x, 2.0 * x, 3) + only_first(x, x)

    calls._TRANSPOSED.clear()
    for dtype in (jnp.float32, jnp.float64):
        x = jnp.linspace(-1.0, 1.0, 5, dtype=dtype)
        check_against_jax(body, x)
        got, want = cr.grad(lambda x: jnp.sum(body(x)))(x), jax.grad(lambda x: jnp.sum(body(x)))(x)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert len(calls._TRANSPOSED) >= 2


def test_a_jax_functions_body_is_read_once_and_gives_its_numbers(monkeypatch):
    """`jax.nn.relu`'s body (a `jit` function) and logit's (plain `jax.numpy`
    code) are read into jaxprs once per types, on the host: the same bits as
    running the body, and JAX's output structure reaches `custom_jvp.__call__`."""
    rng = np.random.default_rng(1)
    for fn in (jax.nn.relu, jax.scipy.special.logit):
        for dtype in (np.float32, np.float64):
            x = jnp.asarray(rng.uniform(0.05, 0.95, (3, 4)).astype(dtype))
            loss = _rule_loss(fn, dtype)
            calls._BODIES.clear()
            first = cr.value_and_grad(loss)(x)
            assert len(calls._BODIES) == 1
            again = cr.value_and_grad(loss)(x)
            assert len(calls._BODIES) == 1
            with monkeypatch.context() as m:
                m.setattr(calls, "_read_body", lambda *a: None)
                ran = cr.value_and_grad(loss)(x)
            for a, b, c in zip(first, again, ran, strict=True):
                assert a.dtype == b.dtype == c.dtype
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
            want = jax.value_and_grad(loss)(x)
            np.testing.assert_allclose(np.asarray(first[1]), np.asarray(want[1]), rtol=1e-5)


def test_a_users_body_runs_on_every_call():
    calls._BODIES.clear()
    x = jnp.linspace(0.1, 1.0, 4)
    for scale in (1.0, 2.0):
        RULE_SCALE[0] = scale
        got = cr.value_and_grad(lambda x: jnp.sum(scaled_sin(x)))(x)
        want = jax.value_and_grad(lambda x: jnp.sum(scaled_sin(x)))(x)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6)
    RULE_SCALE[0] = 1.0
    assert not calls._BODIES


def test_the_transposed_rules_read_once_are_bounded(monkeypatch):
    monkeypatch.setattr(calls, "_TRANSPOSED_LIMIT", 3)
    calls._TRANSPOSED.clear()
    for n in range(1, 8):  # a new shape: a new entry, the oldest goes
        x = jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)
        got = cr.grad(lambda x: jnp.sum(jax.nn.relu(x) * x))(x)
        np.testing.assert_array_equal(np.asarray(got), np.where(np.asarray(x) > 0, 2 * x, 0))
        assert len(calls._TRANSPOSED) == min(n, 3)


# --- select_n on large host arrays: the bits, not np.where ----------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float32, np.float64, np.int32]),
    shape=st.sampled_from([(64, 64), (4096,), (3, 50, 40)]),
    transposed=st.booleans(),
)
def test_large_select_n_on_the_host_gives_np_where_to_the_bit(seed, dtype, shape, transposed):
    """ReLU's VJP selects with a mask without pattern; from `_SELECT_BY_BITS`
    entries the host selects by masking bits. Same bits as `np.where` (NaN
    payloads, signed zeros, infinities), on contiguous and transposed views."""
    from chainrule.engine.rules import elementwise

    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    assert size >= elementwise._SELECT_BY_BITS
    bits = rng.integers(0, 2 ** (8 * np.dtype(dtype).itemsize), size, dtype=np.uint64)
    pool = bits.astype({4: np.uint32, 8: np.uint64}[np.dtype(dtype).itemsize]).view(dtype)
    on_true, on_false = pool.reshape(shape), rng.permutation(pool).reshape(shape)
    which = rng.random(shape) < 0.5
    if transposed:
        which, on_true, on_false = which.T, on_true.T, on_false.T
    got = elementwise._host_select_n(which, on_false, on_true)
    want = np.where(which, on_true, on_false)
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = np.ascontiguousarray(got), np.ascontiguousarray(want)
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


def test_relu_gradient_of_a_large_layer_against_jax(monkeypatch):
    """The path above inside a real gradient (jax.nn.relu's rule selects)."""
    from chainrule.engine.rules import elementwise

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 80)).astype(np.float32)
    x = rng.standard_normal((64, 80)).astype(np.float32)

    def loss(w):
        return jnp.sum(jax.nn.relu(x @ w.T) ** 2)

    want = jax.grad(loss)(w)  # (float32 sums of 80 products: atol scaled to the values)
    got = cr.grad(loss)(w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))
    monkeypatch.setattr(elementwise, "_SELECT_BY_BITS", 10**9)  # np.where: the same bits
    assert np.array_equal(cr.grad(loss)(w), got)
    monkeypatch.undo()
    # first and second order against jax.vjp, eagerly (the bit path), under jit and vmap
    check_against_jax(lambda w, x: jax.nn.relu(x @ w.T), w, x, argnums=(0, 1))


# --- results handed to JAX ------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 1000, 20000, 70000])
@pytest.mark.parametrize("offset", [0, 1, 4, 8, 12])
@pytest.mark.parametrize("kind", ["owned", "view", "copy", "transposed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_to_jax_never_shares_memory_the_caller_can_write(n, offset, kind, dtype):
    """`host.to_jax` at every alignment (XLA aliases a 64-byte-aligned buffer,
    copies others): a view, or an array passed with `copy`, is never aliased;
    the values and dtype are the array's, and writing into the array afterwards
    leaves the `jax.Array` as it was."""
    from chainrule.engine import host

    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n * itemsize + 64 + offset * 4, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset * 4
    x = raw[start : start + n * itemsize].view(dtype)
    x[...] = np.arange(n, dtype=dtype)
    if kind == "owned":
        x = x.copy()
    elif kind == "transposed":
        x = x[: n - n % 2].reshape(2, -1).T if n > 1 else x
    want = np.array(x)
    out = host.to_jax(x, copy=kind == "copy")
    assert isinstance(out, jax.Array) and out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out), want)
    if kind != "owned":  # (chainrule's own results may be aliased)
        x[...] = -1
        np.testing.assert_array_equal(np.asarray(out), want)


# Values a loss computes from a mask of its (traced) input and Python numbers:
# JAX types them weakly (no operand is strongly typed), so they join a float32
# computation as float32 and an int8 one as int8. NumPy has no weak type: a
# host evaluation would make them float64/int64 and promote what follows.
MASKED_WEAK = {
    "jnp.where floats": lambda x: jnp.where(x > 0, 1.0, 0.5),
    "lax.select floats": lambda x: lax.select(
        x > 0, jnp.full(x.shape, 2.0), jnp.full(x.shape, 3.0)
    ),
    "jnp.where ints": lambda x: jnp.where(x > 0, 2, -1),
    "lax.select ints in a jit": lambda x: jax.jit(lambda m: lax.select(m, 3, 5))(x[0] > 0),
    "jnp.where mixed": lambda x: jnp.where(x > 0, 1, 0.25),
}


@settings(max_examples=15, deadline=None)
@given(
    values=st.lists(st.floats(-3, 3, allow_nan=False), min_size=3, max_size=3),
    name=st.sampled_from(sorted(MASKED_WEAK)),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.int8]),
)
def test_weak_values_a_mask_selects_stay_weak(values, name, dtype):
    make = MASKED_WEAK[name]

    def loss(x):
        m = make(x)
        joined = jnp.ones(3, dtype) * m  # (promotes to float64/int64 if m is strong)
        aux = (m.dtype, m.weak_type, joined.dtype, joined.weak_type)
        return jnp.sum(x * joined.astype(x.dtype)), aux

    x = jnp.asarray(values, jnp.float32)
    want, want_aux = jax.grad(loss, has_aux=True)(x)
    got, got_aux = cr.grad(loss, has_aux=True)(x)
    assert got_aux == want_aux
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.dtype == want.dtype


@pytest.mark.parametrize("fun", [jnp.exp2, jnp.sinh, jnp.cosh], ids=["exp2", "sinh", "cosh"])
def test_functions_whose_libm_differs_from_xla_are_xlas_eagerly(fun):
    """exp2, sinh and cosh differ from XLA's by tens of float32 ulp in the
    platform's libm over their range: eagerly JAX computes them, so value and
    gradient are jax.grad's to the bit."""
    x = jnp.asarray(np.random.default_rng(0).uniform(-80, 80, 2000), jnp.float32)

    def loss(x):
        y = fun(x)
        return jnp.sum(y * 1e-30), y  # (the sum adds in NumPy's order: the values)

    want = jax.grad(loss, has_aux=True)(x)
    got = cr.grad(loss, has_aux=True)(x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# --- a plan's host program: the general path's bits, decided once -----------------------------


def _counting_host_programs():
    """A list, and a `_HostProgram.run` that appends to it whether each run
    gave the results (True) or sent the plan back to the general path."""
    ran = []
    real_run = calls._HostProgram.run

    def counted(self, plan, consts, args):
        out = real_run(self, plan, consts, args)
        ran.append(out is not None)
        return out

    return ran, counted


def _bits(tree):
    return [
        (np.asarray(a).dtype, np.asarray(a).shape, np.asarray(a).tobytes())
        for a in jax.tree_util.tree_leaves(tree)
    ]


# JAX's functions with a `custom_jvp` function inside their body and rule
# (logaddexp's): their programs run the inner body's program as a step
NESTED_CUSTOM_JVP = {
    "softplus": jax.nn.softplus,
    "log_sigmoid": jax.nn.log_sigmoid,
    "logaddexp": lambda z: jnp.logaddexp(z, 0.5 * z - 1.0),
}
HOST_PROGRAMS = {**JAX_DEFJVPS, **NESTED_CUSTOM_JVP}


@pytest.mark.parametrize("name", sorted(NESTED_CUSTOM_JVP))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_nested_custom_jvp_functions_against_jax(name, dtype):
    x = jnp.linspace(-30.0, 30.0, 11, dtype=dtype)  # (logaddexp's branches: both far sides)
    check_against_jax(lambda x: NESTED_CUSTOM_JVP[name](x) * x, x)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(HOST_PROGRAMS)),  # (the rules whose transposes have programs)
    dtype=st.sampled_from([np.float32, np.float64]),
    values=st.lists(
        st.one_of(
            st.floats(-120, 120, width=32),  # (log1mexp: subnormals inside its rule)
            st.sampled_from(EDGES),
            st.sampled_from([np.nan, 1e-45, -5e-324, 3e38]),
        ),
        min_size=1,
        max_size=140,  # (past `host._SMALL_SIZE`: the other subnormal test)
    ),
    subnormal_cotangent=st.booleans(),
)
def test_host_programs_give_the_general_paths_bits(name, dtype, values, subnormal_cotangent):
    """`calls._HostProgram` evaluates a read-once rule or body with NumPy
    directly, its path decided once. Forward and backward, its values are
    those of the general path (`Trace.process` per equation) to the bit, with
    NaNs, infinities and subnormals among the inputs and a subnormal
    cotangent (which sends the program back to the general path)."""
    fn = HOST_PROGRAMS[name]
    x = jnp.asarray(np.asarray(values, dtype))
    ct = np.full(x.shape, 1e-40 if subnormal_cotangent else 0.75, dtype)

    def run():
        out, vjp_fn = cr.vjp(fn, x)
        return out, vjp_fn(ct)

    real_run = calls._HostProgram.run
    ran, counted = _counting_host_programs()
    try:
        calls._HostProgram.run = counted
        fast = run()
        calls._HostProgram.run = lambda *a: None
        general = run()
    finally:
        calls._HostProgram.run = real_run
    assert ran, "no host program was asked"
    assert _bits(fast) == _bits(general)
    want = jax.vjp(fn, x)[1](ct)
    assert [a.dtype for a in fast[1]] == [a.dtype for a in want]


def test_host_programs_run_for_jax_functions_rules():
    """The host programs are taken where they apply: relu's rule transpose
    and body (a `jit` call inside it), logit's (`jax.numpy` code read once).
    relu's transposed rule keeps two of its six equations: its zeros are
    folded, and the select its tangent map computes forward is never read."""
    real_run = calls._HostProgram.run
    ran, counted = _counting_host_programs()
    x = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32)
    calls._HostProgram.run = counted
    try:
        for fn in (jax.nn.relu, jax.scipy.special.logit):
            ran.clear()
            cr.grad(lambda x, fn=fn: jnp.sum(fn(x) * x))(x)
            assert ran and all(ran), fn
    finally:
        calls._HostProgram.run = real_run
    for fn in NESTED_CUSTOM_JVP.values():
        ran.clear()
        calls._HostProgram.run = counted
        try:
            cr.grad(lambda x, fn=fn: jnp.sum(fn(x) * x))(x)
        finally:
            calls._HostProgram.run = real_run
        assert ran and all(ran), fn
    calls._TRANSPOSED.clear()
    cr.grad(lambda x: jnp.sum(jax.nn.relu(x) * x))(x)
    ((plan, _, _),) = calls._TRANSPOSED.values()
    assert [e[0].name for e in plan.eqns].count("select_n") == 2
    assert [impl.__name__ for impl, *_ in plan.host.steps] == ["greater", "_host_select_n"]


# --- `core._bind_on_host`: the common eager case of `bind` in one pass ---------------------

_STEPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "max": lambda a, b: cr.numpy.maximum(a, b),
    "min": lambda a, b: jnp.minimum(a, b),
    "pow": lambda a, b: a**2 * b,
    "exp": lambda a, b: cr.numpy.exp(a) - b,
    "tanh": lambda a, b: jnp.tanh(a) * b,
    "where": lambda a, b: cr.numpy.where(a > b, a, b),
}


def _operand(kind, value, dtype):
    """A constant of one of the kinds a loss meets: a NumPy array, a NumPy
    scalar, a `jax.Array` (strong or weak), a Python float."""
    if kind == "numpy":
        return np.full((3,), value, dtype)
    if kind == "numpy scalar":
        return dtype(value)
    if kind == "jax":
        return jnp.full((3,), value, dtype)
    if kind == "weak jax":
        return jnp.asarray(float(value))
    return float(value)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    steps=st.lists(
        st.tuples(
            st.sampled_from(sorted(_STEPS)),
            st.sampled_from(["traced", "numpy", "numpy scalar", "jax", "weak jax", "python"]),
            # (1e-20 times 1e-19: a subnormal product of normal numbers, which
            # XLA flushes to zero)
            st.sampled_from([0.5, -2.0, 3.0, 1e-20, 1e-40, -5e-324, 0.0, np.inf, np.nan, 1e30]),
        ),
        min_size=1,
        max_size=6,
    ),
    x=st.lists(st.sampled_from([0.75, -1.5, 2.0, 1e-19, 1e-39, 0.0, 1e20]), min_size=3, max_size=3),
)
@example(  # a subnormal product of normal numbers (XLA's is 0)
    dtype=np.float32, steps=[("mul", "numpy", 1e-20)], x=[1e-19, 1e-19, 1e-19]
)
@example(dtype=np.float32, steps=[("mul", "jax", 1e-20), ("mul", "traced", 0.0)], x=[1e-19] * 3)
def test_bind_on_host_gives_the_general_paths_bits(dtype, steps, x):
    """`Primitive.bind` first tries `core._bind_on_host`, one pass over the
    operands for the common eager case (NumPy values, strong `jax.Array`s,
    Tracers of the current trace). Against `bind` without it: the same value
    and gradients, bit for bit, at first and second order, for operators,
    `chainrule.numpy` and `jax.numpy` steps on constants of every kind,
    subnormal, infinite and NaN ones included."""
    x = jnp.asarray(np.asarray(x, dtype))

    def loss(x):
        h = x
        for name, kind, value in steps:
            other = h if kind == "traced" else _operand(kind, value, dtype)
            h = _STEPS[name](h, other)
        return jnp.sum(h)

    def run():
        with jax.numpy_rank_promotion("allow"):
            first = cr.value_and_grad(loss)(x)
            second = cr.grad(lambda x: cr.grad(loss)(x).sum())(x)
        return first, second

    real = core.Primitive.on_host_first
    fast = run()
    try:
        core.Primitive.on_host_first = property(lambda self: False)
        general = run()
    finally:
        core.Primitive.on_host_first = real
    assert _bits(fast) == _bits(general)


def test_bind_on_host_takes_the_common_case():
    """Every operation of the tutorial's gradient, forward and backward, takes
    the one-pass path (operands: Tracers, a `jax.Array` and NumPy values)."""
    taken = []
    real = core._bind_on_host

    def counted(prim, args, params):
        out = real(prim, args, params)
        taken.append((prim.name, out is not core._GENERAL))
        return out

    w, x, y = (jnp.asarray(v, jnp.float32) for v in (1.0, 1.0, 2.0))
    core._bind_on_host = counted
    try:
        dw = cr.grad(lambda w, x, y: (w * x - y) ** 2)(w, x, y)
    finally:
        core._bind_on_host = real
    assert float(dw) == -2.0
    names = [name for name, _ in taken]
    assert names[:3] == ["mul", "sub", "integer_pow"], names
    assert all(ok for _, ok in taken), taken


def test_bind_on_host_leaves_operators_to_a_function_jax_traces():
    """An operator on differentiated values that a function JAX traces closes
    over (`jax.make_jaxpr`, a `lax.cond` branch) belongs to that function
    (`Primitive.bind`): the one-pass path leaves it to the general one, which
    stages it there, as under `jax.grad`."""
    seen = []

    def f(x1, x2):
        closed = jax.make_jaxpr(lambda: x1 * 3.0 + x2)()
        seen.append(([e.primitive.name for e in closed.jaxpr.eqns], len(closed.consts)))
        return jax.core.eval_jaxpr(closed.jaxpr, closed.consts)[0]

    args = (jnp.float32(2.0), jnp.float32(4.0))
    want = jax.grad(f, argnums=(0, 1))(*args)
    got = cr.grad(f, argnums=(0, 1))(*args)
    assert _bits(got) == _bits(want)
    assert seen[1] == seen[0] == (["mul", "add"], 2)
