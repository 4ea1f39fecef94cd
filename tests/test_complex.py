"""Complex numbers: every elementwise rule on complex64/complex128 values, the complex
parts (real, imag, complex, conj), abs of complex, shapes, reductions and products
of complex arrays, conversions between real and complex, and the transforms' complex
API (`holomorphic`, `allow_int`, JAX's errors), all against `jax.vjp`/`jax.grad`.

JAX's convention, which chainrule follows: a cotangent pairs with a tangent as
Re(ct * t), so the VJP of a holomorphic f is g -> g * f'(z), and `grad` of a real
loss L(z) is dL/dx - i dL/dy. The oracle (`tests/oracle.py`) draws complex
cotangents for complex outputs and complex directions for complex inputs.

The default run checks every primitive eagerly (first and second order in
complex128, first order in complex64) and all of them together under `jit` and
`vmap`; `-m slow` checks each one in every mode and dtype, at both orders, on
inputs drawn by hypothesis.
"""

from __future__ import annotations

import os

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from jax import lax

import chainrule as cr
import chainrule.numpy as cnp
from chainrule import errors
from chainrule.engine.core import Primitive
from chainrule.engine.rules import PRIMITIVES, elementwise
from tests.oracle import check_against_jax, emitted

# examples per hypothesis property in the slow run (CHAINRULE_FUZZ_EXAMPLES widens it)
_EXAMPLES = int(os.environ.get("CHAINRULE_FUZZ_EXAMPLES", "1"))

# --- the elementwise table, on complex values ----------------------------------------

ELEMENTWISE = sorted(
    {v.name for v in vars(elementwise).values() if isinstance(v, Primitive)}
    | {"real", "imag", "complex", "conj"}
)

# Primitives JAX does not compute (or not differentiate) on complex values, and why.
# test_jax_refuses_complex_where_listed checks each reason still holds, and that
# chainrule raises the same error type.
NOT_FOR_COMPLEX = {
    "cbrt": "JAX's cbrt takes real floating-point values only",
    "erf": "JAX's erf takes real floating-point values only",
    "erf_inv": "JAX's erf_inv takes real floating-point values only",
    "floor": "rounding is defined for real values only",
    "ceil": "rounding is defined for real values only",
    "round": "rounding is defined for real values only",
    "is_finite": "JAX's is_finite takes real floating-point values only",
    "rem": "JAX's rem takes integers and real floating-point values only",
    "lt": "complex numbers are not ordered",
    "le": "complex numbers are not ordered",
    "gt": "complex numbers are not ordered",
    "ge": "complex numbers are not ordered",
    "and": "bitwise operations take integers and booleans",
    "or": "bitwise operations take integers and booleans",
    "xor": "bitwise operations take integers and booleans",
    "not": "bitwise operations take integers and booleans",
    "bitcast_convert_type": "JAX reinterprets complex bits only as the same complex dtype",
    "clamp": "JAX clamps complex values, but its derivative compares them (gt, lt), "
    "which JAX refuses for complex values: jax.vjp raises TypeError",
}

# How many operands, and which parameters, where the rule's formulas do not say.
ARITY = {"select_n": 3, "eq": 2, "ne": 2, "sign": 1, "complex": 2, "real": 1, "imag": 1, "conj": 1}
PARAMS = {"integer_pow": [{"y": 3}, {"y": -2}, {"y": 0}, {"y": 1}, {"y": 2}]}


def _complex_values(rng, n, dtype):
    """Moduli in [0.2, 0.9] at any phase: no poles or zeros of any rule, and almost
    surely off every branch cut."""
    z = rng.uniform(0.2, 0.9, n) * np.exp(1j * rng.uniform(-np.pi, np.pi, n))
    return jnp.asarray(z, dtype)


def _real_dtype(dtype):
    return jnp.finfo(dtype).dtype


