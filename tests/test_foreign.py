"""Primitives of other libraries, differentiated by the rules they register with JAX.

The primitives here are defined as a library outside JAX defines its own
(`jax.extend.core.Primitive`, an implementation, an abstract evaluation, a
lowering for `jit`, a batching rule for `vmap`, and the derivative rules in
`jax.interpreters.ad`): a nonlinear one with only a JVP rule, one with two
results, linear ones with transpose rules (whose JVP rules apply the
primitive to the tangents again, as equinox's do), one linear in some
operands only. The oracle is JAX differentiating the same functions through
the same rules (`tests/oracle.py`: first and second order, eagerly, under
`jit` and `vmap`), and `jax.jvp`/`jax.jacfwd`/`jax.hessian` for forward
mode. equinox's own primitives (`maybe_set`, `select_if_vmap`,
`nondifferentiable_backward`, `noinline`), which its while loops and diffrax's
adjoints use, are checked the same way.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from functools import partial

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

import chainrule as cr
from chainrule.engine.rules.foreign import foreign_rule
from chainrule.errors import NoVJPRuleError
from tests.oracle import check_against_jax


def _define(name, impl, abstract, *, multiple_results=False, batching_rule=None):
    p = Primitive(name)
    p.multiple_results = multiple_results
    p.def_impl(impl)
    p.def_abstract_eval(abstract)
    mlir.register_lowering(p, mlir.lower_fun(impl, multiple_results=multiple_results))
    batching.primitive_batchers[p] = batching_rule or partial(_elementwise_batch, p)
    return p


def _elementwise_batch(p, args, dims):
    """The batching rule of an elementwise primitive: every operand broadcast
    to the batch of the output, along axis 0."""
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    moved = [
        jnp.expand_dims(a, 0) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip(args, dims, strict=True)
    ]
    shape = np.broadcast_shapes(*(m.shape[1:] for m in moved))
    return p.bind(*(jnp.broadcast_to(m, (size, *shape)) for m in moved)), 0


def _zero_like(x):
    """JAX's symbolic zero tangent for a primal value `x`."""
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _same(*avals):
    return avals[-1]


# cube(x) = x**3: nonlinear, a JVP rule only (`ad.defjvp`, as most libraries write it)
cube_p = _define("test_cube", lambda x: x**3, _same)
ad.defjvp(cube_p, lambda g, x: 3 * x**2 * g)


# sincos(x) = (sin x, cos x): two results; a JVP rule written against
# `ad.primitive_jvps` directly, answering a symbolic zero with one
def _sincos_impl(x):
    return [jnp.sin(x), jnp.cos(x)]


def _sincos_batch(args, dims):
    return sincos_p.bind(*args), [dims[0], dims[0]]


sincos_p = _define(
    "test_sincos",
    _sincos_impl,
    lambda x: [x, x],
    multiple_results=True,
    batching_rule=_sincos_batch,
)


def _sincos_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    s, c = sincos_p.bind(x)
    if type(t) is ad.Zero:
        return [s, c], [_zero_like(s), _zero_like(c)]
    return [s, c], [c * t, -s * t]


ad.primitive_jvps[sincos_p] = _sincos_jvp


# scale(x, c) = x * c: linear in x (its JVP applies `scale` to the tangent of
# x), nonlinear in (x, c) together; a transpose rule for x only
scale_p = _define("test_scale", lambda x, c: x * c, lambda x, c: x)


def _scale_jvp(primals, tangents):
    (x, c), (tx, tc) = primals, tangents
    out = scale_p.bind(x, c)
    t = _zero_like(out)
    if type(tx) is not ad.Zero:
        t = scale_p.bind(tx, c)
    if type(tc) is not ad.Zero:
        t = x * tc if type(t) is ad.Zero else t + x * tc
    return out, t


def _scale_transpose(ct, x, c):
    assert ad.is_undefined_primal(x) and not ad.is_undefined_primal(c)
    return [scale_p.bind(ct, c), None]


ad.primitive_jvps[scale_p] = _scale_jvp
ad.primitive_transposes[scale_p] = _scale_transpose


