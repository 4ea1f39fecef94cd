"""Eager and jitted answers agree at subnormal numbers (issue 12, item 9).

XLA's CPU kernels flush subnormal numbers to zero, as operands and as results;
NumPy keeps them. chainrule's eager path computes with NumPy where it can
(`chainrule.engine.host`), so without care eager and `jit` disagree:
`log(1e-45)` was -103 eagerly and -inf under `jit`. The behaviour chosen is
XLA's, the one `jax.grad` gives eagerly too.

Every primitive with a NumPy version is checked below (the table's coverage is
itself checked), on float32 and float64 inputs that hold subnormals, and on
normal inputs whose results underflow: chainrule's eager value and
cotangents against the same under `jax.jit`, and against `jax.vjp`, class by
class (zero, subnormal, normal, inf, NaN) and then in value.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import chainrule as cr
from chainrule.engine import host
from chainrule.engine.core import PRIMITIVES
from tests.test_compositions import fuzz_settings

jax.config.update("jax_enable_x64", True)

DTYPES = (np.float32, np.float64)
# DESIGN.md's tolerances for chainrule vs jax.grad; the classes (zero,
# subnormal, normal, inf, NaN) are compared exactly, apart.
TOL = {np.dtype(np.float32): (1e-5, 1e-6), np.dtype(np.float64): (1e-12, 0.0)}


def specials(dtype, subnormals: bool) -> np.ndarray:
    """Zeros, the extremes of the subnormal range (if asked), the smallest
    normals, values whose products, exponentials or squares underflow, and
    ordinary values."""
    fi = np.finfo(dtype)
    tiny = float(fi.tiny)
    small = float(np.sqrt(tiny))  # small * small / 4 is subnormal
    values = [0.0, -0.0, tiny, -tiny, 2 * tiny, small / 2, -small / 3, 0.5, -1.5, 3.0, -90.0]
    values += [-800.0, 1e4] if dtype == np.float64 else [-100.0, 100.0]
    if subnormals:
        smallest = float(fi.smallest_subnormal)
        values += [smallest, -smallest, tiny / 2, -tiny * 0.75]
    return np.array(values, dtype)


def pair(dtype, subnormals: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of special values, as two arrays of the same shape."""
    v = specials(dtype, subnormals)
    x, y = np.meshgrid(v, v, indexing="ij")
    return x, y


# --- the table: functions emitting every primitive that has a NumPy version ----------------

UNARY: dict[str, Callable] = {
    "abs": jnp.abs,
    "acos": jnp.arccos,
    "acosh": jnp.arccosh,
    "asin": jnp.arcsin,
    "asinh": jnp.arcsinh,
    "atan": jnp.arctan,
    "atanh": jnp.arctanh,
    "cbrt": jnp.cbrt,
    "ceil": lambda x: jnp.ceil(x) * x,
    "floor": lambda x: jnp.floor(x) * x,
    "cos": jnp.cos,
    "cosh": jnp.cosh,
    "exp": jnp.exp,
    "exp2": jnp.exp2,
    "expm1": jnp.expm1,
    "log": jnp.log,
    "log1p": jnp.log1p,
    "logistic": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "neg": lambda x: -x,
    "rsqrt": lax.rsqrt,
    "sign": lambda x: jnp.sign(x) * 3.0,
    "sin": jnp.sin,
    "sinh": jnp.sinh,
    "sqrt": jnp.sqrt,
    "square": jnp.square,
    "tan": jnp.tan,
    "tanh": jnp.tanh,
    "cube": lambda x: x**3,
    "inverse-square": lambda x: x**-2,
    "pow": lambda x: jnp.abs(x) ** 2.5,
    "copy": jnp.copy,
    "convert_element_type": lambda x: (x.astype(jnp.float32) * 2).astype(x.dtype),
    "stop_gradient": lambda x: x * lax.stop_gradient(x),
    "bitcast_convert_type": lambda x: jnp.where(jnp.signbit(x), x, 2 * x),
    "is_finite": lambda x: jnp.where(jnp.isfinite(x * x), x * x, 1.0),
    "name": lambda x: checkpoint_name(x * x, "squared"),
    "not": lambda x: jnp.where(~(x > 0), x, -x),
    "reduce_and": lambda x: jnp.where(jnp.all(x > -2), x, -x),
    "reduce_or": lambda x: jnp.where(jnp.any(x > 1e3), x, -x),
    "reduce_xor": lambda x: jnp.where(lax.reduce_xor_p.bind(x > 0, axes=(0,)), x, -x),
    "argmax": lambda x: x * x[jnp.argmax(x)],
    "argmin": lambda x: x * x[jnp.argmin(x)],
    "reduce_sum": lambda x: jnp.sum(x * x) * x,
    "reduce_max": lambda x: jnp.max(x, keepdims=True) * x,
    "reduce_min": lambda x: jnp.min(x, keepdims=True) * x,
    "cumsum": jnp.cumsum,
    "sort": lambda x: jnp.sort(x) * x,
    "broadcast_in_dim": lambda x: jnp.broadcast_to(x, (2, *x.shape)) * x,
    "concatenate": lambda x: jnp.concatenate([x, x * x]),
    "dynamic_slice": lambda x: lax.dynamic_slice(x, (2,), (5,)) * x[:5],
    "dynamic_update_slice": lambda x: lax.dynamic_update_slice(x, x[:3] * x[3:6], (1,)),
    "pad": lambda x: jnp.pad(x * x, 2),
    "reshape": lambda x: jnp.reshape(x * x, (-1, 1)),
    "rev": lambda x: x[::-1] * x,
    "slice": lambda x: x[1:] * x[:-1],
    "split": lambda x: jnp.split(x, [3])[1] * 2,
    "squeeze": lambda x: jnp.squeeze(x[None] * x),
    "stack": lambda x: jnp.stack([x, x * x]),
    "unstack": lambda x: sum(jnp.unstack(x * x)),
    "tile": lambda x: jnp.tile(x * x, 2),
    "transpose": lambda x: jnp.transpose(jnp.outer(x, x)),
    "clamp": lambda x: lax.clamp(x.dtype.type(-1.0), x * x, x.dtype.type(1e-3)),
    "dot_general": lambda x: jnp.outer(x, x) @ x,
}