def _case(name, dtype, rng, params=None, n=3):
    """(function, operands) applying primitive `name` to complex operands."""
    prim = PRIMITIVES[name]
    params = params or {}
    arity = ARITY.get(name) or len(prim.formulas or ()) or 1
    if name == "complex":  # x + iy of two real arrays
        args = [jnp.asarray(rng.standard_normal(n), _real_dtype(dtype)) for _ in range(2)]
        return (lambda x, y: lax.complex(x, y)), args
    if name == "conj":
        return (lambda z: lax.conj(z)), [_complex_values(rng, n, dtype)]
    args = [_complex_values(rng, n, dtype) for _ in range(arity)]
    if name == "select_n":
        args[0] = jnp.asarray(rng.uniform(size=n) < 0.5)
        return (lambda which, a, b: lax.select_n(which, a, b)), args
    if name == "add_any":  # emitted by JAX's own transposes only; bind it directly
        return (lambda a, b: jax.extend.core.primitives.add_jaxvals_p.bind(a, b)), args
    if not prim.differentiable:  # no cotangent flows through it: used beside one that does

        def fun(*zs):
            return zs[0] * 2.0, prim.impl(*zs, **params)

        return fun, args
    return (lambda *zs: prim.impl(*zs, **params)), args


def _cases(name, dtype, rng):
    """Every parameter variant of `name`'s case."""
    return [_case(name, dtype, rng, params) for params in PARAMS.get(name, [{}])]


DIFFERENTIABLE_OR_KEPT = [n for n in ELEMENTWISE if n not in NOT_FOR_COMPLEX]


def _check_primitive(name, dtype, rng, **kwargs):
    for fun, args in _cases(name, dtype, rng):
        if name != "add_any":  # JAX emits it only inside its own transposes
            assert name in emitted(fun, *args), f"{name} is not what this case emits"
        check_against_jax(fun, *args, **kwargs)


def test_the_table_is_enumerated():
    """Every elementwise primitive is either checked on complex values or listed with
    the reason JAX does not support it there."""
    assert set(NOT_FOR_COMPLEX) <= set(ELEMENTWISE)
    for must in ("mul", "div", "exp", "log", "sqrt", "pow", "abs", "sin", "real", "conj"):
        assert must in DIFFERENTIABLE_OR_KEPT


@pytest.mark.parametrize("name", DIFFERENTIABLE_OR_KEPT)
def test_elementwise_complex128_eager_both_orders(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    _check_primitive(name, jnp.complex128, rng, modes=("eager",))


@pytest.mark.parametrize("name", DIFFERENTIABLE_OR_KEPT)
def test_elementwise_complex64_eager(name):
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    _check_primitive(name, jnp.complex64, rng, modes=("eager",), second_order=False)


# Under jit and vmap the rules run on JAX tracers instead of concrete arrays; the
# default run checks these together (one compilation), the slow run every one.
UNDER_JIT = ["mul", "div", "exp", "log", "sqrt", "pow", "abs", "real", "imag", "complex", "conj"]


def _at_once(names, dtype, rng):
    """One function applying every case of `names` (a list of results), and its
    inexact operands."""
    cases = [case for n in names for case in _cases(n, dtype, rng)]
    funs = [f for f, _ in cases]
    args = [a for _, a in cases]
    leaves, treedef = jax.tree_util.tree_flatten(args)
    inexact = [jnp.issubdtype(a.dtype, jnp.inexact) for a in leaves]

    def everything(*operands):
        it = iter(operands)
        full = [next(it) if ok else a for a, ok in zip(leaves, inexact, strict=True)]
        args = jax.tree_util.tree_unflatten(treedef, full)
        return [f(*a) for f, a in zip(funs, args, strict=True)]

    return everything, [a for a, ok in zip(leaves, inexact, strict=True) if ok]


def test_elementwise_rules_under_jit_and_vmap():
    fun, args = _at_once(UNDER_JIT, jnp.complex128, np.random.default_rng(3))
    check_against_jax(fun, *args, modes=("jit", "vmap"), second_order=False)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.complex128, jnp.complex64])
@pytest.mark.parametrize("name", DIFFERENTIABLE_OR_KEPT)
@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_elementwise_every_mode_and_order(name, dtype, seed):
    _check_primitive(name, dtype, np.random.default_rng(seed))


