"""Common jax.numpy / lax idioms beyond single primitives, against jax.grad.

Each function is differentiated eagerly through both front ends (jax.numpy ->
jaxpr replay; operators/methods -> dynamic), under jax.jit, under jax.vmap,
and to second order, and must match JAX's own derivatives in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jex_core

import chainrule as cr
from chainrule import errors

X = jnp.linspace(0.1, 1.0, 12).reshape(3, 4)

FUNCTIONS = {
    "stack": lambda x: jnp.stack([x, x * 2], axis=1),
    "tile": lambda x: jnp.tile(x, (2, 3)),
    "tile_1d": lambda x: jnp.tile(x[0], 3),
    "diag": lambda x: jnp.diag(x[:, :3]),  # platform_index + cond inside
    "cond_traced": lambda x: lax.cond(
        jnp.sum(x) > 3.0, lambda v: jnp.sin(v) * v, lambda v: v**2, x
    ),
    "switch": lambda x: lax.switch(
        (jnp.sum(x) > 3.0).astype(int) + 1, [lambda v: v, lambda v: -v, jnp.exp], x
    ),
    "at_set": lambda x: x.at[0, 1].set(5.0 * x[2, 2]) * x,
    "at_set_duplicates": lambda x: x.at[jnp.array([0, 2, 0])].set(
        x[1:2] * jnp.array([[1.0], [2.0], [3.0]])
    ),
    "at_set_dropped": lambda x: x.at[jnp.array([1, 7])].set(x[:2] * 2, mode="drop"),
    "at_add": lambda x: x.at[jnp.array([0, 0])].add(x[1]),
    "floordiv_mod": lambda x: (x // 0.3) * x + x % 0.3 + 2.0 % x,
    "var_std": lambda x: x.var(axis=0) + x.std(),
    "cumsum_method": lambda x: x.cumsum(axis=1),
    "swapaxes": lambda x: x.swapaxes(0, 1),
    "logsumexp": lambda x: jax.nn.logsumexp(x, axis=1),
    "softmax_ce": lambda x: (
        -jnp.sum(jax.nn.one_hot(jnp.array([0, 1, 2]), 4) * jax.nn.log_softmax(x))
    ),
    "norm": lambda x: jnp.linalg.norm(x, axis=1),
    "einsum": lambda x: jnp.einsum("ij,kj->ik", x, x),
    "pad_roll_flip": lambda x: jnp.flip(jnp.roll(jnp.pad(x, 1), 1, axis=1)),
    "where_clip": lambda x: jnp.where(x > 0.5, jnp.clip(x, 0.3, 0.8), 0.0),
    "take_along_argmax": lambda x: x[jnp.arange(3), jnp.argmax(x, axis=1)],
    "dynamic_update": lambda x: lax.dynamic_update_slice(x, x[:1, :2] * 3, (1, 1)),
    "gelu_silu_elu": lambda x: jax.nn.gelu(x) + jax.nn.silu(x) + jax.nn.elu(x - 0.5),
    "dropout": lambda x: jnp.where(  # PRNG keys (an extended dtype) inside the loss
        jax.random.bernoulli(jax.random.key(0), 0.5, x.shape), x / 0.5, 0.0
    ),
}


def _scalar(f, use_methods=False):
    def loss(x):
        y = f(x)
        weights = jnp.cos(jnp.arange(y.size).reshape(y.shape))
        return (y * weights).sum() if use_methods else jnp.sum(y * weights)

    return loss


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_matches_jax_eager_jit_vmap_and_second_order(name):
    loss = _scalar(FUNCTIONS[name])
    expected = jax.grad(loss)(X)
    for got in (
        cr.grad(loss)(X),
        cr.grad(_scalar(FUNCTIONS[name], use_methods=True))(X),
        jax.jit(cr.grad(loss))(X),
        jax.vmap(cr.grad(loss))(X[None])[0],
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    # second order eagerly, under jit and under vmap (a cond's second order
    # once failed under jit alone)
    second = lambda g: lambda x: g(lambda y: jnp.sum(g(loss)(y) ** 2))(x)  # noqa: E731
    want2 = second(jax.grad)(X)
    for got2 in (
        second(cr.grad)(X),
        jax.jit(second(cr.grad))(X),
        jax.vmap(second(cr.grad))(X[None])[0],
    ):
        np.testing.assert_allclose(got2, want2, rtol=1e-10, atol=1e-12)


# A primitive no table will ever hold (reduce_prod, sort and scan, once the
# examples here, have rules now).
_unknown_p = jex_core.Primitive("made_up_for_this_test")
_unknown_p.def_abstract_eval(lambda x: x)


def test_unsupported_primitives_raise_a_clear_error_naming_the_users_line():
    with pytest.raises(errors.NoVJPRuleError, match=r"'made_up_for_this_test'.*test_jnp_coverage"):
        cr.grad(lambda x: jnp.sum(_unknown_p.bind(x) * X))(X)


def test_unknown_tracer_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        cr.grad(lambda x: x.nonexistent())(1.0)