BINARY: dict[str, Callable] = {
    "add": jnp.add,
    "sub": jnp.subtract,
    "mul": jnp.multiply,
    "div": jnp.divide,
    "max": jnp.maximum,
    "min": jnp.minimum,
    "pow": lambda x, y: jnp.abs(x) ** y,
    "atan2": jnp.arctan2,
    "rem": jnp.fmod,
    "eq-select_n": lambda x, y: jnp.where(x == y, x * y, y),
    "ne": lambda x, y: jnp.where(x != y, x * y, y),
    "lt": lambda x, y: jnp.where(x < y, x * y, y),
    "le": lambda x, y: jnp.where(x <= y, x * y, y),
    "gt": lambda x, y: jnp.where(x > y, x * y, y),
    "ge": lambda x, y: jnp.where(x >= y, x * y, y),
    "and-or-xor": lambda x, y: jnp.where(((x > 0) & (y > 0)) | ((x < 0) ^ (y < 1)), x, y),
    "dot_general": lambda x, y: x @ y,
    "dot_general-batched": lambda x, y: jnp.einsum("ij,ij->i", x, y),
}

# Primitives no user function emits: they appear in chainrule's own rules.
INTERNAL = {"add_any"}


def _primitives(fun: Callable, *args) -> set[str]:
    """The primitives `fun` emits, in called jaxprs too."""

    def walk(jaxpr) -> set[str]:
        names = set()
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        names |= walk(inner)
        return names

    return walk(jax.make_jaxpr(fun)(*args).jaxpr)


def test_every_host_primitive_is_in_the_table():
    x, y = pair(np.float64, False)
    seen = set(INTERNAL)
    for f in UNARY.values():
        seen |= _primitives(f, x[0])
    for f in BINARY.values():
        seen |= _primitives(f, x, y)
    host_primitives = {name for name, p in PRIMITIVES.items() if p.host_impl is not None}
    assert host_primitives - seen == set(), "add these primitives to the table"


def test_host_evaluation_is_on_here():
    """The comparisons below test something only where eager chainrule uses NumPy."""
    assert host.enabled()


# --- the comparison ------------------------------------------------------------------------