@pytest.mark.parametrize("name", sorted(NOT_FOR_COMPLEX))
def test_jax_refuses_complex_where_listed(name):
    """The listed reason holds: JAX raises TypeError for complex operands (or, for
    clamp, for its derivative), and chainrule raises the same error type."""
    rng = np.random.default_rng(0)
    arity = {"and": 2, "or": 2, "xor": 2, "clamp": 3}.get(name) or len(
        PRIMITIVES[name].formulas or ()
    )
    args = [_complex_values(rng, 3, jnp.complex128) for _ in range(max(arity, 1))]
    params = {"bitcast_convert_type": {"new_dtype": jnp.int64}}.get(name, {})
    fun = lambda *zs: PRIMITIVES[name].impl(*zs, **params)  # noqa: E731

    def pull_back(vjp):
        out, vjp_fn = vjp(lambda *zs: jnp.sum(fun(*zs) * 1.0), *args)
        return vjp_fn(jnp.ones_like(out))

    with pytest.raises(TypeError):
        pull_back(jax.vjp)
    with pytest.raises(TypeError):
        pull_back(cr.vjp)


# --- cases the primitives above leave out -------------------------------------------


def test_abs_of_complex_zero_has_gradient_zero_as_in_jax():
    z = jnp.asarray([0.0 + 0.0j, 3.0 + 4.0j])
    loss = lambda z: jnp.sum(jnp.abs(z))  # noqa: E731
    np.testing.assert_array_equal(cr.grad(loss)(z), jax.grad(loss)(z))
    assert complex(cr.grad(loss)(z)[0]) == 0
    check_against_jax(jnp.abs, z, modes=("eager",))


def test_conj_of_a_real_value():
    """lax.conj of a real x is x + 0i; its cotangent is the real part."""
    x = jnp.asarray([0.5, -1.5])
    assert "conj" in emitted(lax.conj, x)
    check_against_jax(lambda x: lax.conj(x) * (1 + 2j), x, modes=("eager", "jit"))


def _z(rng, *shape, dtype=jnp.complex128):
    return jnp.asarray(rng.standard_normal(shape) + 1j * rng.standard_normal(shape), dtype)


def _x(rng, *shape, dtype=jnp.float64):
    return jnp.asarray(rng.standard_normal(shape), dtype)


_R = np.random.default_rng(11)