# pick(pred, a, b) = where(pred, a, b): linear in a and b, equinox's
# `select_if_vmap` in shape; its transpose answers symbolic zeros
def _pick_impl(pred, a, b):
    return jnp.where(pred, a, b)


pick_p = _define("test_pick", _pick_impl, lambda pred, a, b: a)


def _pick_jvp(primals, tangents):
    pred, a, b = primals
    _, ta, tb = tangents
    out = pick_p.bind(pred, a, b)
    if type(ta) is ad.Zero and type(tb) is ad.Zero:
        return out, _zero_like(out)
    return out, pick_p.bind(pred, ad.instantiate_zeros(ta), ad.instantiate_zeros(tb))


def _pick_transpose(ct, pred, a, b):
    zeros = jnp.zeros_like(ct)
    ct_a = pick_p.bind(pred, ct, zeros) if ad.is_undefined_primal(a) else None
    ct_b = pick_p.bind(pred, zeros, ct) if ad.is_undefined_primal(b) else ad.Zero(b.aval)
    return [None, ct_a, ct_b]


ad.primitive_jvps[pick_p] = _pick_jvp
ad.primitive_transposes[pick_p] = _pick_transpose


# twice(x) = 2x, linear, whose JVP applies it to the tangent, and no transpose rule
twice_p = _define("test_twice", lambda x: 2 * x, _same)
ad.primitive_jvps[twice_p] = lambda p, t: (twice_p.bind(p[0]), twice_p.bind(t[0]))

# opaque(x): no derivative rule at all
opaque_p = _define("test_opaque", lambda x: x + 1, _same)


# refuse(x) = x, linear; its transpose raises on any cotangent but JAX's symbolic
# zero (equinox's `nondifferentiable_backward` in shape)
refuse_p = _define("test_refuse", lambda x: x, _same)
ad.primitive_jvps[refuse_p] = lambda p, t: (
    refuse_p.bind(p[0]),
    t[0] if type(t[0]) is ad.Zero else refuse_p.bind(t[0]),
)


def _refuse_transpose(ct, x):
    if type(ct) is ad.Zero:
        return [None]
    raise RuntimeError("a cotangent reached refuse")


ad.primitive_transposes[refuse_p] = _refuse_transpose


def cube(x):
    return cube_p.bind(x)


def scale(x, c):
    return scale_p.bind(x, c)


def sincos(x):
    return sincos_p.bind(x)


def pick(pred, a, b):
    return pick_p.bind(pred, a, b)


X = jnp.array([0.3, -1.2, 0.7, 2.0])
C = jnp.array([1.5, -0.5, 2.0, 0.25])


@pytest.mark.parametrize(
    "fun, args",
    [
        (lambda x: cube(jnp.sin(x)) * x, (X,)),
        (lambda x: sincos(x)[0] * sincos(x * x)[1], (X,)),
        (lambda x: sincos(x)[1], (X,)),  # (one result's cotangent never arrives)
        (lambda x, c: scale(jnp.tanh(x), c) ** 2, (X, C)),
        (lambda x, c: scale(x, c * x), (X, C)),
        (lambda x, c: scale(x, 3.0) + scale(c, x), (X, C)),
        (lambda x, c: pick(x > 0.5, x**2, jnp.exp(c)) * c, (X, C)),
        (lambda x, c: pick(x > 0.5, cube(x), c), (X, C)),
        (
            lambda x: lax.scan(lambda h, _: (cube(jnp.sin(h)) + scale(h, h), None), x, None, 3)[0],
            (X,),
        ),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_foreign_primitives_against_jax(fun, args, dtype):
    check_against_jax(fun, *(a.astype(dtype) for a in args))


@pytest.mark.parametrize(
    "fun",
    [
        lambda x: jnp.sum(cube(x) * sincos(x)[0]),
        lambda x: jnp.sum(scale(x, x) ** 2),
        lambda x: jnp.sum(pick(x > 0, scale(x, 2.0), cube(x))),
        lambda x: jnp.sum(lax.scan(lambda h, _: (cube(jnp.sin(h)), None), x, None, 3)[0]),
        lambda x: jnp.sum(lax.cond(x[0] > 0, lambda y: scale(y, y), cube, x)),
    ],
)
def test_forward_mode_uses_the_jvp_rule(fun):
    """cr.jvp, jacfwd, hessian and jacrev against JAX's, eagerly and under jit."""
    x = X.astype(jnp.float64)
    t = jnp.arange(1.0, 5.0)
    for wrap in (lambda f: f, jax.jit):
        got = wrap(lambda x, t: cr.jvp(fun, (x,), (t,)))(x, t)
        want = jax.jvp(fun, (x,), (t,))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
        for ours, theirs in [(cr.jacfwd, jax.jacfwd), (cr.hessian, jax.hessian)]:
            np.testing.assert_allclose(wrap(ours(fun))(x), theirs(fun)(x), rtol=1e-12)
        np.testing.assert_allclose(
            wrap(cr.jacfwd(cr.jacrev(fun)))(x), jax.hessian(fun)(x), rtol=1e-12
        )


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-3, 3), min_size=1, max_size=6),
    st.floats(-2, 2),
)
def test_foreign_gradients_property(values, c):
    """Random inputs: the gradient through all four primitives is JAX's."""
    x = jnp.array(values, jnp.float64)

    def f(x, c):
        s, co = sincos(scale(x, c))
        return jnp.sum(pick(x > 0, cube(s), co * c))

    got = cr.grad(f, argnums=(0, 1))(x, c)
    want = jax.grad(f, argnums=(0, 1))(x, c)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


