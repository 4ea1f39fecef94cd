"""Random compositions of primitives: chainrule's gradients must match ``jax.grad``.

A hypothesis strategy builds random expression trees (depth up to 5) over three inputs, a scalar
``s``, a vector ``v`` of shape ``(n,)`` and a matrix ``m`` of shape ``(rows, n)``. Every node has
a *kind* (``s``, ``v``, ``u`` = a ``(rows,)`` vector, or ``m``) that fixes its shape, so trees
mix elementwise unary ops, broadcasting binary ops, reductions and matrix products and are
always well typed. Every op is finite on all of R (log and division only see arguments bounded
away from zero, exp only sees a tanh-bounded argument), so the gradient is finite everywhere.

The tree is evaluated over a namespace parameter: ``jax.numpy`` (primitives reach chainrule's
trace through JAX's dispatch) and ``chainrule.numpy`` (chainrule's own fast paths), so one
generator serves both. Inputs
are drawn from a continuous distribution (seeded by hypothesis), so kinks of abs/maximum are hit
with probability zero; ties are the business of the dedicated tests in ``test_primitives.py``.

Set ``CHAINRULE_FUZZ_EXAMPLES=N`` to run ``N`` examples per property instead of the CI default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings

import chainrule as cr
import chainrule.numpy as cnp

jax.config.update("jax_enable_x64", True)

# DESIGN.md's float64 tolerance is 1e-12 for the same function. Here chainrule runs
# eagerly, on NumPy (`engine/host.py`), whose matrix products may round a last bit
# differently from XLA's; a depth-5 tree amplifies that by its condition number
# (`sum(cos((m @ v)**4))` with |m @ v| ~ 5: one ulp of m @ v is 1e-12 of the
# gradient, while `jax.jit(cr.grad(f))` and CHAINRULE_HOST_EAGER=0 match to the bit).
# So these eager comparisons allow 1e-11.
RTOL = 1e-11
ATOL = 1e-12
ARGNUMS = (0, 1, 2)

_FUZZ_EXAMPLES = os.environ.get("CHAINRULE_FUZZ_EXAMPLES")


def fuzz_settings(default: int) -> settings:
    """Hypothesis settings: ``default`` examples unless CHAINRULE_FUZZ_EXAMPLES overrides."""
    return settings(
        max_examples=int(_FUZZ_EXAMPLES) if _FUZZ_EXAMPLES else default,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------------------------
# Operations. Each takes the namespace ``ns`` (jnp or cnp) first.
# --------------------------------------------------------------------------------------------


def _softplus(ns, x):
    """Stable softplus built from basic ops: log1p(exp(-|x|)) + max(x, 0)."""
    return ns.log1p(ns.exp(-ns.abs(x))) + ns.maximum(x, 0.0)


UNARY_OPS = {
    "sin": lambda ns, x: ns.sin(x),
    "cos": lambda ns, x: ns.cos(x),
    "tanh": lambda ns, x: ns.tanh(x),
    "neg": lambda ns, x: -x,
    "square": lambda ns, x: x**2,
    "exp_tanh": lambda ns, x: ns.exp(ns.tanh(x)),
    "log_softplus": lambda ns, x: ns.log(0.5 + _softplus(ns, x)),
    "log1p_square": lambda ns, x: ns.log1p(x**2),
    "soft_abs": lambda ns, x: ns.sqrt(x**2 + 1.0),
    "sigmoid": lambda ns, x: 0.5 * (ns.tanh(0.5 * x) + 1.0),
    "abs": lambda ns, x: ns.abs(x),
    "scale": lambda ns, x: 0.5 * x,
}

BINARY_OPS = {
    "add": lambda ns, a, b: a + b,
    "sub": lambda ns, a, b: a - b,
    "mul": lambda ns, a, b: a * b,
    "div": lambda ns, a, b: a / (1.0 + b**2),
    "maximum": lambda ns, a, b: ns.maximum(a, b),
}

REDUCE_OPS = {
    "sum": lambda ns, x: ns.sum(x),
    "mean": lambda ns, x: ns.mean(x),
    "sum_axis0": lambda ns, x: ns.sum(x, axis=0),
    "mean_axis0": lambda ns, x: ns.mean(x, axis=0),
    "sum_axis1": lambda ns, x: ns.sum(x, axis=1),
    "mean_axis1": lambda ns, x: ns.mean(x, axis=1),
}

# Operand kinds of an elementwise binary op producing each kind (with broadcasting).
BINARY_OPERANDS = {
    "s": (("s", "s"),),
    "v": (("v", "v"), ("s", "v"), ("v", "s")),
    "u": (("u", "u"), ("s", "u"), ("u", "s")),
    "m": (("m", "m"), ("s", "m"), ("m", "s"), ("v", "m"), ("m", "v")),
}
# (reduction, operand kind) pairs producing each kind.
REDUCTIONS = {
    "s": (("sum", "v"), ("mean", "v"), ("sum", "u"), ("sum", "m"), ("mean", "m")),
    "v": (("sum_axis0", "m"), ("mean_axis0", "m")),
    "u": (("sum_axis1", "m"), ("mean_axis1", "m")),
    "m": (),
}
# Operand kinds of a matrix product producing each kind.
MATMULS = {
    "s": (("v", "v"), ("u", "u")),
    "v": (("u", "m"),),
    "u": (("m", "v"),),
    "m": (),
}


# --------------------------------------------------------------------------------------------
# Expression trees
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    """A node of a random expression tree.

    Attributes:
        op: ``"input"``, ``"const"``, ``"matmul"`` or a key of UNARY_OPS, BINARY_OPS, REDUCE_OPS.
        args: Child nodes.
        value: The input name (``"s"``, ``"v"``, ``"m"``) or the constant, for leaves.
    """

    op: str
    args: tuple[Expr, ...] = ()
    value: str | float | None = None

    def __repr__(self) -> str:
        if self.op == "input":
            return str(self.value)
        if self.op == "const":
            return repr(self.value)
        if self.op == "matmul":
            return f"({self.args[0]!r} @ {self.args[1]!r})"
        return f"{self.op}({', '.join(repr(a) for a in self.args)})"

    def evaluate(self, ns, env: dict):
        """Evaluates the tree with namespace ``ns`` (jnp or cnp) and inputs ``env``."""
        if self.op == "input":
            return env[self.value]
        if self.op == "const":
            return self.value
        vals = [arg.evaluate(ns, env) for arg in self.args]
        if self.op == "matmul":
            return vals[0] @ vals[1]
        if self.op in UNARY_OPS:
            return UNARY_OPS[self.op](ns, *vals)
        if self.op in BINARY_OPS:
            return BINARY_OPS[self.op](ns, *vals)
        return REDUCE_OPS[self.op](ns, *vals)


S, V, M = Expr("input", value="s"), Expr("input", value="v"), Expr("input", value="m")
CONSTANTS = st.floats(-2.0, 2.0, allow_nan=False, allow_subnormal=False).map(
    lambda c: Expr("const", value=c)
)


def leaves(kind: str) -> st.SearchStrategy[Expr]:
    """Depth-0 expressions of a kind."""
    if kind == "s":
        return st.one_of(st.just(S), CONSTANTS)
    if kind == "v":
        return st.just(V)
    if kind == "m":
        return st.just(M)
    return st.sampled_from([Expr("sum_axis1", (M,)), Expr("matmul", (M, V))])


@st.composite
def expressions(draw, kind: str, depth: int) -> Expr:
    """Random well-typed expression of ``kind`` with at most ``depth`` levels of ops."""
    if depth == 0 or draw(st.integers(0, 4)) == 0:
        return draw(leaves(kind))
    categories = ["unary", "binary"]
    if REDUCTIONS[kind]:
        categories.append("reduce")
    if MATMULS[kind]:
        categories.append("matmul")
    category = draw(st.sampled_from(categories))
    if category == "unary":
        op = draw(st.sampled_from(sorted(UNARY_OPS)))
        return Expr(op, (draw(expressions(kind, depth - 1)),))
    if category == "binary":
        op = draw(st.sampled_from(sorted(BINARY_OPS)))
        left, right = draw(st.sampled_from(BINARY_OPERANDS[kind]))
        return Expr(op, (draw(expressions(left, depth - 1)), draw(expressions(right, depth - 1))))
    if category == "reduce":
        op, operand = draw(st.sampled_from(REDUCTIONS[kind]))
        return Expr(op, (draw(expressions(operand, depth - 1)),))
    left, right = draw(st.sampled_from(MATMULS[kind]))
    return Expr("matmul", (draw(expressions(left, depth - 1)), draw(expressions(right, depth - 1))))


@dataclass(frozen=True)
class Composition:
    """A random scalar function f(s, v, m) = final(tree(s, v, m))."""

    tree: Expr
    final: str  # "sum" or "mean"

    def __repr__(self) -> str:
        return f"{self.final}({self.tree!r})"

    def function(self, ns):
        """The composition as a Python function over namespace ``ns``."""
        reduce = ns.sum if self.final == "sum" else ns.mean

        def f(s, v, m):
            return reduce(self.tree.evaluate(ns, {"s": s, "v": v, "m": m}))

        return f


compositions = st.builds(
    Composition,
    tree=st.sampled_from("svum").flatmap(lambda kind: expressions(kind, 5)),
    final=st.sampled_from(["sum", "mean"]),
)


def random_inputs(seed: int, n: int = 3, rows: int = 2) -> tuple[jax.Array, ...]:
    """Continuous random inputs s: (), v: (n,), m: (rows, n) in [-2, 2]."""
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.uniform(-2.0, 2.0), dtype=jnp.float64),  # not weakly typed
        jnp.asarray(rng.uniform(-2.0, 2.0, size=(n,))),
        jnp.asarray(rng.uniform(-2.0, 2.0, size=(rows, n))),
    )


SEEDS = st.integers(0, 2**32 - 1)


def assert_grads_match(got, want, inputs) -> None:
    """Compares a tuple of gradients (chainrule) with jax's, including shapes and dtypes."""
    assert isinstance(got, tuple) and len(got) == len(want) == len(inputs)
    for name, g, w in zip("svm", got, want, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"d/d{name}: shape {g.shape} != {w.shape}"
        assert g.dtype == w.dtype, f"d/d{name}: dtype {g.dtype} != {w.dtype}"
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"gradient w.r.t. {name}")