# (name, function, operands, primitive it claims): shapes, reductions, products and
# conversions on complex arrays
C128, C64, F32 = jnp.complex128, jnp.complex64, jnp.float32
CONVERT = "convert_element_type"
STRUCTURAL = [
    ("reduce_sum", lambda z: jnp.sum(z, axis=1) + jnp.mean(z), [_z(_R, 3, 4)], "reduce_sum"),
    ("reduce_max", lambda z: jnp.max(z, axis=0), [_z(_R, 3, 4)], "reduce_max"),
    ("cumsum", lambda z: jnp.cumsum(z, axis=1), [_z(_R, 3, 4)], "cumsum"),
    ("reshape", lambda z: z.reshape(4, 3).T[::-1], [_z(_R, 3, 4)], "transpose"),
    ("broadcast", lambda z: z[:, None, :] * z[None, :, :], [_z(_R, 3, 4)], "broadcast_in_dim"),
    ("gather", lambda z: z[jnp.array([2, 0, 0]), 1:3], [_z(_R, 3, 4)], "gather"),
    ("scatter-add", lambda z: z.at[jnp.array([0, 0])].add(z[1]), [_z(_R, 3, 4)], "scatter-add"),
    ("pad", lambda z: jnp.pad(z, ((1, 0), (0, 2))), [_z(_R, 3, 4)], "pad"),
    ("concatenate", lambda z: jnp.concatenate([z, 2 * z[:1]]), [_z(_R, 3, 4)], "concatenate"),
    ("dynamic_slice", lambda z: lax.dynamic_slice(z, (1, 1), (2, 2)), [_z(_R, 3, 4)], "dynamic_slice"),
    ("select_n", lambda z: jnp.where(jnp.abs(z) > 1, z, 2j * z), [_z(_R, 3, 4)], "select_n"),
    ("matmul", lambda a, b: a @ b, [_z(_R, 3, 4), _z(_R, 4, 2)], "dot_general"),
    ("batched", lambda a, b: jnp.einsum("bij,bjk->bik", a, b), [_z(_R, 2, 3, 4), _z(_R, 2, 4, 2)], "dot_general"),
    ("real @ complex", lambda a, b: a @ b, [_x(_R, 3, 4), _z(_R, 4, 2)], "dot_general"),
    ("vdot", lambda a, b: jnp.vdot(a, b), [_z(_R, 5), _z(_R, 5)], "conj"),
    ("float64->complex128", lambda x: x.astype(C128) * (1 + 2j), [_x(_R, 4)], CONVERT),
    ("float32->complex128", lambda x: x.astype(C128) * (1 + 2j), [_x(_R, 4, dtype=F32)], CONVERT),
    ("complex128->float32", lambda z: jnp.real(z).astype(F32), [_z(_R, 4)], CONVERT),
    ("complex128->float64", lambda z: lax.convert_element_type(z, jnp.float64), [_z(_R, 4)], CONVERT),
    ("complex64->complex128", lambda z: z.astype(C128), [_z(_R, 4, dtype=C64)], CONVERT),
    ("norm", lambda z: jnp.linalg.norm(z), [_z(_R, 4)], "sqrt"),
    ("angle", jnp.angle, [_z(_R, 4)], "atan2"),
    ("integer exponents", lambda z: jnp.power(z, jnp.array([0, 1, 2, 3])), [_z(_R, 4)], "pow"),
    ("complex exponents", lambda z, w: z**w, [_z(_R, 4), _z(_R, 4)], "pow"),
    ("real base, complex exponent", lambda x, w: jnp.abs(x) ** w, [_x(_R, 4), _z(_R, 4)], "pow"),
    ("exp(i|z|)", lambda z: jnp.exp(1j * jnp.abs(z)), [_z(_R, 4)], "exp"),
    ("operators", lambda z: abs(1j * z + 2) ** 2 + z.real * z.imag - z.conj(), [_z(_R, 4)], "imag"),
]  # fmt: skip
# ruff: noqa: E501 (the table above reads best one case per line)


@pytest.mark.filterwarnings("ignore:Casting complex values to real")
@pytest.mark.parametrize("case", STRUCTURAL, ids=[c[0] for c in STRUCTURAL])
def test_structural_on_complex_eager(case):
    _, fun, args, prim = case
    assert prim in emitted(fun, *args)
    check_against_jax(fun, *args, modes=("eager",), second_order=False)


def _structural_at_once(cases):
    counts = [len(c[2]) for c in cases]
    flat = [x for c in cases for x in c[2]]

    def everything(*flat):
        outs, i = [], 0
        for (_, fun, _, _), n in zip(cases, counts, strict=True):
            outs.append(fun(*flat[i : i + n]))
            i += n
        return outs

    return everything, flat


@pytest.mark.filterwarnings("ignore:Casting complex values to real")
def test_structural_on_complex_at_once_under_jit():
    fun, args = _structural_at_once(STRUCTURAL)
    check_against_jax(fun, *args, modes=("jit",), second_order=False)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Casting complex values to real")
@pytest.mark.parametrize("case", STRUCTURAL, ids=[c[0] for c in STRUCTURAL])
def test_structural_on_complex_every_mode(case):
    _, fun, args, _ = case
    check_against_jax(fun, *args)


# --- the transforms' complex API -----------------------------------------------------


def _loss(z, w):  # real, not holomorphic
    return jnp.sum(jnp.abs(jnp.sin(z) * w) ** 2) + jnp.real(jnp.vdot(z, w))