def _classes(a: np.ndarray) -> np.ndarray:
    """Each entry's class: 0 zero, 1 subnormal, 2 normal, 3 inf, 4 NaN (signed)."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return a
    tiny = np.finfo(a.dtype).tiny
    m = np.abs(a)
    cls = np.select([np.isnan(a), np.isinf(a), m == 0, m < tiny], [4, 3, 0, 1], default=2).astype(
        np.int8
    )
    return np.where(np.signbit(a) & (cls < 4) & (cls > 0), -cls, cls)


def assert_same(got, want, what: str, where=None) -> None:
    """Same dtypes, shapes, classes and (to TOL) values; only at the entries
    `where` holds, if given (a list of masks, one per leaf)."""
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, what
        mask = np.ones(g.shape, bool) if where is None else where[i]
        bad = (_classes(g) != _classes(w)) & mask
        assert not bad.any(), f"{what}: {g[bad][:4]} where the oracle has {w[bad][:4]}"
        if g.dtype.kind == "f":
            close = np.isfinite(w) & mask
            rtol, atol = TOL[g.dtype]
            np.testing.assert_allclose(g[close], w[close], rtol=rtol, atol=atol, err_msg=what)


def _agree(a, b) -> list[np.ndarray]:
    """Per leaf, where `a` and `b` have the same class."""
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return [_classes(np.asarray(x)) == _classes(np.asarray(y)) for x, y in leaves]


def compare(eager, jitted, jax_eager, jax_jitted, what: str, classes_as_jax: bool = True) -> None:
    """chainrule's eager answer against JAX's eager one, and against
    chainrule's jitted one.

    XLA's own eager and jitted answers differ at some subnormal entries: a
    fused kernel simplifies `1 * y` to `y`, keeps `x`'s bits through
    `select(p, x, -x)` or reassociates `g * x + g * x` as `2 * g * x`, where
    the op-by-op kernels flush. At an entry where JAX's two answers differ,
    chainrule's jitted answer may take JAX's jitted class instead of its own
    eager one; everywhere else, eager and jit agree.

    Without `classes_as_jax` (second derivatives, whose rules order their
    products unlike JAX's), chainrule's eager answer is compared with JAX's
    only where JAX's is a normal number; where a product of JAX's underflows
    and chainrule's does not, chainrule's is the more accurate one.
    """
    normal = None
    if not classes_as_jax:
        leaves = jax.tree_util.tree_leaves(jax_eager)
        normal = [np.abs(_classes(np.asarray(w))) == 2 for w in leaves]
    assert_same(eager, jax_eager, f"{what}: eager vs JAX eager", normal)
    exempt = [
        ~xla & like_jax
        for xla, like_jax in zip(
            _agree(jax_eager, jax_jitted), _agree(jitted, jax_jitted), strict=True
        )
    ]
    assert_same(jitted, eager, f"{what}: jit vs eager", [~e for e in exempt])


def check(fun: Callable, *args) -> None:
    """chainrule's eager value and cotangents (for two output cotangents, one
    of them with underflowing entries) against `jax.jit` of the same, and
    against `jax.vjp` eagerly and under `jit` (see `compare`)."""

    def pulled(vjp, ct_scale):
        def run(*a):
            out, pull = vjp(fun, *a)
            ct = jnp.ones_like(out) * ct_scale
            return out, pull(ct)

        return run

    for scale in (1.0, float(np.sqrt(np.finfo(args[0].dtype).tiny))):
        compare(
            pulled(cr.vjp, scale)(*args),
            jax.jit(pulled(cr.vjp, scale))(*args),
            pulled(jax.vjp, scale)(*args),
            jax.jit(pulled(jax.vjp, scale))(*args),
            f"cotangent scale {scale}",
        )


@pytest.mark.parametrize("subnormals", [False, True], ids=["underflow", "subnormal-inputs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_eager_matches_jit_at_subnormals(name, dtype, subnormals):
    check(UNARY[name], specials(dtype, subnormals))


@pytest.mark.parametrize("subnormals", [False, True], ids=["underflow", "subnormal-inputs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_eager_matches_jit_at_subnormals(name, dtype, subnormals):
    check(BINARY[name], *pair(dtype, subnormals))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_second_order_at_subnormals(dtype):
    """Second derivatives run the first-order rules on host values too."""
    x = specials(dtype, True)
    for name in ("log", "softplus", "logistic", "tanh", "sqrt", "cube", "exp"):
        f = lambda v, f=UNARY[name]: jnp.sum(f(v))  # noqa: E731

        def second(grad, f=f):
            return grad(lambda v: jnp.sum(grad(f)(v) * v))

        compare(
            second(cr.grad)(x),
            jax.jit(second(cr.grad))(x),
            second(jax.grad)(x),
            jax.jit(second(jax.grad))(x),
            f"grad of grad of {name}",
            classes_as_jax=False,
        )
        compare(
            cr.hessian(f)(x[:6]),
            jax.jit(cr.hessian(f))(x[:6]),
            jax.hessian(f)(x[:6]),
            jax.jit(jax.hessian(f))(x[:6]),
            f"hessian of {name}",
            classes_as_jax=False,
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_under_vmap_at_subnormals(dtype):
    x, y = pair(dtype, True)
    f = lambda a, b: jnp.sum(jnp.log(jnp.abs(a)) * b + jax.nn.softplus(a * b))  # noqa: E731
    assert_same(jax.vmap(cr.grad(f))(x, y), jax.vmap(jax.grad(f))(x, y), "vmap")


# --- the issue's reproducers and other ways a subnormal gets in -----------------------------


def test_the_issue_reproducers():
    assert cr.grad(lambda x: jnp.log(x) + x)(jnp.float32(1e-45)) == jnp.inf  # 1/0 after DAZ
    assert cr.value_and_grad(lambda x: jnp.log(x))(jnp.float32(1e-45))[0] == -jnp.inf
    assert cr.value_and_grad(lambda x: jnp.sign(x) * x)(jnp.float32(1e-45))[0] == 0
    assert cr.grad(lambda x: jax.nn.softplus(x))(jnp.float32(-100.0)) == 0
    for f, x in (
        (jnp.log, 1e-45),
        (jnp.sign, 1e-45),
        (jax.nn.softplus, -100.0),
    ):
        check(f, np.float32(x))


@pytest.mark.parametrize(
    "constant",
    [
        np.float32(1e-45),
        np.array([1e-45, 1.0], np.float32),
        1e-320,
        np.array(1e-310),
        jnp.array([1e-45, 1.0], jnp.float32),
    ],
    ids=["numpy-scalar", "numpy-array", "python-float", "numpy-0d-f64", "jax-array"],
)
def test_subnormal_constants_of_the_users_are_read_as_xla_reads_them(constant):
    def f(x):
        return jnp.sum(jnp.log(x * constant + constant) * x)

    x = np.array([1.0, 2.0], np.asarray(constant).dtype if np.ndim(constant) else np.float64)
    check(f, x)


def test_a_jax_array_constant_is_checked_once_while_it_lives():
    """A `jax.Array` found free of subnormals is remembered (it cannot change)
    for as long as it lives, and forgotten with it; one holding a subnormal is
    never remembered, so every call leaves it to JAX."""
    x = np.array([1.0, 2.0], np.float32)

    def remembered(constant) -> bool:
        def f(x):
            return jnp.sum(jnp.log(x * constant + constant) * x)

        check(f, x)  # against jax.grad, to the bit
        check(f, x)  # (the second call reads the remembered answer)
        known = host._FREE_OF_SUBNORMALS.get(id(constant))
        return known is not None and known() is constant

    clean = jnp.array([0.5, 3.0], jnp.float32)
    assert remembered(clean)
    key = id(clean)
    del clean  # (the only reference: the array dies here)
    assert key not in host._FREE_OF_SUBNORMALS
    assert not remembered(jnp.array([1e-45, 3.0], jnp.float32))


def test_a_numpy_computation_inside_the_function_does_not_change_the_mode_outside():
    """The flush-to-zero mode lasts exactly as long as the transform call."""
    tiny = np.float64(np.finfo(np.float64).tiny)
    assert tiny / 4 != 0  # NumPy keeps subnormals here
    cr.grad(lambda x: jnp.sum(jnp.exp(x)))(np.array([-800.0]))
    assert tiny / 4 != 0  # and still does afterwards

    def fails(x):
        raise ZeroDivisionError("the user's error")

    with pytest.raises(ZeroDivisionError, match="the user's error"):
        cr.grad(fails)(1.0)  # an error inside restores the mode too
    assert tiny / 4 != 0


@pytest.mark.parametrize("n", [64, 256])
def test_a_large_matrix_product_that_underflows(n):
    """Large products run on BLAS's threads, which keep subnormals: such a
    product, whose terms underflow, must still give XLA's zeros."""
    rng = np.random.default_rng(n)
    a = (rng.uniform(0.5, 1.0, (n, n)) * 1e-20).astype(np.float32)
    b = (rng.uniform(0.5, 1.0, (n, n)) * 4e-19).astype(np.float32)  # terms ~1e-39 to 4e-39

    def f(a, b):
        return jnp.sum((a @ b) * 1e30)

    want = jax.value_and_grad(f, argnums=(0, 1))(a, b)
    assert want[0] == 0  # every term flushed
    assert_same(cr.value_and_grad(f, argnums=(0, 1))(a, b), want, "eager")
    assert_same(jax.jit(cr.value_and_grad(f, argnums=(0, 1)))(a, b), want, "jit")


