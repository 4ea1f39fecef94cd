"""Rules for primitives that ordinary JAX code emits outside the big families:
`checkpoint_name`, `jnp.unstack`, `custom_vmap` functions, `lax.ragged_dot`."""

from __future__ import annotations

import jax
import jax.custom_batching
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src import ad_checkpoint

import chainrule as cr
from tests.oracle import check_against_jax, emitted

X = jax.random.normal(jax.random.PRNGKey(0), (3, 4))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_checkpoint_name_is_an_identity(dtype):
    def f(x):
        return jnp.sin(ad_checkpoint.checkpoint_name(x * 2.0, "hidden")) * x

    assert "name" in emitted(f, X)
    check_against_jax(f, X.astype(dtype))
    # the name stays on the value for a remat policy outside
    policy = jax.checkpoint_policies.save_only_these_names("hidden")
    g = jax.checkpoint(lambda x: jnp.sum(f(x)), policy=policy)
    np.testing.assert_allclose(cr.grad(g)(X), jax.grad(g)(X), rtol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_unstack(axis):
    def f(x):
        parts = jnp.unstack(jnp.sin(x), axis=axis)
        return parts[0] * parts[-1] + parts[1]  # one part unused: a zero cotangent

    assert "unstack" in emitted(f, X)
    check_against_jax(f, X)
    check_against_jax(f, X.astype(jnp.float32))


def test_a_custom_vmap_function_is_differentiated_through_its_body():
    @jax.custom_batching.custom_vmap
    def f(x):
        return jnp.sin(x) * x

    @f.def_vmap
    def _rule(axis_size, in_batched, xs):
        return jnp.sin(xs) * xs, in_batched[0]

    assert "custom_vmap_call" in emitted(f, X)
    # jax.grad cannot linearize custom_vmap; forward mode is JAX's oracle here
    want = jnp.diag(jax.jacfwd(lambda v: f(v.reshape(X.shape)).ravel())(X.ravel()))
    for run in (cr.grad(lambda x: jnp.sum(f(x))), jax.jit(cr.grad(lambda x: jnp.sum(f(x))))):
        np.testing.assert_allclose(run(X).ravel(), want, rtol=1e-12)


GROUPS = jnp.array([2, 0, 5], jnp.int32)


def _ragged(lhs, rhs):
    return lax.ragged_dot(lhs, rhs, GROUPS)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_ragged_dot_first_order(dtype):
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    lhs = jax.random.normal(k[0], (7, 3), dtype)
    rhs = jax.random.normal(k[1], (3, 3, 4), dtype)
    assert "ragged_dot_general" in emitted(_ragged, lhs, rhs)
    # JAX cannot batch the rhs cotangent's ragged dot (vmap over dim 0 only) nor
    # transpose it (second order): neither can chainrule, which raises as JAX does
    check_against_jax(_ragged, lhs, rhs, second_order=False, modes=("eager", "jit"))


def test_ragged_dot_second_order_where_jax_has_it():
    k = jax.random.split(jax.random.PRNGKey(2), 2)
    lhs, rhs = jax.random.normal(k[0], (7, 3)), jax.random.normal(k[1], (3, 3, 4))

    def by_rhs_of_lhs_grad(grad):  # the lhs cotangent is a non-contracting ragged dot again
        inner = lambda r: jnp.sum(grad(lambda l: jnp.sum(jnp.sin(_ragged(l, r))))(lhs) ** 2)  # noqa: E731
        return grad(inner)(rhs)

    np.testing.assert_allclose(
        by_rhs_of_lhs_grad(cr.grad), by_rhs_of_lhs_grad(jax.grad), rtol=1e-12, atol=1e-12
    )

    def by_lhs_of_rhs_grad(grad):  # the rhs cotangent is a contracting-mode ragged dot
        inner = lambda l: jnp.sum(grad(lambda r: jnp.sum(jnp.sin(_ragged(l, r))))(rhs) ** 2)  # noqa: E731
        return grad(inner)(lhs)

    with pytest.raises(NotImplementedError):
        by_lhs_of_rhs_grad(jax.grad)
    with pytest.raises(NotImplementedError, match="non-contracting"):
        by_lhs_of_rhs_grad(cr.grad)


def _scale(r, x):
    return x / r


def _scale_transpose(r, ct):
    return ct / r


def test_linear_call_uses_the_users_transpose():
    from jax.custom_derivatives import linear_call

    def f(x, r):
        return jnp.sin(linear_call(_scale, _scale_transpose, r, x) * x)

    x, r = jnp.arange(1.0, 4.0), jnp.array(2.0)
    assert "linear_call" in emitted(f, x, r)
    # (JAX has no batching rule for linear_call: no vmap here or there)
    check_against_jax(f, x, r, argnums=(0,), modes=("eager", "jit"))

    def wrong(ct_r, ct):  # a "transpose" that is not one: chainrule uses it, as JAX does
        return 3.0 * ct

    g = lambda x: jnp.sum(linear_call(_scale, wrong, r, x))  # noqa: E731
    np.testing.assert_allclose(cr.grad(g)(x), jax.grad(g)(x), rtol=1e-12)
    with pytest.raises(ValueError, match="not differentiable"):
        cr.grad(lambda r: jnp.sum(linear_call(_scale, _scale_transpose, r, x)))(r)


def test_composite_is_refused_as_jax_refuses_it():
    def f(x):
        return jnp.sum(lax.composite(lambda v: jnp.sin(v), name="my.sin")(x))

    x = jnp.arange(3.0)
    assert "composite" in emitted(f, x)
    with pytest.raises(ValueError, match="JVP rule for composite not implemented"):
        jax.grad(f)(x)
    with pytest.raises(ValueError, match="not differentiable, in JAX either"):
        cr.grad(f)(x)
    # where it needs no gradient it is evaluated
    g = cr.grad(lambda y: jnp.sum(lax.composite(lambda v: jnp.sin(v), name="s")(x) * y))(x)
    np.testing.assert_allclose(g, jnp.sin(x), rtol=1e-12)


def test_reshard_layout_constraint_and_inspect_sharding_pass_gradients_through():
    from jax.experimental.layout import Layout, with_layout_constraint
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    x = jnp.arange(6.0).reshape(2, 3) / 5
    mesh = jax.make_mesh((1,), ("d",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("d")))

        def resharded(x):
            return jnp.sum(jnp.sin(jax.sharding.reshard(x, P())) * x)

        assert "reshard" in emitted(resharded, xs)
        for run in (cr.grad(resharded), jax.jit(cr.grad(resharded))):
            np.testing.assert_allclose(run(xs), jax.grad(resharded)(xs), rtol=1e-12)

    def laid_out(x):
        return jnp.sum(jnp.sin(with_layout_constraint(x * 2.0, Layout(major_to_minor=(0, 1)))))

    assert "layout_constraint" in emitted(jax.jit(laid_out), x)
    np.testing.assert_allclose(
        jax.jit(cr.grad(laid_out))(x), jax.jit(jax.grad(laid_out))(x), rtol=1e-12
    )

    seen = []

    def inspected(x):
        jax.debug.inspect_array_sharding(x, callback=seen.append)
        return jnp.sum(jnp.sin(x))

    assert "inspect_sharding" in emitted(inspected, x)
    np.testing.assert_allclose(jax.jit(cr.grad(inspected))(x), jnp.cos(x), rtol=1e-12)
    assert seen  # the sharding was shown