def check_finite(values) -> None:
    """Guards the generator: the oracle itself must be finite."""
    for value in values:
        assert np.all(np.isfinite(np.asarray(value))), "generator produced a non-finite value"


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@fuzz_settings(150)
@given(composition=compositions, seed=SEEDS)
def test_grad_of_random_composition_matches_jax(composition: Composition, seed: int) -> None:
    """cr.grad(f, argnums=(0, 1, 2)) == jax.grad(f, argnums=(0, 1, 2)) for random trees."""
    f = composition.function(jnp)
    inputs = random_inputs(seed)
    want = jax.grad(f, argnums=ARGNUMS)(*inputs)
    check_finite(want)
    got = cr.grad(f, argnums=ARGNUMS)(*inputs)
    assert_grads_match(got, want, inputs)


@fuzz_settings(30)
@given(
    composition=compositions,
    seed=SEEDS,
    dims=st.sampled_from([(1, 1), (1, 3), (4, 1)]),
)
def test_grad_with_unit_dimensions_matches_jax(
    composition: Composition, seed: int, dims: tuple[int, int]
) -> None:
    """Same property with size-1 dimensions, where broadcasting and reductions are degenerate."""
    f = composition.function(jnp)
    inputs = random_inputs(seed, *dims)
    want = jax.grad(f, argnums=ARGNUMS)(*inputs)
    check_finite(want)
    got = cr.grad(f, argnums=ARGNUMS)(*inputs)
    assert_grads_match(got, want, inputs)