def test_grad_of_a_real_loss_of_complex_inputs_is_jax_grad():
    rng = np.random.default_rng(1)
    z, w = _z(rng, 4), _z(rng, 4)
    for argnums in (0, 1, (0, 1)):
        want = jax.grad(_loss, argnums)(z, w)
        for got in (cr.grad(_loss, argnums)(z, w), jax.jit(cr.grad(_loss, argnums))(z, w)):
            jax.tree_util.tree_map(
                lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12), got, want
            )
    # JAX's convention spelled out on |z|^2: the gradient is conj(2z)
    assert complex(cr.grad(lambda z: jnp.abs(z) ** 2)(3.0 + 4.0j)) == 6 - 8j


def test_second_order_of_a_real_loss_of_complex_inputs():
    rng = np.random.default_rng(2)
    z, w = _z(rng, 3), _z(rng, 3)

    def outer(grad):
        return lambda z: jnp.real(jnp.vdot(grad(_loss)(z, w), z * w))

    want = jax.grad(outer(jax.grad))(z)
    np.testing.assert_allclose(cr.grad(outer(cr.grad))(z), want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(cr.grad(outer(cr.grad)))(z), want, rtol=1e-12)


def _holo(z):
    return jnp.sum(jnp.sin(z) * z**2 / (1.0 + jnp.exp(z)))


@pytest.mark.parametrize("dtype", [C128, pytest.param(C64, marks=pytest.mark.slow)])
def test_holomorphic_grad_value_and_grad_and_vjp(dtype):
    z = _z(np.random.default_rng(3), 4, dtype=dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == jnp.complex128 else dict(rtol=2e-5, atol=2e-5)
    want = jax.grad(_holo, holomorphic=True)(z)
    assert want.dtype == dtype
    for got in (
        cr.grad(_holo, holomorphic=True)(z),
        jax.jit(cr.grad(_holo, holomorphic=True))(z),
        cr.value_and_grad(_holo, holomorphic=True)(z)[1],
    ):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, **tol)
    value, _ = cr.value_and_grad(_holo, holomorphic=True)(z)
    np.testing.assert_allclose(value, _holo(z), **tol)
    (g, aux) = cr.grad(lambda z: (_holo(z), z.real), holomorphic=True, has_aux=True)(z)
    np.testing.assert_allclose(g, want, **tol)
    np.testing.assert_allclose(aux, z.real)
    # second order: d/dz of the holomorphic derivative
    g2 = cr.grad(lambda z: cr.grad(_holo, holomorphic=True)(z)[0], holomorphic=True)(z)
    w2 = jax.grad(lambda z: jax.grad(_holo, holomorphic=True)(z)[0], holomorphic=True)(z)
    np.testing.assert_allclose(g2, w2, **tol)


def test_complex_output_without_holomorphic_is_jax_type_error():
    for grad in (jax.grad, cr.grad):
        with pytest.raises(TypeError, match="holomorphic=True"):
            grad(lambda z: z * 2)(1.0 + 1.0j)
    with pytest.raises(errors.NonScalarOutputError, match=r"complex128.*holomorphic=True.*cr\.vjp"):
        cr.grad(lambda z: jnp.sin(z))(jnp.asarray(1.0 + 1.0j))


def test_holomorphic_with_real_inputs_or_outputs_is_jax_type_error():
    for grad in (jax.grad, cr.grad):
        with pytest.raises(TypeError, match="holomorphic=True requires inputs with complex"):
            grad(lambda x: x * 2, holomorphic=True)(1.0)
        with pytest.raises(TypeError, match="holomorphic=True requires"):
            grad(jnp.abs, holomorphic=True)(1.0j)
    with pytest.raises(errors.InputTypeError, match=r"argument 0 \('x'\) has dtype float64"):
        cr.grad(lambda x: x * 2, holomorphic=True)(1.0)


def test_vjp_of_a_non_holomorphic_complex_function():
    """As jax.vjp: complex inputs and outputs, a complex cotangent."""
    rng = np.random.default_rng(4)
    z = _z(rng, 3)
    fun = lambda z: jnp.conj(z) * jnp.abs(z) + jnp.real(z) * 1j  # noqa: E731
    check_against_jax(fun, z, modes=("eager", "jit"))


# --- allow_int ----------------------------------------------------------------------


def _mixed(x, n):
    return jnp.sum(x * n)