def test_linear_use_without_a_transpose_rule_is_refused():
    """`twice`'s JVP applies `twice` to the tangent, and no transpose rule says
    how to pull a cotangent back through that: JAX refuses, and so does
    chainrule, naming what the library did not register (instead of
    transposing the JVP rule into itself without end)."""
    f = lambda x: jnp.sum(twice_p.bind(x) ** 2)
    with pytest.raises(NotImplementedError):
        jax.grad(f)(X)
    with pytest.raises(NoVJPRuleError, match="no transpose rule"):
        cr.grad(f)(X)
    # forward mode needs only the JVP rule, in JAX and here
    got = cr.jvp(f, (X,), (jnp.ones(4),))
    want = jax.jvp(f, (X,), (jnp.ones(4),))
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_primitive_without_rules_is_refused():
    f = lambda x: jnp.sum(opaque_p.bind(x))
    with pytest.raises(NotImplementedError):
        jax.grad(f)(X)
    with pytest.raises(NoVJPRuleError, match="test_opaque"):
        cr.grad(f)(X)
    assert float(opaque_p.bind(jnp.float32(1.0))) == 2.0  # (evaluating it is fine)


def test_jax_own_primitives_are_never_derived_from_jax_rules():
    """A primitive of JAX itself gets no rule from JAX's registry: chainrule's
    table has its own, or it raises."""
    from jax._src.lax import lax as jax_lax

    assert jax_lax.to_edtype_p in ad.primitive_jvps
    assert foreign_rule(jax_lax.to_edtype_p, False) is None
    assert foreign_rule(jax_lax.sin_p, False) is None
    assert foreign_rule(cube_p, False) is not None


@jax.custom_jvp
def _pair(x, y):
    return jnp.sin(x), y * 2.0


@_pair.defjvp
def _pair_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    return _pair(x, y), (jnp.cos(x) * tx, refuse_p.bind(ty) * 2.0)


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_no_cotangent_is_a_symbolic_zero(wrap):
    """An output of a `custom_jvp` function that no cotangent reaches, and an
    input its used outputs do not depend on, carry JAX's symbolic zero: a
    rule that refuses every other cotangent (equinox's
    `nondifferentiable_backward`, which optimistix's implicit derivatives put
    on their residuals) is never called, in JAX or here. Under `jit` the
    `custom_jvp` rule comes from a jaxpr, whose transpose chainrule reads once."""

    def loss(x, y):
        out, _ = _pair(x, refuse_p.bind(y))
        return jnp.sum(out)

    x, y = X.astype(jnp.float64), C.astype(jnp.float64)
    want = jax.grad(loss, argnums=(0, 1))(x, y)
    for _ in range(2):  # (the second time from the transpose read once)
        got = wrap(cr.grad(lambda x, y: wrap(loss)(x, y), argnums=(0, 1)))(x, y)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12)
    with pytest.raises(RuntimeError, match="reached refuse"):  # (a real cotangent does)
        cr.grad(lambda x, y: jnp.sum(_pair(x, refuse_p.bind(y))[1]), argnums=1)(x, y)
    residual = lambda x: jnp.sum(_pair(x, eqxi.nondifferentiable_backward(x))[0])
    np.testing.assert_allclose(cr.grad(residual)(x), jax.grad(residual)(x), rtol=1e-12)


