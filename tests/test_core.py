"""The engine against its oracles: the tutorials' numbers, jax.grad, and structure.

Every expected value here is either stated by the tutorials (exact in float64
and float32: -2, -3, -9, -2.25 are representable) or computed by JAX's own
differentiation, never by chainrule itself.
"""

import gc
import inspect
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import chainrule as cr
import chainrule.numpy as cnp
from chainrule.engine import host
from tests.oracle import check_against_jax


def linear_loss(w, x, y):
    return (w * x - y) ** 2


def relu_net_loss(w1, w2, x, target):
    y = w2 * jax.nn.relu(w1 * x)
    return (y - target) ** 2


ENGINES = {
    "cr": lambda f, **kw: cr.value_and_grad(f, **kw),
    "cr-jit": lambda f, **kw: jax.jit(cr.value_and_grad(f, **kw)),
    "jax": lambda f, **kw: jax.value_and_grad(f, **kw),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_tutorial_linear_is_exactly_minus_two(engine, dtype):
    args = [jnp.asarray(v, dtype) for v in (1.0, 1.0, 2.0)]
    loss, dw = ENGINES[engine](linear_loss)(*args)
    assert loss.dtype == dtype and dw.dtype == dtype
    assert float(loss) == 1.0
    assert float(dw) == -2.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_tutorial_relu_network_numbers(engine, dtype):
    args = [jnp.asarray(v, dtype) for v in (0.5, 1.5, 2.0, 3.0)]
    loss, (dw1, dw2, dx) = ENGINES[engine](relu_net_loss, argnums=(0, 1, 2))(*args)
    assert (float(loss), float(dw1), float(dw2), float(dx)) == (2.25, -9.0, -3.0, -2.25)


def test_tutorial_numbers_from_python_floats():
    assert float(cr.grad(linear_loss)(1.0, 1.0, 2.0)) == -2.0
    assert float(jax.jit(cr.grad(linear_loss))(1.0, 1.0, 2.0)) == -2.0


def test_relu_gradient_at_zero_is_zero_like_pytorch():
    x = jnp.array([-1.0, 0.0, 2.0])
    f = lambda x: jnp.sum(jax.nn.relu(x))
    np.testing.assert_array_equal(cr.grad(f)(x), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(cr.grad(f)(x), jax.grad(f)(x))


def _mlp_params(key, sizes):
    params = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, k1, k2 = jax.random.split(key, 3)
        params[f"layer{i}"] = {
            "w": jax.random.normal(k1, (n, m)) / np.sqrt(m),
            "b": jax.random.normal(k2, (n,)) * 0.1,
        }
    return params


def mlp_loss(params, x, labels):
    h = x
    layers = [params[k] for k in sorted(params)]
    for layer in layers[:-1]:
        h = jax.nn.relu(h @ layer["w"].T + layer["b"])
    logits = h @ layers[-1]["w"].T + layers[-1]["b"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def test_mlp_with_dict_params_matches_jax_grad():
    key = jax.random.PRNGKey(0)
    params = _mlp_params(key, [6, 16, 8, 3])
    x = jax.random.normal(jax.random.PRNGKey(1), (10, 6))
    labels = jnp.arange(10) % 3
    expected = jax.grad(mlp_loss)(params, x, labels)
    for got in (
        cr.grad(mlp_loss)(params, x, labels),
        jax.jit(cr.grad(mlp_loss))(params, x, labels),
    ):
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), got, expected
        )


def test_third_derivative_of_polynomial_is_exact():
    f = lambda x: 2.0 * x**4 - 3.0 * x**3 + x
    x = 1.5
    # f''' = 48 x - 18, exact in binary floating point at x = 1.5
    assert float(cr.grad(cr.grad(cr.grad(f)))(x)) == 48 * x - 18
    assert float(cr.grad(cr.grad(cr.grad(f)))(x)) == float(jax.grad(jax.grad(jax.grad(f)))(x))


@pytest.mark.parametrize(
    "outer,inner",
    [(cr.grad, cr.grad), (cr.grad, jax.grad), (jax.grad, cr.grad)],
    ids=["cr-cr", "cr-jax", "jax-cr"],
)
def test_no_perturbation_confusion(outer, inner):
    # d/dx [x * d/dy (x + y)] = d/dx [x * 1] = 1; confusing the perturbations gives 2.
    f = lambda x: x * inner(lambda y: x + y)(x)
    assert float(outer(f)(3.0)) == 1.0


@pytest.mark.parametrize(
    "outer,inner", [(cr.grad, cr.grad), (cr.grad, jax.grad), (jax.grad, cr.grad)]
)
def test_nested_second_derivatives_mix(outer, inner):
    f = lambda x: jnp.sin(x) * x**2
    x = 0.7
    np.testing.assert_allclose(outer(inner(f))(x), jax.grad(jax.grad(f))(x), rtol=1e-12)


def test_per_example_gradients_through_vmap():
    w = jnp.array([0.5, -1.0, 2.0])
    xs = jax.random.normal(jax.random.PRNGKey(2), (7, 3))
    ys = jnp.arange(7.0)
    loss = lambda w, x, y: (jnp.dot(w, x) - y) ** 2
    expected = jax.vmap(jax.grad(loss), (None, 0, 0))(w, xs, ys)
    got = jax.vmap(cr.grad(loss), (None, 0, 0))(w, xs, ys)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    got_jit = jax.jit(jax.vmap(cr.grad(loss), (None, 0, 0)))(w, xs, ys)
    np.testing.assert_allclose(got_jit, expected, rtol=1e-12)


@pytest.mark.parametrize("transform", [cr.grad, cr.value_and_grad, cr.jacfwd, cr.jacrev])
def test_a_transformed_function_keeps_the_functions_name_and_docstring(transform):
    """As JAX's transforms do (functools.wraps): tracebacks, logs and `help()`
    show the user's function."""

    def loss(w):
        """The loss."""
        return w * w

    transformed = transform(loss)
    assert transformed.__name__ == "loss"
    assert transformed.__doc__ == "The loss."
    assert transformed.__wrapped__ is loss


def test_has_aux_and_argnums_tuple_match_jax():
    def f(a, b):
        return jnp.sum(a * b), {"sum_a": jnp.sum(a)}

    a, b = jnp.arange(3.0), jnp.ones(3) * 2
    got = cr.value_and_grad(f, argnums=(0, 1), has_aux=True)(a, b)
    expected = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(a, b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
    g, aux = cr.grad(f, has_aux=True)(a, b)
    np.testing.assert_array_equal(g, b)
    assert float(aux["sum_a"]) == 3.0


def _described(tree):
    """Each leaf's type, dtype, weak type and bits: what JAX hands back exactly."""
    return jax.tree_util.tree_map(
        lambda v: (
            type(v).__name__,
            str(getattr(v, "dtype", None)),
            getattr(v, "weak_type", None),
            np.asarray(v).tobytes(),
        ),
        tree,
    )


@pytest.mark.parametrize("x64", [False, True])
def test_aux_and_constant_outputs_are_handed_back_as_jax_hands_them(x64):
    """The function's own NumPy values and Python numbers come back untouched
    (a NumPy int64 of 2**40 is not cut to an int32 0 without x64); values
    computed from the inputs (`stop_gradient`, a comparison, a mean, a
    constant jnp array) as `jax.Array`s of JAX's type."""

    def loss(w):
        value = jnp.sum(w**2)
        aux = {
            "numpy": (np.float64(0.1), np.array([0.1, 0.2]), np.int64(2**40), np.float32(3)),
            "python": (1.5, 7, True),
            "computed": (lax.stop_gradient(value), jnp.ravel(w)[0] > 0, jnp.mean(w)),
            "constant": jnp.zeros(2),
        }
        return value, aux

    def outputs(w):  # constant outputs beside a traced one
        return w * 2, np.int64(2**40), np.array([0.5]), 2.5

    with jax.enable_x64(x64):
        for w in (jnp.ones(2), jnp.float32(2.0), 3.0):
            want = jax.value_and_grad(loss, has_aux=True)(w)[0][1]
            got = cr.value_and_grad(loss, has_aux=True)(w)[0][1]
            assert _described(got) == _described(want)
            want = jax.vjp(loss, w, has_aux=True)[2]
            assert _described(cr.vjp(loss, w, has_aux=True)[2]) == _described(want)
            assert _described(cr.vjp(outputs, w)[0]) == _described(jax.vjp(outputs, w)[0])
            got = cr.jvp(outputs, (w,), (jnp.ones_like(w),))[0]
            assert _described(got) == _described(jax.jvp(outputs, (w,), (jnp.ones_like(w),))[0])


@pytest.mark.parametrize(
    "argnums",
    [True, np.array(1), np.array([0, 1]), np.int64(1), [0, 1], (np.int64(0),), -1]
    + [jnp.array(1), jnp.array([1, 0]), (jnp.array(0),), [jnp.array(1), 0]],
    ids=["True", "0-d array", "1-d array", "np.int64", "list", "tuple of np.int64", "-1"]
    + ["0-d jax.Array", "1-d jax.Array", "tuple of a jax.Array", "list of mixed"],
)
@pytest.mark.parametrize(
    "transform", ["grad", "value_and_grad", "jacrev", "jacobian", "jacfwd", "hessian"]
)
def test_argnums_are_read_as_jax_reads_them(argnums, transform):
    """Any integer JAX takes (a bool, a NumPy integer or 0-d array, a 1-d
    array, a list), with JAX's result structure: jax.jacrev (and hessian) give
    a 1-tuple for an integer that is not a Python int, grad and jacfwd do not."""
    f = lambda a, b: jnp.sum(jnp.sin(a) * b**2)  # noqa: E731
    args = (jnp.array([0.5, 1.0]), jnp.array([2.0, -1.0]))
    want = getattr(jax, transform)(f, argnums=argnums)(*args)
    got = getattr(cr, transform)(f, argnums=argnums)(*args)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12)


def test_vjp_matches_jax_vjp_for_pytree_output():
    def f(x, y):
        return {"a": jnp.sin(x) * y, "b": (x @ y, jnp.tanh(y))}

    x, y = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4))
    out, vjp_fn = cr.vjp(f, x, y)
    out_ref, vjp_ref = jax.vjp(f, x, y)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15), out, out_ref
    )
    ct = jax.tree_util.tree_map(lambda o: jnp.cos(o) + 0.5, out_ref)
    for _ in range(2):  # a vjp function may be called many times
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15),
            vjp_fn(ct),
            vjp_ref(ct),
        )