def test_a_large_matrix_product_whose_partial_sums_cancel_into_subnormals():
    """Every product is a normal number, but two of them cancel to a subnormal
    (exactly, in a fused multiply-add): XLA flushes it to zero, BLAS's threads
    keep it. The product is the function's output, so it is seen as it is."""
    n = 128
    a, b = np.zeros((n, n), np.float32), np.zeros((n, n), np.float32)
    a[:, 0], b[0, :] = -(2.0**-51), 2.0**-51 * (1 + 2.0**-22)  # exact: -2^-102 (1 + 2^-22)
    a[:, 1], b[1, :] = 2.0**-50 * (1 + 2.0**-23), 2.0**-52 * (1 + 2.0**-23)  # adds 2^-148
    ct = np.ones((n, n), np.float32)
    out, vjp_fn = jax.vjp(jnp.matmul, a, b)
    want = (out, vjp_fn(ct))
    out, vjp_fn = cr.vjp(jnp.matmul, a, b)
    assert_same((out, vjp_fn(ct)), want, "eager")


@fuzz_settings(100)
@given(
    bits=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=70),
    wide=st.booleans(),
    size=st.sampled_from([1, 5000]),
)
def test_smallest_magnitude_reads_the_bits(bits, wide, size):
    """The smallest nonzero magnitude's bits (remembered for large read-only
    arrays inside a call) against a reference on random bit patterns."""
    unsigned = np.uint64 if wide else np.uint32
    mask = (1 << (63 if wide else 31)) - 1
    raw = np.array([b % (1 << (64 if wide else 32)) for b in bits], unsigned)
    raw = np.resize(raw, max(size, len(raw)))
    magnitudes = [int(r) & mask for r in raw]
    want = min((m for m in magnitudes if m), default=0)
    x = raw.view(np.float64 if wide else np.float32)
    assert host.smallest_magnitude(x) == want
    x.flags.writeable = False
    with host.evaluating():
        assert host.smallest_magnitude(x) == want
        assert host.smallest_magnitude(x.T) == want  # remembered, as a view of the whole
        assert host.smallest_magnitude(x[::-1]) == want


