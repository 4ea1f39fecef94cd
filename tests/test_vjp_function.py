"""`cr.vjp`'s vjp_fn is a pytree, as JAX's is: its leaves are the arrays the
backward pass reads, so it can leave `jax.jit`, enter it, be mapped over by
`jax.vmap`, or be a `custom_vjp` residual (`fwd` returning the vjp_fn of an
inner `vjp`, a common way to write a custom rule). So are the functions
`cr.linearize` and `cr.linear_transpose` return (JAX's are `Partial`s).
Oracles: `jax.vjp`, `jax.linearize`, `jax.linear_transpose`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import chainrule as cr
from chainrule.errors import CotangentError


def _mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jax.nn.softplus(h @ params["w2"]), jnp.sum(h**2)


def _scan(c, xs):
    def step(c, x):
        c = jnp.sin(c) * x + c**2 / 4
        return c, jnp.exp(-c) * x

    return lax.scan(step, c, xs)


def _with_integer(x, n):
    return jnp.sum(x**2) * n, jnp.cumprod(x)


def _constant_output(x):
    return x * 3.0, jnp.ones(2)


def _args(name, dtype):
    rng = np.random.default_rng(0)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    if name == "mlp":
        params = {"w1": r(3, 4), "b1": r(4), "w2": r(4, 2)}
        return _mlp, (params, r(5, 3))
    if name == "scan":
        return _scan, (r(2), r(6, 2))
    if name == "integer":
        return _with_integer, (r(4), jnp.asarray(3))
    return _constant_output, (r(2),)


CASES = ["mlp", "scan", "integer", "constant"]


def _cotangent(out):
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(
        lambda o: jnp.asarray(rng.normal(size=np.shape(o)), jnp.result_type(o)), out
    )


def _tangent(args):
    rng = np.random.default_rng(2)

    def t(a):
        a = jnp.asarray(a)
        if not jnp.issubdtype(a.dtype, jnp.inexact):
            return np.zeros(a.shape, jax.dtypes.float0)
        return jnp.asarray(rng.normal(size=a.shape), a.dtype)

    return jax.tree_util.tree_map(t, args)


def _close(a, b, dtype):
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.shape(x) == np.shape(y) and x.dtype == y.dtype
        if x.dtype == jax.dtypes.float0:
            continue
        np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float), rtol=tol, atol=tol)


@pytest.fixture(params=[jnp.float32, jnp.float64], ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.mark.parametrize("transform", ["vjp", "linearize"])
@pytest.mark.parametrize("name", CASES)
def test_a_function_returned_from_jit(transform, name, dtype):
    """cr.vjp's vjp_fn and cr.linearize's f_jvp (JAX's is a `Partial`)."""
    f, args = _args(name, dtype)
    out, jax_fn = getattr(jax, transform)(f, *args)
    out_cr, cr_fn = jax.jit(lambda *a: getattr(cr, transform)(f, *a))(*args)
    _close(out_cr, out, dtype)
    assert len(jax.tree_util.tree_leaves(cr_fn)) > 0
    if transform == "vjp":
        ct = _cotangent(out)
        _close(cr_fn(ct), jax_fn(ct), dtype)
        _close(cr_fn(ct), jax_fn(ct), dtype)  # (called twice: the tape is kept)
    else:
        ts = _tangent(args)
        _close(cr_fn(*ts), jax_fn(*ts), dtype)
        _close(jax.jit(lambda fn, t: fn(*t))(cr_fn, ts), jax_fn(*ts), dtype)
        _, eager_fn = cr.linearize(f, *args)
        _close(jax.tree_util.tree_map(np.array, eager_fn)(*ts), jax_fn(*ts), dtype)


@jax.custom_jvp
def _rescaled(x):
    return jnp.sin(x)


@_rescaled.defjvp
def _rescaled_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _rescaled(x), t * jnp.cos(x) * jnp.tanh(t)  # (not linear: jax.jvp applies it)


def _solve(a, b):  # a solve without a transpose_solve: forward mode only, in JAX too
    return lax.custom_linear_solve(lambda v: a @ v, b, lambda mv, r: jnp.linalg.solve(a, r))


FORWARD_ONLY = {
    "while loop": lambda x: lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.sin(c[1]) * x), (0, x)
    )[1],
    "custom_jvp rule applied to the tangents": lambda x: _rescaled(x) * x,
    "linear solve": lambda x: _solve(jnp.diag(x**2 + 2.0) + 0.1, x),
    "dilated max pool": lambda x: lax.reduce_window(
        jnp.outer(x, x), -jnp.inf, lax.max, (2, 2), (1, 1), "VALID", window_dilation=(1, 2)
    ),
}