@pytest.mark.parametrize(
    "ct",
    [np.ones(3), np.ones(3, np.float32), np.ones(3, np.float16), np.ones(3, np.int64), 1, 1.0],
    ids=["np f64", "np f32", "np f16", "np i64", "int", "float"],
)
@pytest.mark.parametrize("x64", [False, True])
def test_vjp_and_jvp_read_numpy_and_python_values_as_jax_does(ct, x64):
    """A NumPy cotangent or tangent is what JAX makes of it: float64 is float32
    without jax_enable_x64 (np.ones(3) is accepted there), a float16 or integer
    one is refused, a Python int too; a Python float takes the output's dtype."""
    with jax.enable_x64(x64):
        v = jnp.arange(3.0)
        fun = jnp.sum if np.ndim(ct) == 0 else jnp.sin
        for name, call in (
            ("vjp", lambda m: m.vjp(fun, v)[1](ct)[0]),
            ("jvp", lambda m: m.jvp(jnp.sin, (np.ones(3),), (ct,))[1]),
        ):
            if name == "jvp" and np.ndim(ct) == 0:
                continue  # (a tangent must have its primal's shape: both refuse it)
            try:
                want = call(jax)
            except (TypeError, ValueError) as e:
                with pytest.raises(type(e)):
                    call(cr)
                continue
            got = call(cr)
            assert got.dtype == want.dtype, name
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_output_independent_of_input_has_zero_gradient():
    g = cr.grad(lambda x, y: jnp.sum(y**2), argnums=(0, 1))(jnp.ones(3), jnp.ones(2))
    np.testing.assert_array_equal(g[0], jnp.zeros(3))
    np.testing.assert_array_equal(g[1], 2 * jnp.ones(2))


def test_dynamic_front_end_runs_python_control_flow_like_pytorch():
    def loss(w, x):
        h = cnp.tanh(x @ w)
        total = 0.0
        for i in range(h.shape[0]):
            if h[i] > 0:  # control flow on concrete values
                total = total + h[i] ** 2
            else:
                total = total - h[i]
        return total

    def reference(w, x):
        h = jnp.tanh(x @ w)
        return jnp.sum(jnp.where(h > 0, h**2, -h))

    w = jnp.array([0.3, -0.2])
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 2))
    np.testing.assert_allclose(cr.grad(loss)(w, x), jax.grad(reference)(w, x), rtol=1e-12)


def test_same_function_through_both_front_ends():
    def with_cnp(w, x):
        return cnp.mean(cnp.maximum(x @ w.T, 0.0) ** 2)

    def with_jnp(w, x):
        return jnp.mean(jnp.maximum(x @ w.T, 0.0) ** 2)

    w = jax.random.normal(jax.random.PRNGKey(5), (3, 4))
    x = jax.random.normal(jax.random.PRNGKey(6), (8, 4))
    expected = jax.grad(with_jnp)(w, x)
    np.testing.assert_allclose(cr.grad(with_cnp)(w, x), expected, rtol=1e-12)
    np.testing.assert_allclose(cr.grad(with_jnp)(w, x), expected, rtol=1e-12)


def test_custom_vjp_uses_the_users_bwd_rule():
    @jax.custom_vjp
    def clip_gradient(x):
        return x

    clip_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1.0, 1.0),))
    f = lambda x: jnp.sum(clip_gradient(x) * 10.0)
    x = jnp.array([1.0, 2.0])
    np.testing.assert_array_equal(cr.grad(f)(x), jax.grad(f)(x))
    np.testing.assert_array_equal(cr.grad(f)(x), [1.0, 1.0])