@fuzz_settings(30)
@given(
    exponent=st.integers(-330, -290) | st.integers(-48, -36),
    mantissa=st.floats(0.5, 1.0),
    op=st.sampled_from(["log", "sqrt", "sign", "exp", "softplus", "tanh", "cube"]),
)
def test_random_tiny_values(exponent, mantissa, op):
    dtype = np.float64 if exponent < -100 else np.float32
    value = mantissa * 10.0**exponent
    x = np.array([value, -value, value * 1e10, 1.0], dtype)
    check(UNARY[op], x)


@fuzz_settings(200)
@given(
    bits=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=70),
    wide=st.booleans(),
    shape=st.sampled_from(["flat", "0-d", "strided", "scalar", "2-d transposed", "large"]),
)
def test_has_subnormal_reads_the_bits_inside_and_outside_the_mode(bits, wide, shape):
    """The check against an exact reference (the exponent field is zero and the
    mantissa is not), on random bit patterns: NaNs, infinities, signed zeros,
    subnormals, normals; small arrays (tested in one Python integer, lane by
    lane), large ones (NumPy on the bits), views, 0-d arrays and scalars."""
    dtype, unsigned, mantissa = (np.float64, np.uint64, 52) if wide else (np.float32, np.uint32, 23)
    raw = np.array([b % (1 << (8 * np.dtype(unsigned).itemsize)) for b in bits], unsigned)
    if shape in ("0-d", "scalar"):
        raw = raw[:1]
    exponent = (raw >> unsigned(mantissa)) & unsigned((1 << (63 - mantissa if wide else 8)) - 1)
    fraction = raw & unsigned((1 << mantissa) - 1)
    want = bool(((exponent == 0) & (fraction != 0)).any())
    x = raw.view(dtype)
    if shape == "0-d":
        x = x.reshape(())
    elif shape == "strided":
        x = np.repeat(x, 2)[::2]
    elif shape == "scalar":
        x = x[0]
    elif shape == "2-d transposed":
        x = np.stack([x, x]).T  # non-contiguous: its bytes are read in C order
    elif shape == "large":
        x = np.resize(x, host._SMALL_SIZE + 1 + 7 * len(bits))
    assert host.has_subnormal(x) == want
    with host.evaluating():
        assert host.has_subnormal(x) == want


def test_the_mode_is_per_thread():
    """A transform running in another thread leaves this thread's mode alone."""
    import threading

    tiny = np.float64(np.finfo(np.float64).tiny)
    inside = threading.Event()
    release = threading.Event()

    def worker():
        with host.evaluating():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(10)
    try:
        assert tiny / 4 != 0  # this thread still keeps subnormals
    finally:
        release.set()
        t.join()


# --- powers: XLA's bits on the host ------------------------------------------------------