@pytest.mark.parametrize("name", list(FORWARD_ONLY))
def test_a_linear_map_from_jit_through_what_only_goes_forward(name):
    """`cr.linearize`'s linear map returned from `jit`, through primitives that
    forward mode applies by their JVP (`rules/forward_only.py`): their node
    holds the arrays that JVP reads as operands, so the map carries them as
    leaves. They were hidden in the node's parameters, and applying the map
    outside `jit` raised JAX's UnexpectedTracerError."""
    f = FORWARD_ONLY[name]
    x = jnp.asarray([0.3, -0.5, 1.2])
    t = jnp.asarray([0.7, -0.2, 0.4])
    out, jax_fn = jax.linearize(f, x)
    out_cr, cr_fn = jax.jit(lambda a: cr.linearize(f, a))(x)
    _close(out_cr, out, jnp.float32)
    _close(cr_fn(t), jax_fn(t), jnp.float32)
    _close(jax.jit(lambda fn, u: fn(u))(cr_fn, t), jax_fn(t), jnp.float32)


@pytest.mark.parametrize("name", CASES)
def test_a_vjp_fn_passed_into_jit_and_rebuilt_from_its_leaves(name, dtype):
    f, args = _args(name, dtype)
    out, jax_fn = jax.vjp(f, *args)
    ct = _cotangent(out)
    _, cr_fn = cr.vjp(f, *args)
    _close(jax.jit(lambda fn, c: fn(c))(cr_fn, ct), jax_fn(ct), dtype)
    copied = jax.tree_util.tree_map(lambda x: np.array(x), cr_fn)  # (NumPy leaves)
    _close(copied(ct), jax_fn(ct), dtype)
    leaves, tree = jax.tree_util.tree_flatten(cr_fn)
    _close(jax.tree_util.tree_unflatten(tree, leaves)(ct), jax_fn(ct), dtype)


@pytest.mark.parametrize("name", ["mlp", "scan"])
def test_vjp_fns_mapped_by_vmap(name, dtype):
    f, args = _args(name, dtype)
    batched = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a, -a]), args)
    outs = jax.vmap(f)(*batched)
    cts = _cotangent(outs)
    expected = jax.vmap(lambda a, c: jax.vjp(f, *a)[1](c))(batched, cts)
    fns = jax.vmap(lambda a: cr.vjp(f, *a)[1])(batched)
    _close(jax.vmap(lambda fn, c: fn(c))(fns, cts), expected, dtype)


def _inner(x):
    return jnp.sum(jnp.sin(x) * x**2) + jnp.prod(jnp.cos(x))


@jax.custom_vjp
def _rule_by_vjp(x):
    return _inner(x)


def _fwd(x):
    y, vjp_fn = cr.vjp(_inner, x)  # the residual is the vjp_fn itself
    return y, vjp_fn


def _bwd(vjp_fn, g):
    return vjp_fn(g)


_rule_by_vjp.defvjp(_fwd, _bwd)


@pytest.mark.parametrize("mode", ["eager", "jit", "vmap"])
@pytest.mark.parametrize("transform", ["jax", "cr"])
def test_a_vjp_fn_as_a_custom_vjp_residual(mode, transform, dtype):
    x = jnp.asarray([0.3, -1.2, 2.0], dtype)
    grad = jax.grad if transform == "jax" else cr.grad
    g = grad(_rule_by_vjp)
    if mode == "jit":
        g = jax.jit(g)
    if mode == "vmap":
        xs = jnp.stack([x, x / 2])
        _close(jax.vmap(g)(xs), jax.vmap(jax.grad(_inner))(xs), dtype)
    else:
        _close(g(x), jax.grad(_inner)(x), dtype)


def test_second_order_through_a_vjp_fn_returned_from_jit(dtype):
    x = jnp.asarray([0.3, -1.2, 2.0], dtype)
    ct = jnp.asarray(1.5, dtype)

    def via(vjp):
        def h(x):
            _, fn = jax.jit(lambda x: vjp(_inner, x))(x)
            return jnp.sum(fn(ct)[0] ** 2)

        return h

    _close(cr.grad(via(cr.vjp))(x), jax.grad(via(jax.vjp))(x), dtype)
    _close(jax.jit(cr.grad(via(cr.vjp)))(x), jax.grad(via(jax.vjp))(x), dtype)