def _assert_float0(g, shape):
    assert g.dtype == jax.dtypes.float0 and g.shape == shape


@pytest.mark.parametrize("grad", [cr.grad, jax.grad], ids=["cr", "jax"])
def test_allow_int_gives_float0_zeros(grad):
    x, n = jnp.asarray([1.0, 2.0, 3.0]), jnp.arange(3)
    for wrap in (lambda f: f, jax.jit):
        gx, gn = wrap(grad(_mixed, argnums=(0, 1), allow_int=True))(x, n)
        np.testing.assert_array_equal(gx, n.astype(x.dtype))
        _assert_float0(gn, (3,))
    gx, gn = jax.vmap(grad(_mixed, argnums=(0, 1), allow_int=True))(
        jnp.ones((2, 3)), jnp.ones((2, 3), jnp.int32)
    )
    _assert_float0(gn, (2, 3))
    gb, gx = grad(lambda b, x: jnp.sum(jnp.where(b, x, 0.0)), (0, 1), allow_int=True)(
        jnp.asarray([True, False]), jnp.ones(2)
    )
    _assert_float0(gb, (2,))
    _assert_float0(grad(lambda n: 1.0, allow_int=True)(3), ())
    tree = grad(lambda p: jnp.sum(p["w"] * p["k"]), allow_int=True)(
        {"w": jnp.ones(2), "k": jnp.arange(2)}
    )
    _assert_float0(tree["k"], (2,))


def test_float0_zeros_are_of_jax_type():
    """The float0 zeros are of the type JAX hands back (its host array type,
    with `weak_type`), eagerly, under jit and under vmap."""
    x, n = jnp.asarray([1.0, 2.0, 3.0]), jnp.arange(3)
    for wrap in (lambda f: f, jax.jit, jax.vmap):
        want, got = (
            wrap(T.grad(_mixed, argnums=(0, 1), allow_int=True))(x, n)[1] for T in (jax, cr)
        )
        assert type(got) is type(want) and got.weak_type == want.weak_type
    want, got = (T.vjp(_mixed, x, n)[1](1.0)[1] for T in (jax, cr))
    assert type(got) is type(want)


def test_value_and_grad_allow_int():
    value, (gx, gn) = cr.value_and_grad(_mixed, argnums=(0, 1), allow_int=True)(
        jnp.ones(3), jnp.arange(3)
    )
    assert float(value) == 3.0
    _assert_float0(gn, (3,))


def test_integer_input_without_allow_int_is_jax_type_error():
    for grad in (jax.grad, cr.grad):
        with pytest.raises(TypeError, match="allow_int"):
            grad(_mixed, argnums=1)(jnp.ones(3), jnp.arange(3))
    with pytest.raises(errors.InputTypeError, match=r"argument 1 \('n'\) has dtype int"):
        cr.grad(_mixed, argnums=1)(jnp.ones(3), jnp.arange(3))


def test_vjp_takes_integer_primals_as_jax_does():
    x, n = jnp.ones(2), jnp.arange(2)
    out, vjp_fn = cr.vjp(lambda x, n: x * n, x, n)
    gx, gn = vjp_fn(jnp.ones(2))
    want_x, want_n = jax.vjp(lambda x, n: x * n, x, n)[1](jnp.ones(2))
    np.testing.assert_array_equal(gx, want_x)
    _assert_float0(gn, want_n.shape)


# --- a complex-parameter loss: a small unitary circuit's fidelity ---------------------

_CNOT = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], np.complex128)


def _rz(phi):
    e = jnp.exp(0.5j * phi)
    return jnp.array([[jnp.conj(e), 0], [0, e]])


def _ry(theta):
    c, s = jnp.cos(theta / 2), jnp.sin(theta / 2)
    return jnp.array([[c, -s], [s, c]]).astype(jnp.result_type(theta, jnp.complex64))


def _u3(angles):
    return _rz(angles[1]) @ _ry(angles[0]) @ _rz(angles[2])