@fuzz_settings(40)
@given(
    bits=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=64),
    wide=st.booleans(),
    y=st.integers(-9, 9),
)
def test_integer_pow_on_the_host_is_xlas_to_the_bit(bits, wide, y):
    """`integer_pow` is square-and-multiply in XLA (as JAX lowers it): the host
    gives the same bits for every float (subnormals, infinities, NaN, products
    that under- or overflow), where `np.power` differed in a third of them."""
    dtype, utype = (np.float64, np.uint64) if wide else (np.float32, np.uint32)
    x = np.array([b % (1 << (64 if wide else 32)) for b in bits], utype).view(dtype)
    with host.evaluating(), host.FLUSHING:
        got = PRIMITIVES["integer_pow"].host_impl(x, y=y)
    want = np.asarray(lax.integer_pow(jnp.asarray(x), y))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(utype), want.view(utype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("y", [0.5, -0.5, 1.5, 2.0, 3, -2])
def test_pow_on_the_host_at_zeros_and_infinities_is_xlas(dtype, y):
    """NumPy takes a square root for the exponent 0.5 (-0 and -inf then give -0
    and nan where XLA's pow gives +0 and +inf), and an integer exponent array
    would make it promote float32 to float64: the host gives lax's dtype and,
    at these values, its bits."""
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0], dtype)
    y = np.asarray(y, np.int32 if isinstance(y, int) else dtype)
    with host.evaluating(), host.FLUSHING:
        got = PRIMITIVES["pow"].host_impl(x, y)
    want = np.asarray(lax.pow(jnp.asarray(x), jnp.asarray(y)))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


@pytest.mark.parametrize(
    "f, x",
    [
        (lambda x: jnp.sum(jnp.sinc(x)), np.array([-1.733346e-14], np.float32)),  # cancels
        (lambda y: jnp.sum(1 / y), np.array([1e-19, -8e-20], np.float32)),  # y*y flushes
        (lambda x: jnp.sum(x**1.5), np.array([-np.inf, np.inf, 0.0], np.float32)),
        (lambda x: jnp.sum(x**0.5), np.array([-0.0, 4.0], np.float32)),
        (lambda x: jnp.sum(x ** jnp.arange(3)), np.array(2.0, np.float32)),
        (lambda x: jnp.sum(x**-3), np.array([0.7, 1.3, 3e-13], np.float32)),
    ],
)
def test_power_gradients_are_jaxs_eagerly(f, x):
    """The reproducers: eager values and gradients (and second derivatives) are
    `jax.grad`'s exactly, in dtype too (x ** jnp.arange(3) stays float32)."""
    x = jnp.asarray(x)
    for g, w in zip(cr.value_and_grad(f)(x), jax.value_and_grad(f)(x), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def test_an_integer_exponent_array_keeps_the_bases_dtype():
    x = jnp.float32(2.0)
    for transform in (jax.jacfwd, jax.jacrev):
        want = transform(lambda x: x ** jnp.arange(3))(x)
        got = getattr(cr, transform.__name__)(lambda x: x ** jnp.arange(3))(x)
        assert got.dtype == want.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)


# --- float to integer: XLA's saturating conversion ------------------------------------------

_INTEGERS = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