@jax.custom_jvp
def _no_tangent(x):
    """Identity whose JVP rule raises: JAX calls it only for a perturbed input
    (equinox's `nondifferentiable`, which diffrax puts on its implicit
    solvers' Jacobians)."""
    return x


@_no_tangent.defjvp
def _no_tangent_jvp(primals, tangents):
    raise RuntimeError("a tangent reached no_tangent")


_sg = lax.stop_gradient
_SYMBOLIC_ZERO_CASES = {
    "stop_gradient": lambda a: jnp.sum(_no_tangent(_sg(a)) * a),
    "cond": lambda a: jnp.sum(
        _no_tangent(lax.cond(a[0] > 0, lambda: jnp.outer(_sg(a), _sg(a)), lambda: jnp.eye(4))) @ a
    ),
    "switch in jit": lambda a: jnp.sum(
        _no_tangent(jax.jit(lambda a: lax.switch(1, [lambda: _sg(a) * 2, lambda: jnp.zeros(4)]))(a))
        * a
    ),
    "scan carry through cond": lambda a: jnp.sum(
        lax.scan(
            lambda c, _: (
                (
                    c[0] * jnp.tanh(a) + jnp.sum(_no_tangent(c[1])) * 0.1,
                    lax.cond(c[0][0] > 0, lambda: _sg(jnp.outer(c[0], c[0])), lambda: _sg(c[1])),
                ),
                None,
            ),
            (a, jnp.eye(4)),
            None,
            3,
        )[0][0]
    ),
    "scan output": lambda a: jnp.sum(
        _no_tangent(lax.scan(lambda c, x: (_sg(c) * x, jnp.sin(_sg(x))), a[0], jnp.tanh(a))[1]) * a
    ),
}


@pytest.mark.parametrize("case", sorted(_SYMBOLIC_ZERO_CASES))
def test_outputs_without_a_derivative_are_not_traced(case):
    """A `cond` output that no branch computes differentiably from the
    differentiated values (a `stop_gradient` of them, a constant), and a scan
    carry reached only through such outputs, have JAX's symbolic zero tangent:
    a rule that refuses every tangent is never called for them."""
    fun = _SYMBOLIC_ZERO_CASES[case]
    x = X.astype(jnp.float64)
    want = jax.grad(fun)(x)
    for wrap in (lambda f: f, jax.jit):
        np.testing.assert_allclose(wrap(cr.grad(fun))(x), want, rtol=1e-12)
    got = cr.jvp(fun, (x,), (jnp.ones(4),))
    np.testing.assert_allclose(got[1], jax.jvp(fun, (x,), (jnp.ones(4),))[1], rtol=1e-12)


# --- equinox's primitives ---------------------------------------------------------


def _while(kind, buffers=False):
    def f(x):
        def cond(c):
            return c[0] < 4

        def body(c):
            i, y, buf = c
            if buffers:  # (`maybe_set`: a write into a buffer of the loop)
                buf = buf.at[i].set(y * jnp.cos(y[0]), pred=i < 3)
            return i + 1, jnp.sin(y) * 1.1 + y * y[0], buf

        init = (0, x, jnp.zeros((5, x.shape[0]), x.dtype))
        out = eqxi.while_loop(
            cond, body, init, max_steps=6, kind=kind, buffers=(lambda c: c[2]) if buffers else None
        )
        return jnp.sum(out[1] ** 2) + jnp.sum(out[2] ** 2)

    return f