def _circuit(angles):
    """A 2-qubit unitary: layers of single-qubit rotations (complex phases) and CNOTs;
    no matrix exponential."""
    unitary = jnp.eye(4, dtype=jnp.result_type(angles, jnp.complex64))
    for layer in angles:
        local = jnp.kron(_u3(layer[0]), _u3(layer[1]))
        unitary = _CNOT.astype(unitary.dtype) @ local @ unitary
    return unitary


def _infidelity(angles, psi0, target):
    """1 - |<target|U psi0>|^2 with psi0 a complex parameter (normalised here)."""
    psi = psi0 / jnp.linalg.norm(psi0)
    return 1.0 - jnp.abs(jnp.vdot(target, _circuit(angles) @ psi)) ** 2


@pytest.mark.parametrize(
    "real, cplx",
    [(jnp.float64, C128), pytest.param(F32, C64, marks=pytest.mark.slow)],
)
def test_unitary_circuit_fidelity_gives_jax_grad(real, cplx):
    rng = np.random.default_rng(5)
    angles = jnp.asarray(rng.uniform(-np.pi, np.pi, (2, 2, 3)), real)
    psi0 = _z(rng, 4, dtype=cplx)
    target = _z(rng, 4, dtype=cplx)
    target = target / jnp.linalg.norm(target)
    tol = dict(rtol=1e-12, atol=1e-12) if real == jnp.float64 else dict(rtol=1e-4, atol=1e-5)
    u = _circuit(angles)
    np.testing.assert_allclose(u.conj().T @ u, np.eye(4), atol=1e-5)  # it is unitary
    want = jax.grad(_infidelity, argnums=(0, 1))(angles, psi0, target)
    for got in (
        cr.grad(_infidelity, argnums=(0, 1))(angles, psi0, target),
        jax.jit(cr.grad(_infidelity, argnums=(0, 1)))(angles, psi0, target),
    ):
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype
            np.testing.assert_allclose(g, w, **tol)


@pytest.mark.slow
def test_unitary_circuit_trains_as_with_jax():
    """A few steps of gradient descent (on conj(grad) for the complex parameter) follow
    jax.grad's path."""
    rng = np.random.default_rng(6)
    angles = jnp.asarray(rng.uniform(-np.pi, np.pi, (2, 2, 3)))
    psi0 = _z(rng, 4)
    target = _z(rng, 4)
    target = target / jnp.linalg.norm(target)

    def run(grad):
        step = jax.jit(grad(_infidelity, argnums=(0, 1)))
        a, p = angles, psi0
        for _ in range(5):
            ga, gp = step(a, p, target)
            a, p = a - 0.1 * ga, p - 0.1 * jnp.conj(gp)
        return _infidelity(a, p, target), a, p

    for got, want in zip(run(cr.grad), run(jax.grad), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert run(cr.grad)[0] < _infidelity(angles, psi0, target)


@pytest.mark.parametrize("op", ["__lt__", "__le__", "__gt__", "__ge__"])
def test_ordering_operators_compare_complex_values_lexicographically(op):
    """`z > 1` on a differentiated complex value: jax.numpy's comparison (the
    real parts, then the imaginary parts on ties), not lax's, which refuses
    complex operands."""
    z = jnp.array([2 + 1j, 1 + 2j, 1 + 0j, 1 - 1j, 0.5j, 1 + 0j], jnp.complex64)
    other = jnp.array([1 + 0j, 1 + 0j, 1 + 0j, 1 + 0j, 0j, 1 + 1e-3j], jnp.complex64)

    def f(z):
        return jnp.sum(jnp.abs(jnp.where(getattr(z, op)(other), z, 2.0 * z)))

    want = jax.grad(f)(z)
    for grad in (cr.grad(f), jax.jit(cr.grad(f))):
        np.testing.assert_allclose(grad(z), want, rtol=1e-6)
    name = {
        "__lt__": "less",
        "__le__": "less_equal",
        "__gt__": "greater",
        "__ge__": "greater_equal",
    }
    np.testing.assert_array_equal(
        getattr(cnp, name[op])(z, other), getattr(jnp, name[op])(z, other)
    )