@fuzz_settings(50)
@given(composition=compositions, seed=SEEDS)
def test_chainrule_numpy_spelling_matches_jax(composition: Composition, seed: int) -> None:
    """The tree written with chainrule.numpy (chainrule's fast paths) has jax.grad's gradient."""
    inputs = random_inputs(seed)
    want = jax.grad(composition.function(jnp), argnums=ARGNUMS)(*inputs)
    check_finite(want)
    got = cr.grad(composition.function(cnp), argnums=ARGNUMS)(*inputs)
    assert_grads_match(got, want, inputs)


@fuzz_settings(30)
@given(composition=compositions, seed=SEEDS)
def test_value_and_grad_matches_jax(composition: Composition, seed: int) -> None:
    """cr.value_and_grad returns jax's value and gradient."""
    f = composition.function(jnp)
    inputs = random_inputs(seed)
    want_value, want_grads = jax.value_and_grad(f, argnums=ARGNUMS)(*inputs)
    check_finite(want_grads)
    got_value, got_grads = cr.value_and_grad(f, argnums=ARGNUMS)(*inputs)
    np.testing.assert_allclose(np.asarray(got_value), np.asarray(want_value), rtol=RTOL, atol=ATOL)
    assert_grads_match(got_grads, want_grads, inputs)


@fuzz_settings(15)
@given(composition=compositions, seed=SEEDS)
def test_grad_has_aux_matches_jax(composition: Composition, seed: int) -> None:
    """has_aux=True: the auxiliary output passes through and the gradient is unchanged."""
    f = composition.function(jnp)

    def f_aux(s, v, m):
        return f(s, v, m), {"tanh_v": jnp.tanh(v), "s": s}

    inputs = random_inputs(seed)
    want_grads, want_aux = jax.grad(f_aux, argnums=ARGNUMS, has_aux=True)(*inputs)
    check_finite(want_grads)
    got_grads, got_aux = cr.grad(f_aux, argnums=ARGNUMS, has_aux=True)(*inputs)
    assert_grads_match(got_grads, want_grads, inputs)
    assert sorted(got_aux) == sorted(want_aux)
    for key in want_aux:
        np.testing.assert_allclose(np.asarray(got_aux[key]), np.asarray(want_aux[key]), rtol=RTOL)


@fuzz_settings(8)
@given(composition=compositions, seed=SEEDS)
def test_jit_of_grad_matches_jax(composition: Composition, seed: int) -> None:
    """jax.jit(cr.grad(f)) traces through chainrule and still gives jax.grad's gradient."""
    f = composition.function(jnp)
    inputs = random_inputs(seed)
    want = jax.grad(f, argnums=ARGNUMS)(*inputs)
    check_finite(want)
    got = jax.jit(cr.grad(f, argnums=ARGNUMS))(*inputs)
    assert_grads_match(got, want, inputs)