@pytest.mark.parametrize(
    "fun",
    [
        _while("checkpointed"),
        _while("checkpointed", buffers=True),
        _while("bounded"),
        _while("bounded", buffers=True),
        lambda x: jnp.sum(eqxi.noinline(lambda y: jnp.sin(y) ** 2 * y[0])(x)),
        lambda x: jnp.sum(eqx.filter_checkpoint(lambda y: jnp.sin(y) * y)(x)),
    ],
)
def test_equinox_primitives_against_jax(fun):
    x = X.astype(jnp.float64)
    for transform in (lambda g: g, jax.jit):
        np.testing.assert_allclose(
            transform(cr.grad(fun))(x), jax.grad(fun)(x), rtol=1e-12, atol=1e-14
        )
    xs = jnp.stack([x, 0.5 * x])
    np.testing.assert_allclose(
        jax.vmap(cr.grad(fun))(xs), jax.vmap(jax.grad(fun))(xs), rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(cr.hessian(fun)(x), jax.hessian(fun)(x), rtol=1e-10, atol=1e-12)


def test_equinox_errors_as_in_jax():
    """`nondifferentiable_backward` raises JAX's error in the backward pass
    (its transpose rule does), `nondifferentiable` in any derivative."""
    f = lambda x: jnp.sum(eqxi.nondifferentiable_backward(x) ** 2)
    for grad in (jax.grad, cr.grad):
        with pytest.raises(RuntimeError, match="Unexpected cotangent"):
            grad(f)(X)
    g = lambda x: jnp.sum(eqxi.nondifferentiable(x) * x)
    for grad in (jax.grad, cr.grad):
        with pytest.raises(RuntimeError, match="Unexpected tangent"):
            grad(g)(X)
    # forward mode goes through `nondifferentiable_backward`, as in JAX
    got = cr.jvp(f, (X,), (jnp.ones(4),))
    want = jax.jvp(f, (X,), (jnp.ones(4),))
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_no_jax_rule_of_jax_primitives_is_called():
    """With every rule JAX registers for its own primitives made to raise, a
    gradient through the foreign primitives still works: only their own
    rules were called. (equinox's checkpointed while loop is not used here:
    its `custom_vjp` backward pass calls `jax.vjp` itself, as it does under
    `jax.grad`.)"""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax._src.interpreters import ad
        from chainrule.engine.rules.foreign import jax_own
        from tests.test_foreign import X, cube, scale, sincos, pick

        def f(x):
            return jnp.sum(pick(x > 0, cube(sincos(x)[0]), scale(x, x)))

        want = jax.grad(f)(X)
        def forbidden(p):
            def raise_(*a, **k):
                raise AssertionError(f"JAX's rule for {p} was called")
            return raise_
        for table in (ad.primitive_jvps, ad.primitive_transposes):
            for p in list(table):
                if jax_own(p):
                    table[p] = forbidden(p)
        import chainrule as cr
        for fn in (cr.grad(f), jax.jit(cr.grad(f))):
            np.testing.assert_allclose(fn(X), want, rtol=1e-6)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


# gate(pred, a) = where(pred, a, 0): linear in a; its transpose records the type
# of the predicate it is handed, which a library's rule may check against the
# type it traced (equinox's closure conversion does, in diffrax's ImplicitAdjoint)
gate_p = _define("test_gate", lambda pred, a: jnp.where(pred, a, 0), lambda pred, a: a)
_GATE_SEEN: list = []


def _gate_jvp(primals, tangents):
    pred, a = primals
    _, ta = tangents
    out = gate_p.bind(pred, a)
    return out, _zero_like(out) if type(ta) is ad.Zero else gate_p.bind(pred, ta)


def _gate_transpose(ct, pred, a):
    _GATE_SEEN.append((isinstance(pred, jax.Array), str(jax.typeof(pred))))
    return [None, gate_p.bind(pred, ct)]


ad.primitive_jvps[gate_p] = _gate_jvp
ad.primitive_transposes[gate_p] = _gate_transpose


@jax.custom_jvp
def _always(x):
    return True  # (a Python bool, eagerly: diffrax's steady-state event returns one)


_always.defjvp(lambda p, t: (_always(*p), jnp.zeros((), jax.dtypes.float0)))

_GATED = {
    # a Python bool argument of a `jit` function is a `bool[]` array in its body
    "jit argument": lambda a: jax.jit(lambda a, f: gate_p.bind(lax.stop_gradient(f), a))(a, True),
    # a `bool[]` literal handed on unchanged by `stop_gradient`
    "literal": jax.jit(lambda a: gate_p.bind(lax.stop_gradient(True), a)),
    # a custom_jvp function's Python bool, in a `jit` body
    "custom_jvp output": jax.jit(lambda a: gate_p.bind(_always(a), a)),
}


@pytest.mark.parametrize("case", sorted(_GATED))
def test_library_rules_see_the_types_jax_hands_them(case):
    """A library's transpose rule is handed its nonlinear operands typed as JAX
    types them: inside a `jit` body, a `bool[]` array, not a Python bool."""
    f = lambda a: jnp.sum(_GATED[case](a) ** 2)  # noqa: E731
    a = jnp.arange(1.0, 4.0)
    _GATE_SEEN.clear()
    want = jax.grad(f)(a)
    seen_by_jax = list(_GATE_SEEN)
    assert seen_by_jax, "JAX did not call the transpose rule"
    for wrap in (lambda g: g, jax.jit):
        _GATE_SEEN.clear()
        np.testing.assert_allclose(wrap(cr.grad(f))(a), want, rtol=1e-12)
        assert _GATE_SEEN == seen_by_jax


# doubled_p(x) = 2x, whose JVP rule maps a `vmap` over its primals with in_axes
# built from them as a tuple, as equinox's `vprim` rules do: a list where JAX
# hands a tuple is no prefix of the tuple, and `vmap` raises
doubled_p = _define("test_doubled", lambda x: 2 * x, lambda x: x)
_DOUBLED_SEEN: list = []


def _doubled_jvp(primals, tangents):
    _DOUBLED_SEEN.append((type(primals).__name__, type(tangents).__name__))
    axes = jax.tree_util.tree_map(lambda _: None, primals)
    (t,) = tangents
    out = jax.vmap(lambda *p: doubled_p.bind(*p), in_axes=axes, axis_size=1)(*primals)[0]
    return out, (t if type(t) is ad.Zero else 2 * t)


ad.primitive_jvps[doubled_p] = _doubled_jvp


def test_library_jvp_rules_get_tuples_as_jax_hands_them():
    """The primals and tangents a library's JVP rule gets are tuples, as from
    JAX's `JVPTrace` (equinox's `vprim` tests failed under `cr.jvp`)."""
    f = lambda x: jnp.sum(jnp.sin(doubled_p.bind(x)))  # noqa: E731
    x = jnp.arange(1.0, 4.0)
    for jax_t, cr_t in (
        (lambda: jax.grad(f)(x), lambda: cr.grad(f)(x)),
        (lambda: jax.jvp(f, (x,), (x,)), lambda: cr.jvp(f, (x,), (x,))),
    ):
        _DOUBLED_SEEN.clear()
        want = jax_t()
        seen_by_jax = set(_DOUBLED_SEEN)
        _DOUBLED_SEEN.clear()
        got = cr_t()
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6)
        assert set(_DOUBLED_SEEN) == seen_by_jax == {("tuple", "tuple")}


def test_linear_transpose_uses_a_librarys_transpose_rule():
    """`jax.linear_transpose` reads a library's primitive with a transpose rule
    as linear and transposes it by that rule; chainrule refused it as not known
    to be linear (equinox's `test_vprim`, hunt P). The rule's answer is
    JAX's, and `cr.grad` of the same function is unchanged."""
    c = jnp.array([2.0, -1.0, 0.5, 3.0])
    f = lambda x: scale(x, c) + 2.0 * x  # noqa: E731
    ct = jnp.array([1.0, 10.0, -3.0, 0.25])
    want = jax.linear_transpose(f, X)(ct)
    for got in (cr.linear_transpose(f, X)(ct), jax.jit(lambda u: cr.linear_transpose(f, X)(u))(ct)):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    # nonlinear in (x, c) together: the library's rule refuses it, for JAX and here
    for transpose in (jax.linear_transpose, cr.linear_transpose):
        with pytest.raises(AssertionError):
            transpose(lambda x: scale(x, x), X)(ct)