def test_custom_vjp_with_two_outputs_and_residuals():
    @jax.custom_vjp
    def f(x, y):
        return x * y, jnp.sin(x)

    def fwd(x, y):
        return f(x, y), (x, y, jnp.cos(x))

    def bwd(res, cts):
        x, y, cos_x = res
        g_prod, g_sin = cts
        return g_prod * y + g_sin * cos_x, g_prod * x * 3.0  # deliberately not the truth

    f.defvjp(fwd, bwd)
    loss = lambda x, y: jnp.sum(f(x, y)[0] + 2.0 * f(x, y)[1])
    x, y = jnp.array([0.3, 1.2]), jnp.array([2.0, -1.0])
    for a, b in zip(cr.grad(loss, (0, 1))(x, y), jax.grad(loss, (0, 1))(x, y), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_custom_jvp_second_derivative_matches_jax():
    f = lambda x: jnp.sum(jax.nn.softplus(x) * x)
    x = jnp.array([-1.0, 0.5, 2.0])
    np.testing.assert_allclose(
        jax.vmap(cr.grad(lambda x: cr.grad(f)(x)[0]))(x[None].repeat(1, 0))[0],
        jax.grad(lambda x: jax.grad(f)(x)[0])(x),
        rtol=1e-12,
    )


@pytest.mark.parametrize("on_host", [True, False], ids=["numpy-eager", "jax-eager"])
def test_deep_chain_of_100k_operations_and_memory_is_released(on_host):
    n = 50_000  # two operations per step: 100,000 nodes
    previous = host.set_enabled(on_host)

    def chain(w):
        for _ in range(n):
            w = cnp.sin(w) * 1.0001
        return w

    w0 = jnp.asarray(0.5, jnp.float64)  # typed: a weakly typed input stays in JAX
    probe = {}

    def watched(w):
        out = chain(w)
        probe["node"] = weakref.ref(out.node)
        # NumPy scalars (the host path's values) cannot be weakly referenced;
        # they are only referenced by their node, so the node check covers them.
        assert isinstance(out.node.ans, np.generic) == on_host
        probe["ans"] = None if on_host else weakref.ref(out.node.ans)
        return out

    try:
        g = cr.grad(watched)(w0)
    finally:
        host.set_enabled(previous)
    # Reference: the chain rule by hand, in float64 on the host.
    v, d = 0.5, 1.0
    for _ in range(n):
        d *= np.cos(v) * 1.0001
        v = np.sin(v) * 1.0001
    np.testing.assert_allclose(float(g), d, rtol=1e-9)
    gc.collect()
    assert probe["node"]() is None, "the tape outlived the gradient computation"
    if probe["ans"] is not None:
        assert probe["ans"]() is None, "intermediate values outlived the gradient computation"


def test_jnp_dtype_promotion_in_dynamic_front_end():
    def f(w):
        return cnp.sum(w.astype(jnp.float32) * jnp.ones(3, jnp.float32)).astype(jnp.float64)

    g = cr.grad(f)(jnp.arange(3.0))
    assert g.dtype == jnp.float64
    np.testing.assert_array_equal(g, jnp.ones(3))


def test_stop_gradient():
    f = lambda x: jnp.sum(x * lax.stop_gradient(x))
    x = jnp.array([1.0, -2.0])
    np.testing.assert_array_equal(cr.grad(f)(x), x)


def test_levels_only_grow_and_tracers_know_theirs():
    seen = []
    f = lambda x: seen.append(x) or x * 2.0  # noqa: E731
    cr.grad(f)(1.0)
    cr.grad(cr.grad(f))(1.0)
    assert all(isinstance(t, cr.Tracer) and isinstance(t, jax.core.Tracer) for t in seen)
    first, inner = seen
    outer = inner.value  # the inner Tracer boxes the outer one
    assert isinstance(outer, cr.Tracer)
    assert first.level < outer.level < inner.level  # levels only grow; inner is higher
    assert inner._trace.parent is outer._trace  # JAX's trace stack sees the nesting too


NESTED_CASES = {
    # an inner transform closes over the outer Tracer and calls jax.numpy on it
    "closure_jnp": lambda g1, g2: g1(lambda x: x * g2(lambda y: jnp.sin(x * y))(x))(0.7),
    "hessian_vector": lambda g1, g2: g1(
        lambda x: jnp.sum(g2(lambda z: jnp.sum(jnp.tanh(z) ** 2))(x) * jnp.arange(3.0))
    )(jnp.array([0.1, 0.2, 0.3])),
    "jit_inside": lambda g1, g2: g1(lambda x: jax.jit(g2(lambda y: jnp.exp(x * y)))(x))(0.3),
    "vmap_inside": lambda g1, g2: g1(
        lambda x: jnp.sum(jax.vmap(g2(lambda y: jnp.sin(y) * x))(jnp.arange(3.0) * x))
    )(0.5),
}


@pytest.mark.parametrize("case", list(NESTED_CASES))
@pytest.mark.parametrize(
    "outer,inner",
    [(cr.grad, cr.grad), (cr.grad, jax.grad), (jax.grad, cr.grad)],
    ids=["cr-cr", "cr-jax", "jax-cr"],
)
def test_nesting_with_closures_jit_and_vmap(case, outer, inner):
    expected = NESTED_CASES[case](jax.grad, jax.grad)
    np.testing.assert_allclose(NESTED_CASES[case](outer, inner), expected, rtol=1e-12)


# --- operators on closed-over values inside a function JAX traces ---------------------------


def _sqrt_in_branch_not_taken(x):
    # the operator runs while JAX traces the branch: it belongs to the branch,
    # so at x = 0 (branch not taken) neither it nor its rule (1 / (2 sqrt 0)) runs
    return lax.cond(x > 0.0, lambda: x**0.5, lambda: x * 0.0)


def _operators_in_jit_body(x):
    return jax.jit(lambda: jnp.where(x > 0.0, 1.0, x**3 / 2.0 - x))()


@pytest.mark.parametrize("fun", [_sqrt_in_branch_not_taken, _operators_in_jit_body])
@pytest.mark.parametrize("x", [0.0, 1.3, -0.4])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_operators_on_closed_over_values_belong_to_the_function_jax_traces(fun, x, dtype):
    check_against_jax(fun, jnp.asarray(x, dtype))


def test_make_jaxpr_of_a_closure_over_differentiated_values_stages_its_operators():
    """`jax.make_jaxpr` (equinox's `filter_closure_convert`) of a function of
    differentiated values it closes over records its operations, those values
    its constants, as under `jax.grad`; a `custom_jvp` rule then gets their tangents."""
    seen = []

    def f(x1, x2):
        closed = jax.make_jaxpr(lambda: x1 * 3.0 + x2)()
        seen.append(([e.primitive.name for e in closed.jaxpr.eqns], len(closed.consts)))
        return jax.core.eval_jaxpr(closed.jaxpr, closed.consts)[0]

    want = jax.grad(f, argnums=(0, 1))(2.0, 4.0)
    got = cr.grad(f, argnums=(0, 1))(2.0, 4.0)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert seen[1] == seen[0] == (["mul", "add"], 2)


# --- eager evaluation on the host (NumPy) ----------------------------------------------------


def _small_mlp_loss(params, x, y):
    h = cnp.maximum(x @ params["w1"].T + params["b1"], 0.0)
    z = h @ params["w2"].T + params["b2"]
    return cnp.mean((z - y) ** 2) + 0.1 * cnp.sum(cnp.tanh(params["w1"]))


def _small_mlp_args(dtype):
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.standard_normal((5, 3)),
        "b1": rng.standard_normal(5),
        "w2": rng.standard_normal((2, 5)),
        "b2": rng.standard_normal(2),
    }
    params = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    return (
        params,
        jnp.asarray(rng.standard_normal((7, 3)), dtype),
        jnp.asarray(rng.standard_normal((7, 2)), dtype),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_host_and_jax_evaluation_agree_with_jax_grad(dtype):
    args = _small_mlp_args(dtype)
    on_host = cr.value_and_grad(_small_mlp_loss)(*args)
    previous = host.set_enabled(False)
    try:
        on_jax = cr.value_and_grad(_small_mlp_loss)(*args)
    finally:
        host.set_enabled(previous)
    want = jax.value_and_grad(_small_mlp_loss)(*args)
    rtol, atol = (1e-12, 1e-14) if dtype == jnp.float64 else (1e-5, 1e-6)
    for got in (on_host, on_jax):
        for g, w in zip(
            jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
        ):
            assert isinstance(g, jax.Array) and g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def test_host_results_never_share_memory_with_the_callers_arrays():
    w = np.arange(4.0)
    buf = np.zeros(2)
    out, vjp_fn, aux = cr.vjp(lambda w: (w.reshape(2, 2), buf), w, has_aux=True)
    (w_bar,) = vjp_fn(jnp.ones((2, 2)))
    w[:] = -1.0
    assert all(isinstance(a, jax.Array) for a in (out, w_bar))
    np.testing.assert_array_equal(out, [[0.0, 1.0], [2.0, 3.0]])
    np.testing.assert_array_equal(w_bar, np.ones(4))
    # the function's own NumPy array is handed back untouched, as by jax.vjp
    assert aux is buf and jax.vjp(lambda w: (w, buf), w, has_aux=True)[2] is buf


def test_python_number_inputs_keep_jax_weak_typing():
    f = lambda w: w * 2.0 + jnp.ones(3, jnp.float32)  # noqa: E731
    got = cr.vjp(f, 1.0)[0]
    want = jax.vjp(f, 1.0)[0]
    assert got.dtype == want.dtype == jnp.float32


_WEAK_PARAMS = {"a": 0.5, "b": jnp.float32(1.5), "c": jnp.asarray([1.0, 2.0]), "d": [0.25]}


def _weak_loss(p, y):
    return jnp.sum(p["a"] * p["b"] * p["c"] ** 2 + p["d"][0]) * y


def _weak_map(p, y):
    return p["a"] * p["c"], p["b"] * y, jnp.sin(p["d"][0])


_WEAK_CASES = {  # transform -> result, given the namespace (jax or cr)
    "grad": lambda m: m.grad(_weak_loss, argnums=(0, 1))(_WEAK_PARAMS, 2.0),
    "value_and_grad": lambda m: m.value_and_grad(_weak_loss)(_WEAK_PARAMS, 2.0),
    "vjp": lambda m: (lambda out, fn: fn(jax.tree_util.tree_map(jnp.ones_like, out)))(
        *m.vjp(_weak_map, _WEAK_PARAMS, 2.0)
    ),
    "jvp": lambda m: m.jvp(
        _weak_map, (_WEAK_PARAMS, 2.0), (jax.tree_util.tree_map(jnp.ones_like, _WEAK_PARAMS), 1.0)
    ),
    "jacrev": lambda m: m.jacrev(_weak_map, argnums=(0, 1))(_WEAK_PARAMS, 2.0),
    "jacfwd": lambda m: m.jacfwd(_weak_map, argnums=(0, 1))(_WEAK_PARAMS, 2.0),
    "hessian": lambda m: m.hessian(_weak_loss, argnums=(0, 1))(_WEAK_PARAMS, 2.0),
    "jit(hessian)": lambda m: jax.jit(m.hessian(_weak_loss))(_WEAK_PARAMS, 2.0),
    "vmap(grad)": lambda m: jax.vmap(m.grad(_weak_loss), (None, 0))(_WEAK_PARAMS, jnp.ones(2)),
    "grad(grad)": lambda m: m.grad(m.grad(lambda x: x**3))(0.5),
    "holomorphic": lambda m: m.grad(lambda z: z**2, holomorphic=True)(1.0 + 1.0j),
}


@pytest.mark.parametrize("case", sorted(_WEAK_CASES))
def test_derivatives_of_python_numbers_are_weakly_typed_as_in_jax(case):
    """A derivative takes its primal's weak type, as JAX's do (cotangents their
    input's, tangents their output's): `w - lr * grad` with a Python-number `w`
    then promotes as under JAX (a bfloat16 array minus it stays bfloat16)."""
    want = jax.tree_util.tree_leaves(_WEAK_CASES[case](jax))
    got = jax.tree_util.tree_leaves(_WEAK_CASES[case](cr))
    assert [(g.dtype, g.weak_type) for g in got] == [(w.dtype, w.weak_type) for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
    bf16 = jnp.ones(2, jnp.bfloat16)
    assert (bf16 - cr.grad(lambda s: s * 2.0)(0.5)).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "case",
    ["weak conversion", "strong conversion", "mask product", "mask product in jit"],
)
def test_this_sessions_rule_paths_against_jax_vjp(case):
    """The weakly typed conversion (JAX's weak_type parameter) and the mask
    product (XLA's select) at first and second order, eagerly, under jit and
    under vmap, through the oracle."""
    from jax._src.lax import lax as lax_internal

    from tests.oracle import check_against_jax

    m = jnp.asarray(np.arange(6).reshape(2, 3) % 4 != 0)
    funs = {
        "weak conversion": lambda x: (
            lax_internal._convert_element_type(x, x.dtype, weak_type=True) * jnp.sin(x)
        ),
        "strong conversion": lambda x: (
            lax_internal._convert_element_type(x * 2.0, x.dtype, weak_type=False) * x
        ),
        "mask product": lambda x: m * jnp.sin(x) * x,
        "mask product in jit": lambda x: jax.jit(lambda m, v: m.astype(v.dtype) * v)(
            m, jnp.cos(x) * x
        ),
    }
    check_against_jax(funs[case], jnp.linspace(0.2, 1.4, 6).reshape(2, 3))


_CONSTANT_OUTPUTS = {
    "cond": lambda x: lax.cond(x > 0, lambda x: 1.0, lambda x: x, x),
    "cond, constant first": lambda x: lax.cond(x < 0, lambda x: 1.0, lambda x: 2.0 * x, x),
    "switch": lambda x: lax.switch(0, [lambda x: 1.5, lambda x: x], x),
    "jit": lambda x: jax.jit(lambda x: 1.0)(x),
    "jit, added": lambda x: jax.jit(lambda x: 1.0)(x) + x,
}


@pytest.mark.parametrize("case", sorted(_CONSTANT_OUTPUTS))
@pytest.mark.parametrize("x", [np.float32(0.8), 0.8], ids=["float32", "python float"])
def test_a_constant_output_of_a_call_is_the_array_jax_returns(case, x):
    """A `jit` body, cond branch or checkpoint that returns a literal hands back
    the `jax.Array` JAX's call returns (dtype, weak type; a cond's outputs have
    its first branch's types), not the Python number the literal holds."""
    f = _CONSTANT_OUTPUTS[case]
    with jax.enable_x64(False):  # (JAX's default: a Python float is float32)
        x = jnp.asarray(x) if isinstance(x, np.floating) else x
        for got, want in zip(cr.value_and_grad(f)(x), jax.value_and_grad(f)(x), strict=True):
            assert isinstance(got, jax.Array)
            assert (got.dtype, got.weak_type) == (want.dtype, want.weak_type)
            np.testing.assert_array_equal(got, want)


def test_a_checkpoint_returning_a_constant_is_differentiated():
    """(It raised "the function returned a ArrayTracer": the literal the body
    returns was boxed as it was. JAX hands back the literal itself here.)"""
    value, grad = cr.value_and_grad(lambda x: jax.checkpoint(lambda x: 2.0)(x))(jnp.float32(0.8))
    assert isinstance(value, jax.Array) and float(value) == 2.0 and float(grad) == 0.0


def test_a_tangent_is_strong_where_its_output_is_though_a_weak_carry_made_it():
    s = lambda x: jnp.sum(lax.scan(lambda c, xi: (c * xi, c), 1.0, x)[1])  # noqa: E731
    with jax.enable_x64(False):
        x = jnp.array([0.5, 2.0, 3.0], jnp.float32)
        t = jnp.ones(3, jnp.float32)
        for transform in (lambda m: m.jvp(s, (x,), (t,))[1], lambda m: m.jacfwd(s)(x)):
            got, want = transform(cr), transform(jax)
            assert (got.dtype, got.weak_type) == (want.dtype, want.weak_type)


def test_a_numpy_constant_output_takes_a_cotangent_as_jax_reads_it():
    """An output that is a NumPy float64 constant is float32 to JAX without x64:
    vjp_fn takes a float32 cotangent for it, jvp and the Jacobians work."""
    h = lambda x: (jnp.sin(x), np.zeros(2))  # noqa: E731
    with jax.enable_x64(False):
        x = jnp.ones(3)
        got = cr.vjp(h, x)[1]((x, jnp.zeros(2)))[0]
        np.testing.assert_allclose(got, jax.vjp(h, x)[1]((x, jnp.zeros(2)))[0])
        for name in ("jvp", "jacfwd", "jacrev"):
            call = {
                "jvp": lambda m: m.jvp(h, (x,), (x,))[1],
                "jacfwd": lambda m: m.jacfwd(h)(x),
                "jacrev": lambda m: m.jacrev(h)(x),
            }[name]
            for g, w in zip(call(cr), call(jax), strict=True):
                assert g.dtype == w.dtype, name
                np.testing.assert_allclose(g, w)


def test_numpy_warnings_stay_silent_like_xla():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = cr.grad(lambda x: cnp.sum(cnp.log(x) * 0.0))(jnp.array([0.0, 1.0]))
    np.testing.assert_array_equal(
        g, jax.grad(lambda x: jnp.sum(jnp.log(x) * 0.0))(jnp.array([0.0, 1.0]))
    )


def test_linear_layer_x_at_w_transpose_first_and_second_order():
    """`x @ w.T` is recorded as one dot_general against `w` (no transpose rule in the
    backward pass); w's other uses must still accumulate, at every order."""

    def f(w, x):
        wt = w.T
        return cnp.sum(cnp.tanh(x @ wt)) + cnp.sum(wt * wt) + cnp.sum(x @ wt @ w)

    rng = np.random.default_rng(1)
    w, x = jnp.asarray(rng.standard_normal((3, 4))), jnp.asarray(rng.standard_normal((5, 4)))
    np.testing.assert_allclose(cr.grad(f)(w, x), jax.grad(f)(w, x), rtol=1e-12)
    np.testing.assert_allclose(
        cr.grad(f, argnums=1)(w, x), jax.grad(f, argnums=1)(w, x), rtol=1e-12
    )
    second = lambda g: lambda w: jnp.sum(g(f)(w, x) ** 2)  # noqa: E731
    np.testing.assert_allclose(
        cr.grad(second(cr.grad))(w), jax.grad(second(jax.grad))(w), rtol=1e-10
    )


# Operands a differentiated array meets in user code: Python numbers, NumPy
# scalars, NumPy and JAX arrays (typed and weakly typed) of the same or a
# broadcastable shape.
_OTHERS = {
    "float": lambda dt, shape: 1.5,
    "int": lambda dt, shape: 3,
    "numpy same": lambda dt, shape: np.full(shape, 0.75, dt),
    "numpy row": lambda dt, shape: np.linspace(-1.0, 1.0, shape[-1]).astype(dt),
    "numpy other dtype": lambda dt, shape: np.full(shape, 0.5, np.float32),
    "numpy scalar": lambda dt, shape: dt(0.75),  # np.float32(0.75): strongly typed
    "numpy scalar float32": lambda dt, shape: np.float32(0.5),
    "numpy scalar float64": lambda dt, shape: np.float64(0.5),
    "numpy scalar subnormal": lambda dt, shape: np.float32(1e-40),  # XLA reads it as 0
    "jax same": lambda dt, shape: jnp.full(shape, 0.25, dt),
    "jax row": lambda dt, shape: jnp.linspace(-2.0, 2.0, shape[-1], dtype=dt),
    "jax weak": lambda dt, shape: jnp.asarray(2.0),
    "jax weak int": lambda dt, shape: jnp.asarray(3),
    "jax int scalar": lambda dt, shape: jnp.int32(2),
    "numpy int scalar": lambda dt, shape: np.int32(2),
    "numpy mask": lambda dt, shape: np.arange(np.prod(shape)).reshape(shape) % 3 == 0,
    "jax mask": lambda dt, shape: jnp.arange(np.prod(shape)).reshape(shape) % 3 != 0,
    "jax mask row": lambda dt, shape: jnp.arange(shape[-1]) % 2 == 0,
}
_OPS = {  # (chainrule.numpy spelling, jax.numpy spelling: the oracle)
    "add": (lambda a, b: a + b,) * 2,
    "rsub": (lambda a, b: b - a,) * 2,
    "mul": (lambda a, b: a * b,) * 2,
    "div": (lambda a, b: a / b,) * 2,
    "maximum": (cnp.maximum, jnp.maximum),
    "tanh of mul": (lambda a, b: cnp.tanh(a * b), lambda a, b: jnp.tanh(a * b)),
    "pow": (lambda a, b: (a * b) ** 2,) * 2,
    "power": (lambda a, b: a**b,) * 2,
    "sum method": (lambda a, b: (a * b).sum(axis=1),) * 2,
    "max method": (lambda a, b: (a * b).max(),) * 2,
    "astype method": (lambda a, b: (a * b).astype((a * b).dtype),) * 2,
    "mean": (lambda a, b: cnp.mean(a * b, axis=0), lambda a, b: jnp.mean(a * b, axis=0)),
    "matmul w.T": (lambda a, b: a @ (a * b).T,) * 2,
}


@settings(max_examples=120, deadline=None)
@given(
    op=st.sampled_from(sorted(_OPS)),
    other=st.sampled_from(sorted(_OTHERS)),
    dtype=st.sampled_from([np.float32, np.float64]),
    weak_input=st.booleans(),
)
def test_operator_fast_paths_match_jax_dtype_weak_type_values_and_gradients(
    op, other, dtype, weak_input
):
    """The operators' type-only fast paths (no promotion when the
    types already agree) give what JAX gives: dtype, weak type, value and VJP,
    on the host path and the JAX path alike."""
    shape = (3, 4)
    rng = np.random.default_rng(0)
    if weak_input:  # weakly typed, as arrays made from Python numbers are
        x = lax.full(shape, 1.25)
        assert x.weak_type
    else:
        x = jnp.asarray(rng.uniform(0.5, 1.5, shape), dtype)
    b = _OTHERS[other](dtype, shape)
    cr_op, jnp_op = _OPS[op]
    f = lambda a: cr_op(a, b)  # noqa: E731
    want, want_vjp = jax.vjp(lambda a: jnp_op(a, b), x)
    (want_ct,) = want_vjp(jnp.ones_like(want))
    for enabled in (True, False):
        host.set_enabled(enabled)
        try:
            got, got_vjp = cr.vjp(f, x)
            (got_ct,) = got_vjp(jnp.ones_like(want))
        finally:
            host.set_enabled(True)
        # The output's weak type is JAX's promotion result; a cotangent's weak
        # type is an artefact of JAX's transpose rules (it differs between
        # rules even in JAX), so only its dtype, shape and values are compared.
        assert isinstance(got, jax.Array) and isinstance(got_ct, jax.Array)
        assert (got.dtype, got.shape, got.weak_type) == (want.dtype, want.shape, want.weak_type)
        assert (got_ct.dtype, got_ct.shape) == (want_ct.dtype, want_ct.shape)
        single = jnp.float32 in (x.dtype, want.dtype, getattr(b, "dtype", None))
        tol = 1e-5 if single else 1e-12
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        np.testing.assert_allclose(got_ct, want_ct, rtol=tol, atol=tol)


@pytest.mark.parametrize("weak_input", [True, False])
def test_operators_with_python_complex_numbers_match_jax(weak_input):
    x = lax.full((3,), 1.25) if weak_input else jnp.asarray([0.5, 1.0, 1.5], jnp.float32)
    for op in (
        lambda a: a * 1j,
        lambda a: a + (1 - 2j),
        lambda a: 1j - a,
        lambda a: a / 2j,
        lambda a: a ** (0.5 + 1j),
    ):
        want, want_vjp = jax.vjp(op, x)
        got, got_vjp = cr.vjp(op, x)
        assert (got.dtype, got.weak_type) == (want.dtype, want.weak_type)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        ct = jnp.ones_like(want) * (1 - 1j)
        np.testing.assert_allclose(got_vjp(ct)[0], want_vjp(ct)[0], rtol=1e-5)


@jax.custom_vjp
def _scaled_sin(x):
    return jnp.sin(x) * _SCALE


_SCALE = jnp.asarray([1.0, 2.0, 3.0])
_scaled_sin.defvjp(lambda x: (_scaled_sin(x), x), lambda r, g: (g * jnp.cos(r) * _SCALE,))


@jax.custom_jvp
def _scaled_tanh(x):
    return jnp.tanh(x) * _SCALE


@_scaled_tanh.defjvp
def _scaled_tanh_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _scaled_tanh(x), t * (1.0 - jnp.tanh(x) ** 2) * _SCALE


_M = np.array([[True, False, True], [False, False, True]])


def _log_masked(spelling):
    """A masked log-likelihood, spelled several ways: log(0) = -inf where masked out."""
    m = jnp.asarray(_M)
    spellings = {
        "mask * x": lambda p: m * jnp.log(p),
        "x * mask": lambda p: jnp.log(p) * m,
        "numpy mask": lambda p: jnp.log(p) * _M,
        "jnp.multiply": lambda p: jnp.multiply(jnp.log(p), m),
        "cnp.multiply": lambda p: cnp.multiply(_M, cnp.log(p)),
        "jit helper": lambda p: jax.jit(lambda m, v: m.astype(v.dtype) * v)(m, jnp.log(p)),
        "separate cast": lambda p: m.astype(p.dtype) * jnp.log(p),  # two programs: NaN
        "broadcast mask": lambda p: m[:1] * jnp.log(p),  # XLA keeps the product: NaN
    }
    return lambda p: jnp.sum(spellings[spelling](p))


@pytest.mark.parametrize(
    "spelling",
    [
        "mask * x",
        "x * mask",
        "numpy mask",
        "jnp.multiply",
        "cnp.multiply",
        "jit helper",
        "separate cast",
        "broadcast mask",
    ],
)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, jnp.bfloat16])
def test_a_boolean_mask_times_nan_is_what_xla_makes_of_it(spelling, dtype):
    """XLA compiles `convert(mask) * x` inside one program as `select(mask, x, 0)`,
    so with jax.grad `jnp.sum(mask * jnp.log(p))` is finite where p = 0 is masked
    out. chainrule's eager answers are the same: the value, the gradient's NaN
    positions and signed zeros, and under jit and vmap; where XLA keeps the
    product (a cast in a program of its own, a broadcast mask, bfloat16) NaN."""
    p = jnp.asarray([[0.0, 0.0, 0.5], [2.0, 0.0, 1.5]], dtype)
    loss = _log_masked(spelling)
    want_value, want_grad = jax.value_and_grad(loss)(p)
    for got_value, got_grad in (
        cr.value_and_grad(loss)(p),
        jax.jit(cr.value_and_grad(loss))(p),
    ):
        np.testing.assert_array_equal(got_value, want_value)
        np.testing.assert_array_equal(got_grad, want_grad)
        np.testing.assert_array_equal(np.signbit(got_grad), np.signbit(want_grad))
    batch = jnp.stack([p, p * 2])
    np.testing.assert_array_equal(jax.vmap(cr.grad(loss))(batch), jax.vmap(jax.grad(loss))(batch))


