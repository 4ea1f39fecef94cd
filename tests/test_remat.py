"""`jax.checkpoint` (`remat2`) recomputes its body in the backward pass
(`chainrule.engine.rules.remat`), against `jax.grad` / `jax.vjp`.

* Values, first and second order (the oracle), for every `policy` kind
  (none, `dots_saveable`, `everything_saveable`, `save_only_these_names` with
  `checkpoint_name`, a policy returning `Recompute`/`Saveable`) and both
  `prevent_cse` settings, nested checkpoints included.
* Memory: eagerly the tape holds one node per checkpointed block instead of
  every intermediate; under `jit` the gradient program is built as
  `jax.grad`'s is (the same number of `optimization_barrier`s and of
  recomputed `dot_general`s in the lowered program) and its compiled temp
  memory is no larger than `jax.grad`'s. (On the CPU backend XLA removes
  optimization barriers before scheduling, so temp memory does not drop for
  `jax.grad` either there; on GPU/TPU it does.)
* `jax.debug.print` inside a checkpoint prints in the forward pass and again
  in the recomputation, as under `jax.grad`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import chainrule as cr
from chainrule.engine import core
from tests.oracle import check_against_jax, emitted

policies = jax.checkpoint_policies


def block(x, w):
    h = jnp.tanh(x @ w)
    h = checkpoint_name(jnp.sin(h) * h, "mid")
    return jnp.tanh(h @ w.T) + x


def chain(depth, **checkpoint_kwargs):
    step = jax.checkpoint(block, **checkpoint_kwargs)

    def loss(x, ws):
        for i in range(depth):
            x = step(x, ws[i])
        return jnp.sum(x**2)

    return loss


def _inputs(dtype, depth=3, n=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, n)), dtype)
    ws = jnp.asarray(rng.normal(size=(depth, n, n)) / n, dtype)
    return x, ws


def _recompute_everything_but_sin(prim, *avals, **params):
    from jax._src.interpreters import partial_eval as pe

    return pe.Saveable if prim.name == "sin" else pe.Recompute


POLICIES = {
    "default": None,
    "nothing_saveable": policies.nothing_saveable,
    "dots_saveable": policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": policies.everything_saveable,
    "save_only_these_names": policies.save_only_these_names("mid"),
    "Saveable/Recompute": _recompute_everything_but_sin,
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_checkpointed_chain_matches_jax(policy):
    loss = chain(3, policy=POLICIES[policy])
    x, ws = _inputs(jnp.float64)
    assert {"remat2", "name"} <= emitted(loss, x, ws)
    modes = ("eager", "jit", "vmap") if policy == "default" else ("jit",)
    check_against_jax(loss, x, ws, modes=modes)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_hessian_through_what_a_policy_keeps(policy):
    """A second derivative reads the values a policy kept (a rule's `ans`,
    exp's or tanh's): their cotangent reaches the checkpoint's kept outputs,
    and flows to its operands through the recomputation. It was dropped, and
    `cr.hessian` (reverse mode under `vmap`, then forward mode) gave 0 for
    `exp` under `everything_saveable`, where JAX gives exp(x)."""
    loss = chain(2, policy=POLICIES[policy])
    x, ws = _inputs(jnp.float64)
    want = jax.hessian(loss)(x, ws)
    np.testing.assert_allclose(cr.hessian(loss)(x, ws), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        jax.jit(cr.jacrev(cr.jacrev(loss)))(x, ws), want, rtol=1e-10, atol=1e-10
    )
    exp = jax.checkpoint(lambda v: jnp.exp(v) * 2.0, policy=POLICIES[policy])
    np.testing.assert_allclose(cr.hessian(exp)(0.3), jax.hessian(exp)(0.3), rtol=1e-6)


def test_checkpoint_without_cse_prevention_and_float32():
    x, ws = _inputs(jnp.float64)
    check_against_jax(chain(2, prevent_cse=False), x, ws, modes=("eager", "jit"))
    x, ws = _inputs(jnp.float32)
    check_against_jax(chain(2, policy=policies.dots_saveable), x, ws, modes=("jit",))


def test_nested_checkpoints_and_a_jitted_body():
    inner = jax.checkpoint(lambda x, w: jnp.sin(jax.jit(lambda a: a @ w)(x)))

    @jax.checkpoint
    def outer(x, w):
        return inner(inner(x, w), w.T) * x

    def loss(x, ws):
        return jnp.sum(outer(x, ws[0]) ** 2) + jnp.sum(jax.checkpoint(outer)(x, ws[1]))

    x, ws = _inputs(jnp.float64, depth=2)
    check_against_jax(loss, x, ws, modes=("jit",))


def test_integer_operands_and_a_closed_over_constant():
    table = jnp.arange(5.0)

    @jax.checkpoint
    def f(x, i):
        return jnp.sin(x * table[i]) + table

    def loss(x, i):
        return jnp.sum(f(x, i) ** 2)

    check_against_jax(loss, jnp.linspace(0.1, 1.0, 5), jnp.int32(3), modes=("eager", "jit"))


# --- memory ---------------------------------------------------------------------------------


def _tape_bytes(fun, *args):
    """The bytes of the values the forward pass of `cr.vjp(fun, *args)` records."""
    sizes = []

    def recorder(node, where):
        if node.prim is not None and node.prim.name != "projection":
            values = node.ans if isinstance(node.ans, (list, tuple)) else [node.ans]
            sizes.append(sum(np.asarray(core.raw(v)).nbytes for v in values))

    with core.recording(recorder):
        cr.vjp(fun, *args)
    return len(sizes), sum(sizes)


def test_eager_tape_keeps_one_node_per_checkpointed_block():
    depth, n = 6, 16
    x, ws = _inputs(jnp.float64, depth=depth, n=n)
    ws = list(ws)  # (no slicing nodes)
    nodes_plain, bytes_plain = _tape_bytes(_plain(depth), x, ws)
    nodes_ckpt, bytes_ckpt = _tape_bytes(chain(depth), x, ws)
    block_out = n * n * 8
    assert nodes_ckpt <= depth + 3  # a node per block, then the loss
    assert nodes_plain >= 6 * depth
    assert bytes_ckpt <= (depth + 1) * block_out + 64 < bytes_plain / 3  # blocks, x**2, sum


def _plain(depth):
    def loss(x, ws):
        for i in range(depth):
            x = block(x, ws[i])
        return jnp.sum(x**2)

    return loss


def _count(text, op):
    return text.count(op)


@pytest.mark.parametrize("prevent_cse", [True, False])
def test_jit_gradient_program_recomputes_as_jax_grad_does(prevent_cse):
    depth = 4
    x, ws = _inputs(jnp.float64, depth=depth, n=32)
    loss = chain(depth, prevent_cse=prevent_cse)
    got = jax.jit(cr.grad(loss, argnums=(0, 1))).lower(x, ws)
    want = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws)
    got_text, want_text = got.as_text(), want.as_text()
    barriers = _count(want_text, "optimization_barrier")
    assert barriers == (depth if prevent_cse else 0)
    assert _count(got_text, "optimization_barrier") == barriers
    # the forward dots, the recomputed ones and the backward ones: 2 + 2 + 4 per block
    assert _count(want_text, "dot_general") == 8 * depth
    assert _count(got_text, "dot_general") == 8 * depth
    plain = jax.jit(cr.grad(_plain(depth), argnums=(0, 1))).lower(x, ws).as_text()
    assert _count(plain, "dot_general") == 6 * depth and "optimization_barrier" not in plain

    got_temp = got.compile().memory_analysis().temp_size_in_bytes
    want_temp = want.compile().memory_analysis().temp_size_in_bytes
    assert got_temp <= want_temp
    got_grads = jax.jit(cr.grad(loss, (0, 1)))(x, ws)
    for g, w in zip(got_grads, jax.grad(loss, (0, 1))(x, ws), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_policy_saved_dots_are_not_recomputed():
    depth = 3
    x, ws = _inputs(jnp.float64, depth=depth, n=8)
    loss = chain(depth, policy=policies.dots_saveable)
    got = jax.jit(cr.grad(loss, argnums=(0, 1))).lower(x, ws).as_text()
    want = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws).as_text()
    assert _count(got, "dot_general") == _count(want, "dot_general") == 6 * depth


# --- effects ---------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_debug_print_in_a_checkpoint_prints_as_in_jax(capfd, jit):
    @jax.checkpoint
    def f(x):
        y = jnp.sin(x)
        jax.debug.print("y = {}", y)
        return y * x

    def loss(x):
        return jnp.sum(f(x) ** 2)

    x = jnp.linspace(0.5, 1.5, 3)
    wrap = jax.jit if jit else (lambda f: f)
    want = wrap(jax.grad(loss))(x)
    jax.effects_barrier()
    want_out = capfd.readouterr().out
    got = wrap(cr.grad(loss))(x)
    jax.effects_barrier()
    got_out = capfd.readouterr().out
    assert want_out.count("y = ") == 2  # the forward pass, then the recomputation
    assert got_out == want_out
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_optimization_barrier_is_an_identity_for_cotangents():
    def f(x, y):
        a, b = lax.optimization_barrier((jnp.sin(x), y * 2.0))
        return a * b

    check_against_jax(f, jnp.linspace(0.1, 1.0, 3), jnp.linspace(1.0, 2.0, 3))


def test_a_bad_policy_answer_is_a_clear_error():
    loss = chain(1, policy=lambda *a, **k: "yes")
    x, ws = _inputs(jnp.float64, depth=1)
    with pytest.raises(TypeError, match="policy must return a bool"):
        cr.grad(loss)(x, ws)