@fuzz_settings(40)
@given(
    bits=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=64),
    width=st.sampled_from([16, 32, 64]),
    integer=st.sampled_from(_INTEGERS + [np.bool_]),
    scale=st.sampled_from([1.0, 300.0, 7e4, 3e9, 1e19]),
)
def test_float_to_integer_on_the_host_is_xlas(bits, width, integer, scale):
    """XLA converts toward zero and saturates at the integer type's limits
    (infinities too), NaN to 0; NumPy's cast wraps (-1.0 to uint8 was 255) or
    gives the minimum (NaN to int32). The host gives XLA's on float32 and
    float64 and leaves float16 to JAX."""
    dtype = {16: np.float16, 32: np.float32, 64: np.float64}[width]
    utype = {16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
    raw_bits = np.array([b % (1 << width) for b in bits], utype).view(dtype)
    with np.errstate(all="ignore"):  # (values around the integer type's limits too)
        x = np.concatenate([raw_bits, (np.tanh(raw_bits.astype(np.float64)) * scale).astype(dtype)])
    with host.evaluating(), host.FLUSHING:
        got = PRIMITIVES["convert_element_type"].host_impl(x, new_dtype=np.dtype(integer))
    if dtype is np.float16:  # half precision is never converted on the host: JAX's
        assert got is NotImplemented  # (see tests/test_half_precision.py)
        return
    want = np.asarray(lax.convert_element_type(jnp.asarray(x), integer))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@fuzz_settings(40)
@given(
    bits=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=32),
    divisors=st.lists(st.sampled_from([0, 1, -1, 2, -3, 7, 2**63]), min_size=1, max_size=32),
    integer=st.sampled_from(_INTEGERS),
    op=st.sampled_from(["div", "rem"]),
)
def test_integer_division_on_the_host_is_xlas(bits, divisors, integer, op):
    """XLA's integer division rounds toward zero and gives -1 (all bits set)
    for a zero divisor, its remainder the dividend there; NumPy gives 0 for
    both. With the minimum over -1, on random bits and on edges."""
    info = np.iinfo(integer)
    width = info.bits
    n = max(len(bits), len(divisors))
    x = np.array([bits[i % len(bits)] % (1 << width) for i in range(n)], np.uint64)
    x = x.astype(f"uint{width}").view(integer)
    y = np.array([divisors[i % len(divisors)] % (1 << width) for i in range(n)], np.uint64)
    y = y.astype(f"uint{width}").view(integer)
    x[: n // 2] = np.where(np.arange(n // 2) % 2 == 0, info.min, info.max)[: n // 2]
    with jax.enable_x64(True), host.evaluating(), host.FLUSHING:
        got = PRIMITIVES[op].host_impl(x, y)
        want = np.asarray(getattr(lax, op)(jnp.asarray(x), jnp.asarray(y)))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_integer_division_by_zero_in_a_loss_is_jaxs():
    """The reproducer: integers computed from a differentiated value, divided
    by a zero computed the same way, reported as aux."""

    def f(x):
        d = (x * 0).astype(jnp.int32)
        n = jnp.arange(-3, 4, dtype=jnp.int32)
        return jnp.sum(x), (lax.div(n, d), n // d, lax.rem(n, d), n % d)

    x = jnp.float32(1.0)
    want = jax.value_and_grad(f, has_aux=True)(x)[0][1]
    vg = cr.value_and_grad(f, has_aux=True)
    for got in (vg(x), jax.jit(vg)(x)):
        for g, w in zip(got[0][1], want, strict=True):
            np.testing.assert_array_equal(g, w)


_SPECIALS = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 0.5, -2.5]  # (no subnormal:
# the host never sees one it did not compute, see `host.host_operands`)


@fuzz_settings(40)
@given(
    picks=st.lists(st.integers(0, len(_SPECIALS) - 1), min_size=2, max_size=48),
    dtype=st.sampled_from([np.float32, np.float64]),
    prim=st.sampled_from(["max", "min", "clamp", "sign", "reduce_max", "reduce_min"]),
    scalar=st.booleans(),
)
def test_signed_zeros_on_the_host_are_xlas(picks, dtype, prim, scalar):
    """XLA orders -0 below +0 (max(+0, -0) is +0, min -0; a reduction too) and
    keeps a zero's sign in sign(); NumPy answers whichever operand came second
    or first. Bit-exact against lax (NaN payloads aside), with a scalar second
    operand and with arrays."""
    values = np.array([_SPECIALS[i] for i in picks], dtype)
    n = len(values) // 2
    x, y = values[:n], values[n : 2 * n]
    if scalar:
        y = y[:1].reshape(())
    lo, hi = np.asarray(np.minimum(y, 0.0), dtype), np.asarray(dtype(1.0))
    with host.evaluating(), host.FLUSHING:
        if prim in ("max", "min"):
            got, want = PRIMITIVES[prim].host_impl(x, y), getattr(lax, prim)(x, y)
        elif prim == "clamp":
            lo = lo.reshape(()) if scalar else lo
            got, want = PRIMITIVES[prim].host_impl(lo, x, hi), lax.clamp(lo, x, hi)
        elif prim == "sign":
            got, want = PRIMITIVES[prim].host_impl(x), lax.sign(x)
        else:
            m = values[: 2 * n].reshape(2, n)
            got = PRIMITIVES[prim].host_impl(m, axes=(0,))
            want = getattr(lax, prim)(m, (0,))
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    same = (got.view(np.uint8) == want.view(np.uint8)).reshape(*got.shape, -1).all(-1)
    assert (same | (np.isnan(got) & np.isnan(want))).all(), (x, y, got, want)


def test_quantising_an_image_outside_its_range_is_jaxs():
    """The reproducer: uint8 quantisation of values outside [0, 1] (and an int32
    cast of NaN and out-of-range values) gives jax.grad's loss and gradient."""

    def loss(w, img):
        return jnp.mean((img * w * 255).astype(jnp.uint8).astype(jnp.float32) / 255.0 * w)

    img = jnp.array([-0.01, 0.1, 0.5, 0.9, 1.02, 1.5], jnp.float32)
    w = jnp.float32(1.0)
    for got in (cr.value_and_grad(loss)(w, img), jax.jit(cr.value_and_grad(loss))(w, img)):
        for g, e in zip(got, jax.value_and_grad(loss)(w, img), strict=True):
            np.testing.assert_allclose(g, e, rtol=2e-7)  # (a mean: the summation order)
    g = lambda x: jnp.sum(x * x.astype(jnp.int32))  # noqa: E731
    x = jnp.array([1e10, -1e10, jnp.nan, 2.5, -2.5], jnp.float32)
    np.testing.assert_array_equal(cr.grad(g)(x), jax.grad(g)(x))


def test_user_python_and_numpy_code_keeps_its_floating_point_mode():
    """Flushing subnormals is XLA's treatment of the primitives' operands and
    results, not of the user's own Python and NumPy arithmetic between them: a
    constant computed in the loss with NumPy (through a subnormal intermediate)
    or a Python comparison with a subnormal must be what it is under jax.grad,
    eagerly and under jit (chainrule traces at jit's trace time)."""
    import math

    def loss(x):
        scale = np.float32(1e-39) * np.float32(1e5)  # 1e-34, normal; 1e-39 is not
        flag = 1.0 if math.exp(-710.0) > 0 else 0.0  # 4.4e-309, a float64 subnormal
        return jnp.sum(x * scale) * flag

    x = np.array([1.0, 2.0], np.float32)
    want = jax.grad(loss)(x)
    assert float(want[0]) > 0
    for got in (cr.grad(loss)(x), jax.jit(cr.grad(loss))(x), cr.grad(loss)(jnp.asarray(x))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # and a primitive evaluated on the host afterwards still flushes as XLA does
    tiny = np.finfo(np.float32).tiny
    y = np.array([tiny, 1.0], np.float32)
    np.testing.assert_array_equal(
        np.asarray(cr.grad(lambda y: jnp.sum(y * y * 0.25))(y)),
        np.asarray(jax.jit(jax.grad(lambda y: jnp.sum(y * y * 0.25)))(y)),
    )


def test_custom_functions_and_rules_keep_the_floating_point_mode():
    """A custom_vjp's fwd and bwd, a custom_jvp's function and rule are the
    user's Python too: called from chainrule's own work (a backward pass, a
    call's host evaluation, which flush subnormals for NumPy), they run in
    the thread's own mode, as under jax.grad and jax.jvp (cr.jvp calls a
    custom_jvp rule from a backward pass)."""
    import math

    def flag():
        return 1.0 if math.exp(-710.0) > 0 else 2.0  # 4.4e-309, a float64 subnormal

    @jax.custom_vjp
    def f(x):
        return x * 2.0

    f.defvjp(lambda x: (x * 2.0, None), lambda _, g: (g * flag(),))

    @jax.custom_jvp
    def h(x):
        return x * 2.0

    h.defjvp(lambda p, t: (h(p[0]), t[0] * flag()))

    x = np.float32(1.5)
    for fun in (f, h):
        want = jax.grad(fun)(x)
        np.testing.assert_array_equal(np.asarray(cr.grad(fun)(x)), np.asarray(want))
        np.testing.assert_array_equal(
            np.asarray(jax.jit(cr.grad(fun))(x)), np.asarray(jax.jit(jax.grad(fun))(x))
        )
    assert cr.jvp(h, (x,), (np.float32(1.0),))[1] == jax.jvp(h, (x,), (np.float32(1.0),))[1]

    # and their primal functions (a custom_jvp's, a custom_vjp's fwd), called from
    # the host evaluation of the call
    @jax.custom_jvp
    def h2(x):
        return x * flag()

    h2.defjvp(lambda p, t: (h2(p[0]), t[0] * 3.0))

    @jax.custom_vjp
    def f2(x):
        return x * flag()

    f2.defvjp(lambda x: (x * flag(), None), lambda _, g: (g * 3.0,))
    for fun in (h2, f2):
        want = jax.value_and_grad(fun)(x)
        np.testing.assert_array_equal(np.asarray(cr.value_and_grad(fun)(x)), np.asarray(want))
        # on an array, and applied to a constant beside the differentiated value
        # (the body then runs with NumPy, as the call's host evaluation)
        loss = lambda v: jnp.sum(fun(v) * fun(jnp.ones(2, jnp.float32)))  # noqa: B023, E731
        v = jnp.full(2, 1.5, jnp.float32)
        for got, want in zip(cr.value_and_grad(loss)(v), jax.value_and_grad(loss)(v), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