@pytest.mark.parametrize("inner", [_scaled_sin, _scaled_tanh, jax.jit(jnp.sin)])
@pytest.mark.parametrize("on_host", [True, False])
def test_calls_on_untraced_values_match_jax(inner, on_host):
    """jit, custom_jvp and custom_vjp calls meet a differentiated value and an
    undifferentiated one (evaluated inline with NumPy on the host path)."""
    f = lambda w, x: jnp.sum(w * inner(x) + inner(w * x) ** 2)  # noqa: E731
    w, x = np.array([0.5, -1.0, 2.0]), np.array([0.1, 0.2, 0.3])
    previous = host.set_enabled(on_host)
    try:
        got = cr.value_and_grad(f)(w, x)
    finally:
        host.set_enabled(previous)
    want = jax.value_and_grad(f)(w, x)
    for g, e in zip(got, want, strict=True):
        assert isinstance(g, jax.Array) and g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=1e-12)


# --- the matmul operator on chainrule's tracers -------------------------------------------

MATMUL_SHAPES = [
    ((4,), (4,)),
    ((4,), (4, 3)),
    ((3, 4), (4,)),
    ((3, 4), (4, 5)),
    ((2, 3, 4), (4,)),
    ((4,), (2, 4, 3)),
    ((2, 3, 4), (2, 4, 5)),
    ((2, 3, 4), (4, 5)),
]