def test_a_rebuilt_vjp_fn_still_checks_its_cotangent():
    _, fn = jax.jit(lambda x: cr.vjp(jnp.sin, x))(jnp.ones(3))
    with pytest.raises(CotangentError, match="shape"):
        fn(jnp.ones(2))


def _linear(params, x):
    return {"y": x @ params["w"] * 2.0 - jnp.cumsum(x, axis=0), "z": jnp.sum(params["b"]) * 3.0}


@pytest.mark.parametrize("mode", ["returned", "passed", "copied"])
def test_a_linear_transpose_is_a_pytree(mode, dtype):
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(3, 3)), dtype), "b": jnp.ones(2, dtype)}
    x = jnp.asarray(rng.normal(size=(4, 3)), dtype)
    ct = {"y": jnp.asarray(rng.normal(size=(4, 3)), dtype), "z": jnp.asarray(0.7, dtype)}
    expected = jax.linear_transpose(lambda x: _linear(params, x), x)(ct)
    if mode == "returned":
        fn = jax.jit(lambda x: cr.linear_transpose(lambda x: _linear(params, x), x))(x)
        _close(fn(ct), expected, dtype)
    fn = cr.linear_transpose(lambda x: _linear(params, x), x)
    if mode == "passed":
        _close(jax.jit(lambda fn, c: fn(c))(fn, ct), expected, dtype)
    if mode == "copied":
        _close(jax.tree_util.tree_map(np.array, fn)(ct), expected, dtype)
    with pytest.raises(TypeError, match="cotangent type does not match"):
        fn({"y": ct["y"][:2], "z": ct["z"]})


@pytest.mark.parametrize("jitted", [True, False], ids=["jitted", "eager"])
@pytest.mark.parametrize("argnums", [0, (0,), (0, 1)], ids=["int", "1-tuple", "pair"])
@pytest.mark.parametrize("name", ["mlp", "scan"])
def test_fwd_and_bwd_as_jax(name, argnums, jitted, dtype):
    """`cr.fwd_and_bwd` against `jax.fwd_and_bwd`: outputs, aux, and the
    cotangents' structure (one for an int argnums, a tuple otherwise)."""
    f, args = _args(name, dtype)
    if name == "mlp":  # (its second output as aux)
        has_aux, args = True, (*args,)
    else:
        has_aux = False
    jfwd, jbwd = jax.fwd_and_bwd(f, argnums, has_aux=has_aux, jitted=jitted)
    cfwd, cbwd = cr.fwd_and_bwd(f, argnums, has_aux=has_aux, jitted=jitted)
    jout, cout = jfwd(*args), cfwd(*args)
    assert len(cout) == len(jout)
    _close(cout[0], jout[0], dtype)
    if has_aux:
        _close(cout[2], jout[2], dtype)
    ct = _cotangent(jout[0])
    want, got = jbwd(jout[1], ct), cbwd(cout[1], ct)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    _close(got, want, dtype)


def test_fwd_and_bwd_compiles_bwd_once(caplog):
    """The residuals a jitted `fwd` hands back on each call have one tree
    structure, so the jitted `bwd` compiles once (the point of `fwd_and_bwd`).

    Counted from `jax.log_compiles`'s records, not from the jitted function's
    C++ dispatch cache: that cache stays empty whenever JAX takes its Python
    dispatch path, which says nothing about compiling."""
    f, args = _args("mlp", jnp.float32)
    fwd, bwd = cr.fwd_and_bwd(lambda p, x: f(p, x)[0], argnums=(0, 1))
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        for _ in range(3):
            out, residuals = fwd(*args)
            bwd(residuals, _cotangent(out))
    compiled = [r.getMessage().split(" with ")[0] for r in caplog.records]
    compiled = [m for m in compiled if m.startswith("Compiling jit(")]
    assert compiled.count("Compiling jit(fwd)") == 1, compiled
    assert compiled.count("Compiling jit(bwd)") == 1, compiled


def test_bwd_names_what_it_takes():
    _, bwd = cr.fwd_and_bwd(jnp.sin, 0, jitted=False)
    with pytest.raises(TypeError, match="takes the residuals fwd returned"):
        bwd(jnp.ones(2), jnp.ones(2))