@pytest.mark.parametrize("x_shape, y_shape", MATMUL_SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_operator_against_jax(x_shape, y_shape, transposed, dtype):
    """`x @ y` and `x @ w.T` on chainrule's tracers (chainrule's own matmul,
    whose vector-matrix products are one dot_general) against JAX's `@`, at
    first and second order, eagerly, under jit and under vmap."""
    from tests.oracle import check_against_jax

    rng = np.random.default_rng(len(x_shape) * 10 + len(y_shape))
    x = rng.standard_normal(x_shape).astype(dtype)
    y = rng.standard_normal(y_shape).astype(dtype)
    if transposed and len(y_shape) >= 2:  # the same product, spelled x @ w.T
        w = np.swapaxes(y, -1, -2).copy()
        check_against_jax(lambda x, w: jnp.sin(x @ jnp.swapaxes(w, -1, -2)), x, w)
        if len(y_shape) == 2:
            check_against_jax(lambda x, w: jnp.sin(x @ w.T), x, w)
    else:
        check_against_jax(lambda x, y: jnp.sin(x @ y), x, y)


@pytest.mark.parametrize(
    "name",
    ["grad", "value_and_grad", "vjp", "jvp", "linearize", "linear_transpose", "jacfwd", "jacrev"]
    + ["hessian"],
)
def test_every_parameter_of_the_jax_transform_is_taken_in_its_place(name):
    """A call that works with `jax.<name>` works with `cr.<name>`: each of JAX's
    parameters is there, of the same kind, positional ones in JAX's order."""
    want = list(inspect.signature(getattr(jax, name)).parameters.values())
    got = inspect.signature(getattr(cr, name)).parameters
    for i, p in enumerate(want):
        assert p.name in got, f"cr.{name} has no parameter {p.name}"
        assert got[p.name].kind == p.kind, p.name
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            assert list(got)[i] == p.name, f"cr.{name}: {p.name} is not parameter {i}"
        assert got[p.name].default == p.default, p.name


def test_reduce_axes_is_taken_empty_and_refused_otherwise_as_in_jax():
    f = lambda x: jnp.sum(x**2)  # noqa: E731
    x = jnp.ones(3)
    np.testing.assert_array_equal(cr.grad(f, reduce_axes=())(x), jax.grad(f, reduce_axes=())(x))
    calls = [
        lambda m: m.grad(f, reduce_axes=("i",))(x),
        lambda m: m.value_and_grad(f, reduce_axes=("i",))(x),
        lambda m: m.vjp(f, x, reduce_axes=("i",)),
        lambda m: m.linear_transpose(lambda v: 2 * v, x, reduce_axes=("i",)),
    ]
    for call in calls:
        with pytest.raises(NotImplementedError, match="deprecated"):
            call(jax)
        with pytest.raises(NotImplementedError, match="deprecated"):
            call(cr)


@pytest.mark.parametrize("transform", ["grad", "hessian", "jvp", "jacfwd", "grad of grad"])
def test_python_numbers_raise_no_dtype_warning_without_x64(transform):
    """Without x64 a Python number is float32 to JAX; chainrule's rules never
    ask for float64 (JAX warns that it is not available: an error under
    `-W error`), whatever the host computed a literal in."""
    fns = [lambda x: x**2.0, lambda x: 2**x, lambda x: jnp.sin(x) ** 3.0 + x / 3.0]
    run = {
        "grad": lambda f: cr.grad(f)(1.5),
        "hessian": lambda f: cr.hessian(f)(1.5),
        "jvp": lambda f: cr.jvp(f, (1.5,), (1.0,))[1],
        "jacfwd": lambda f: cr.jacfwd(f)(1.5),
        "grad of grad": lambda f: cr.grad(cr.grad(f))(1.5),
    }[transform]
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        for f in fns:
            got = run(f)
            assert got.dtype == jnp.float32


@pytest.mark.parametrize(
    "name, f",
    [
        ("jit a*2", lambda x: jax.jit(lambda a: a * 2)(x)),
        ("jit a+1", lambda x: jax.jit(lambda a: a + 1)(x)),
        ("softplus", jax.nn.softplus),
        ("log_sigmoid", jax.nn.log_sigmoid),
        ("hypot", lambda x: jnp.hypot(x, 1)),
        ("jit beside strong", lambda x: jax.jit(lambda a: a * 2)(x) + jnp.float32(1)),
    ],
)
def test_jit_bodies_keep_a_weak_type_as_jax(name, f):
    """A weak literal of a jit body (the `2` of `a * 2`) beside a weak value
    leaves the result weak, as in JAX: the host (strong NumPy) does not take it."""
    for x in (1.5, jnp.float32(1.5)):
        want_p, want_t = jax.jvp(f, (x,), (jnp.ones_like(x),))
        got_p, got_t = cr.jvp(f, (x,), (jnp.ones_like(x),))
        assert (got_p.weak_type, got_t.weak_type) == (want_p.weak_type, want_t.weak_type), name
        assert cr.vjp(f, x)[0].weak_type == jax.vjp(f, x)[0].weak_type
        np.testing.assert_allclose(got_t, want_t, rtol=1e-6)


@pytest.mark.parametrize(
    "method", ["sum", "max", "min", "mean", "astype", "reshape", "ravel", "clip"]
)
def test_array_methods_of_a_weak_tracer_are_typed_as_jaxs(method):
    """jax.Array's reductions and astype make a weak operand's result strong;
    reshapes and clip keep it weak. The Tracer's fast paths do the same."""
    call = {
        "astype": lambda y: y.astype(y.dtype),
        "reshape": lambda y: y.reshape(3, 1),
        "clip": lambda y: y.clip(0.0, 1.0),
    }.get(method, lambda y: getattr(y, method)())
    f = lambda x: call(lax.full((3,), 1.0) * x)  # noqa: E731  (weak: a weak array times x)
    want = jax.vjp(f, 1.5)[0]
    got = cr.vjp(f, 1.5)[0]
    assert (got.dtype, got.weak_type) == (want.dtype, want.weak_type)


@pytest.mark.parametrize("pred", [True, False])
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_cond_branches_differing_in_weak_type_are_typed_as_jaxs(pred, mode):
    """JAX types a cond's outputs by its first branch (index 0, the false
    branch of `lax.cond`), whichever branch runs; so does chainrule, for a
    traced output too (a recorded conversion: its derivative is unchanged)."""

    def f(x):
        strong = jnp.float32(2.0)
        a = lax.cond(pred, lambda a: a * strong, lambda a: a, x)
        b = lax.switch(int(pred), [lambda a: a * strong, lambda a: a + 1.0], x)
        return a, b

    with jax.enable_x64(False):  # (a Python number is float32, as the strong constant)
        _check_cond_weak_types(f, mode)


def _check_cond_weak_types(f, mode):
    for x in (1.5, jnp.float32(1.5)):
        want_p, want_t = jax.jvp(f, (x,), (jnp.ones_like(x),))
        got_p, got_t = (
            jax.jit(lambda x: cr.jvp(f, (x,), (jnp.ones_like(x),)))
            if mode == "jit"
            else lambda x: cr.jvp(f, (x,), (jnp.ones_like(x),))
        )(x)
        for g, w in zip((*got_p, *got_t), (*want_p, *want_t), strict=True):
            assert (g.dtype, g.weak_type) == (w.dtype, w.weak_type)
            np.testing.assert_allclose(g, w)


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize(
    "ct",
    [1.0, np.float64(1), np.float32(1), 1, True, np.array(1.0), np.array(1.0, np.float32)],
    ids=["float", "np.float64", "np.float32", "int", "bool", "ndarray f64", "ndarray f32"],
)
def test_a_cotangent_is_typed_and_refused_as_jax_types_and_refuses_it(x64, ct):
    """A Python float is float64 with x64 (a float32 output refuses it, as in
    JAX) and float32 without; NumPy values as JAX reads them."""
    with jax.enable_x64(x64):
        x = jnp.ones(3, jnp.float32)
        f = lambda x: jnp.sum(x * 2)  # noqa: E731
        try:
            want = jax.vjp(f, x)[1](ct)
        except (TypeError, ValueError):
            with pytest.raises((TypeError, ValueError)):
                cr.vjp(f, x)[1](ct)
            return
        got = cr.vjp(f, x)[1](ct)
        assert got[0].dtype == want[0].dtype
        np.testing.assert_array_equal(got[0], want[0])


def test_typed_prng_keys_are_held_fixed_as_jax_holds_them():
    """A `jax.random.key` is an integer to differentiation: a float0 cotangent
    or tangent (with `allow_int` for grad), a key output a float0 tangent."""
    key = jax.random.key(0)
    f0 = np.zeros((), jax.dtypes.float0)
    cases = [
        lambda m: m.vjp(lambda k: jax.random.normal(k) * 2.0, key)[1](1.0),
        lambda m: m.grad(lambda k, a: jax.random.normal(k) * a, (0, 1), allow_int=True)(key, 2.0),
        lambda m: m.jvp(lambda k, a: jax.random.normal(k) * a, (key, 2.0), (f0, 1.0)),
        lambda m: m.jvp(lambda a: (a * 2, jax.random.key(1)), (2.0,), (1.0,))[1],
        lambda m: m.linearize(lambda a: (a * 2, jax.random.key(1)), 2.0)[1](1.0),
    ]
    for case in cases:
        got, want = case(cr), case(jax)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        leaves = jax.tree_util.tree_leaves
        for g, w in zip(leaves(got), leaves(want), strict=True):
            assert g.dtype == w.dtype and np.shape(g) == np.shape(w)
            if w.dtype != jax.dtypes.float0:
                np.testing.assert_allclose(g, w, rtol=1e-6)
    with pytest.raises(TypeError, match="allow_int"):
        cr.grad(lambda k: jax.random.normal(k))(key)


@pytest.mark.parametrize(
    "shapes",
    [((), (), (3,)), ((), (1,), (3,)), ((3,), (), ()), ((2, 1), (3,), (1,)), ((), (2, 3), ())],
)
@pytest.mark.parametrize("weak_input", [True, False])
def test_cnp_where_broadcasts_all_three_operands_as_jnp(shapes, weak_input):
    cshape, xshape, yshape = shapes
    cond = np.arange(int(np.prod(cshape))).reshape(cshape) % 2 == 0
    y = np.linspace(0.1, 0.3, int(np.prod(yshape))).reshape(yshape).astype(np.float32)

    def f(mod, where):
        def loss(w):
            x = w * jnp.ones(xshape, jnp.float32) if not weak_input else w * lax.full(xshape, 1.0)
            return mod.sum(where(cond, x, y) * 2.0)

        return loss

    w = 0.4 if weak_input else jnp.float32(0.4)
    want = jax.value_and_grad(f(jnp, jnp.where))(w)
    got = cr.value_and_grad(f(cnp, cnp.where))(w)
    for g, e in zip(got, want, strict=True):
        assert (g.dtype, g.shape) == (e.dtype, e.shape)
        np.testing.assert_allclose(g, e, rtol=1e-6)


@pytest.mark.parametrize("name", ["add", "subtract", "multiply", "divide", "maximum", "power"])
@pytest.mark.parametrize("weak_input", [True, False])
def test_cnp_binary_functions_take_python_bools_as_jnp(name, weak_input):
    def f(mod):
        return lambda x: getattr(mod, name)(x, True) * x + getattr(mod, name)(False, x)

    x = 0.4 if weak_input else jnp.float32(0.4)
    want = jax.value_and_grad(f(jnp))(x)
    got = cr.value_and_grad(f(cnp))(x)
    for g, e in zip(got, want, strict=True):
        assert (g.dtype, g.weak_type) == (e.dtype, e.weak_type)
        np.testing.assert_allclose(g, e, rtol=1e-6)


def test_evicting_from_a_cache_another_thread_changes_never_raises():
    """The bounded caches (`core._CHECKED`, the custom_jvp rule caches) drop
    their oldest entry; another thread may insert or evict meanwhile."""
    import threading

    from chainrule.engine import core

    table: dict = {}
    errors: list = []

    def churn(offset: int) -> None:
        try:
            for i in range(20000):
                table[(offset, i)] = None
                if len(table) > 64:
                    core.evict_oldest(table)
        except Exception as e:  # pragma: no cover (the failure being tested)
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    core.evict_oldest({})  # an empty table: nothing to do
    assert not errors


def test_type_checks_keep_no_jit_body_alive():
    """`core.check_types` remembers the operand types it checked; never a key
    holding a jit body (with the arrays it closes over): those are freed."""
    refs = []

    def step(x, i):
        big = jnp.full((100_000,), float(i))
        refs.append(weakref.ref(big))
        helper = jax.jit(lambda y: y * big[:3])
        return cr.grad(lambda y: helper(y).sum())(x)

    for i in range(5):
        step(jnp.ones(3), i)
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def test_a_prng_key_carried_through_a_differentiated_scan():
    """A typed PRNG key in a scan's carry: its cotangent is float0 zeros, as JAX's."""

    def f(x):
        def body(i, c):
            acc, key = c
            return acc + x * jax.random.normal(key, (2,)), jax.random.split(key)[0]

        return jax.lax.fori_loop(0, 3, body, (x, jax.random.key(1)))[0].sum()

    x = jnp.array([1.0, 2.0])
    for grad in (cr.grad(f), jax.jit(cr.grad(f))):
        np.testing.assert_allclose(grad(x), jax.grad(f)(x), rtol=1e-12)


def test_integer_inputs_reach_the_function_as_jax_hands_them():
    """An integer leaf that is not differentiated (`allow_int`, or a `vjp`
    primal) reaches `fun` as JAX hands it: a NumPy array stays NumPy, so
    `n / 3` is computed in float64 as under jax.grad, and a Python number
    does not meet jax.numpy's strict promotion."""
    n = np.array([1, 2], np.int32)
    w = jnp.float32(1.0)
    f = lambda w, n: w * jnp.sum(n / 3)
    with jax.numpy_dtype_promotion("standard"):
        for got, want in [
            (cr.vjp(f, w, n)[0], jax.vjp(f, w, n)[0]),
            (
                cr.value_and_grad(f, (0, 1), allow_int=True)(w, n)[0],
                jax.value_and_grad(f, (0, 1), allow_int=True)(w, n)[0],
            ),
        ]:
            assert got.dtype == want.dtype and np.allclose(got, want, rtol=1e-15)
    g = lambda x: jnp.sum(x + 0.0)
    with jax.numpy_dtype_promotion("strict"):
        got = cr.grad(g, allow_int=True)(np.ones((2, 4), int))
        want = jax.grad(g, allow_int=True)(np.ones((2, 4), int))
    assert got.dtype == want.dtype == jax.dtypes.float0 and got.shape == want.shape
