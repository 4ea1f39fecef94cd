"""One source for each derivative: the formulas `cr.explain` prints are the rules'.

Every elementwise rule carries, in its `defvjp` call, a formula per argument for
the local derivative ∂out/∂argument (see `chainrule.engine.rules.defvjp` for the
syntax). Here each formula is evaluated with NumPy in float64 and compared, to
rtol 1e-12, with what the rule itself computes: its VJP maker applied to a
cotangent of ones, on random inputs in the primitive's domain and at the corners
where a rule picks a side (abs at 0, max/min ties, clamp at its bounds, zero and
negative bases). The custom_jvp functions explain names (`jax.nn.relu`, `relu6`)
are checked the same way against the gradient chainrule computes for them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chainrule as cr
from chainrule.engine.core import Primitive, raw
from chainrule.engine.rules import PRIMITIVES, defvjp, elementwise
from chainrule.explanation import _CUSTOM_JVP_FORMULAS, _evaluate_formula, _render_formula

jax.config.update("jax_enable_x64", True)

RTOL = 1e-12
N = 64  # random points per operand


def normal(rng):
    return 2 * rng.standard_normal(N)


def positive(rng):
    return rng.uniform(0.1, 4.0, N)


def nonzero(rng):
    return rng.uniform(0.2, 3.0, N) * rng.choice([-1.0, 1.0], N)


def inside_unit(rng):
    return rng.uniform(-0.95, 0.95, N)


# Operand domains (one sampler per operand); a primitive not listed takes normal ones.
DOMAINS: dict[str, tuple[Callable, ...]] = {
    "div": (normal, nonzero),
    "rem": (normal, nonzero),
    "pow": (positive, normal),
    "log": (positive,),
    "sqrt": (positive,),
    "rsqrt": (positive,),
    "cbrt": (nonzero,),
    "log1p": (lambda rng: rng.uniform(-0.9, 3.0, N),),
    "tan": (lambda rng: rng.uniform(-1.4, 1.4, N),),
    "asin": (inside_unit,),
    "acos": (inside_unit,),
    "atanh": (inside_unit,),
    "erf_inv": (inside_unit,),
    "acosh": (lambda rng: rng.uniform(1.05, 4.0, N),),
    "clamp": (lambda rng: rng.uniform(-2.0, 0.0, N), normal, lambda rng: rng.uniform(0.0, 2.0, N)),
}

# Parameter sets to try; a primitive not listed has none.
PARAMS: dict[str, list[dict]] = {
    "integer_pow": [{"y": k} for k in (-3, -2, -1, 0, 1, 2, 3, 5)],
    "reduce_precision": [{"exponent_bits": 11, "mantissa_bits": 52}],
    "convert_element_type": [{"new_dtype": np.dtype(np.float64)}],
}

_f = lambda *v: np.array(v, dtype=np.float64)

# The points where a rule chooses a side, or where a formula could go wrong.
CORNERS: dict[str, list[tuple[np.ndarray, ...]]] = {
    "abs": [(_f(0.0, -0.0, 1e-300, -1e-300),)],
    "max": [(_f(0.0, 1.5, -2.0, 3.0), _f(0.0, 1.5, -2.0, -3.0))],  # ties, then one win each
    "min": [(_f(0.0, 1.5, -2.0, 3.0), _f(0.0, 1.5, -2.0, -3.0))],
    "clamp": [  # x at each bound, inside, outside; lo == hi
        (_f(-1.0, -1.0, -1.0, -1.0, 0.5), _f(-1.0, 1.0, 0.0, 2.0, 0.5), _f(1.0, 1.0, 1.0, 1.0, 0.5))
    ],
    "pow": [  # zero and negative bases with integer exponents
        (_f(0.0, 0.0, -2.0, -1.5, -3.0), _f(2.0, 3.0, 2.0, 3.0, -1.0)),
    ],
    "integer_pow": [(_f(0.0, -2.0, -0.5, 1.0),)],
    "rem": [(_f(3.0, -3.0, 4.5, -4.5, 0.0), _f(1.5, 1.5, -2.0, 2.0, 1.0))],  # exact multiples
    "atan2": [(_f(0.0, 0.0, 1.0, -1.0), _f(1.0, -1.0, 0.0, 0.0))],
    "div": [(_f(0.0, -1.0), _f(-2.0, 0.5))],
}

# Primitives whose rule treats all operands at once (no per-argument makers):
# explain describes them in `_formula` in words, not with a formula.
JOINT = {"select_n"}

# Differentiable primitives that are not elementwise: explain shows what their rule
# does to the upstream gradient ("ḡ ↦ ..."), not a local derivative.
NOT_ELEMENTWISE = {
    "broadcast_in_dim", "reshape", "squeeze", "transpose", "rev", "reduce_sum",
    "pad", "slice", "concatenate", "stack", "tile", "split", "dynamic_slice",
    "dynamic_update_slice", "gather", "scatter-add", "scatter", "dot_general",
    "reduce_max", "reduce_min", "cumsum",
    # call-like: a body of other primitives, or a user's rule (explain checks a
    # custom_jvp formula against that rule before showing it)
    "jit", "closed_call", "remat2", "cond", "custom_jvp_call", "custom_vjp_call",
    # identities with non-numeric parameters or several operands (placement, names)
    "device_put", "optimization_barrier", "sharding_constraint", "name",
}  # fmt: skip

WITH_FORMULAS = sorted(n for n, p in PRIMITIVES.items() if getattr(p, "formulas", None))


def points(name: str, arity: int):
    """Random operands in the primitive's domain, then its corner cases."""
    rng = np.random.default_rng(sum(map(ord, name)))
    samplers = DOMAINS.get(name, (normal,) * arity)
    assert len(samplers) == arity, name
    yield tuple(s(rng) for s in samplers)
    yield from CORNERS.get(name, [])


def rule_derivative(prim: Primitive, i: int, operands, params) -> np.ndarray:
    """What the rule computes for argument `i`: its VJP maker at a cotangent of ones."""
    with np.errstate(all="ignore"):  # log of a negative base is NaN in both
        ans = np.asarray(prim.impl(*operands, **params))
        ct = prim.vjp_makers[i](ans, *operands, **params)(np.ones_like(ans))
    return np.broadcast_to(np.asarray(raw(ct), dtype=np.float64), ans.shape), ans


# --- every formula computes what its rule computes -----------------------------------


@pytest.mark.parametrize("name", WITH_FORMULAS)
def test_formula_is_the_rule(name):
    prim = PRIMITIVES[name]
    arity = len(prim.formulas)
    checked = 0
    for params in PARAMS.get(name, [{}]):
        for operands in points(name, arity):
            for i, formula in enumerate(prim.formulas):
                if formula is None:
                    continue
                want, ans = rule_derivative(prim, i, operands, params)
                got = _evaluate_formula(formula, operands, ans, params)
                got = np.broadcast_to(np.asarray(got, dtype=np.float64), ans.shape)
                np.testing.assert_allclose(
                    got, want, rtol=RTOL, atol=0, err_msg=f"{name} argument {i}: {formula}"
                )
                checked += 1
    assert checked >= arity


def test_the_corners_are_the_rules_choices():
    """The cases issue 11 names, spelled out: the formulas give what the rules give."""
    zero = _f(0.0, -0.0)
    assert list(_evaluate_formula(PRIMITIVES["abs"].formulas[0], [zero], np.abs(zero))) == [1, 1]
    tie = _f(2.0)
    for name in ("max", "min"):
        dx, dy = (_evaluate_formula(f, [tie, tie], tie) for f in PRIMITIVES[name].formulas)
        assert (float(dx[0]), float(dy[0])) == (0.5, 0.5), name
    lo, x, hi = _f(-1.0, -1.0, -1.0), _f(-1.0, 0.0, 1.0), _f(1.0, 1.0, 1.0)
    grads = [_evaluate_formula(f, [lo, x, hi], x) for f in PRIMITIVES["clamp"].formulas]
    # x at a bound: no operand gets the gradient (the rule's comparisons are strict)
    assert [list(np.broadcast_to(g, (3,))) for g in grads] == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]


# --- no elementwise rule without a formula ---------------------------------------------


def test_every_elementwise_rule_has_formulas():
    """A new elementwise rule cannot silently lack its formula (explain would print it
    generically, and nothing would check the text against the rule)."""
    defined_here = {
        v.name
        for v in vars(elementwise).values()
        if isinstance(v, Primitive) and v.differentiable and v.name not in JOINT
    }
    missing = sorted(n for n in defined_here if not getattr(PRIMITIVES[n], "formulas", None))
    assert not missing, f"add formulas= to the defvjp of {missing}"
    unknown = sorted(
        n
        for n, p in PRIMITIVES.items()
        if p.differentiable
        and n not in JOINT | NOT_ELEMENTWISE
        and not getattr(p, "formulas", None)
    )
    assert not unknown, (
        f"{unknown} have a VJP rule but no formulas: give their defvjp formulas=(...) "
        "if they are elementwise, else list them in NOT_ELEMENTWISE here"
    )


def test_the_primitives_explain_showed_before_all_have_formulas():
    shown = (
        "add add_any sub mul div neg square pow exp exp2 log log1p expm1 sqrt rsqrt sin cos "
        "tan tanh logistic abs max min copy convert_element_type reduce_precision integer_pow"
    )
    assert set(shown.split()) <= set(WITH_FORMULAS)


def test_every_formula_has_a_domain_or_takes_normal_inputs():
    for name, samplers in DOMAINS.items():
        assert len(samplers) == len(PRIMITIVES[name].formulas), name
    assert set(CORNERS) <= set(WITH_FORMULAS)


def test_defvjp_checks_its_formulas():
    prim = Primitive("formula_check", lambda x, y: x)
    maker = lambda ans, x, y: lambda g: g
    with pytest.raises(ValueError, match="1 formulas for 2 VJP makers"):
        defvjp(prim, maker, maker, formulas=("1",))
    with pytest.raises(ValueError, match="None for None"):
        defvjp(prim, maker, None, formulas=("1", "0"))
    with pytest.raises(SyntaxError):
        defvjp(prim, maker, maker, formulas=("1", "where(x > 0, 1"))
    defvjp(prim, maker, None, formulas=("1", None))
    assert prim.formulas == ("1", None)
    defvjp(prim, maker, maker)
    assert prim.formulas is None


# --- custom_jvp functions explain names -------------------------------------------------


@pytest.mark.parametrize("name", sorted(_CUSTOM_JVP_FORMULAS))
def test_custom_jvp_formula_is_the_gradient_chainrule_computes(name):
    fun = getattr(jax.nn, name)
    rng = np.random.default_rng(0)
    x = np.concatenate([4 * rng.standard_normal(N), _f(0.0, -0.0, 6.0, 6.0 + 1e-12, -1e-300)])
    out, vjp_fn = cr.vjp(fun, jnp.asarray(x))
    (want,) = vjp_fn(jnp.ones_like(out))
    (formula,) = _CUSTOM_JVP_FORMULAS[name]
    got = _evaluate_formula(formula, [x], np.asarray(out))
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want), rtol=RTOL, atol=0)


# --- explain prints the rules' formulas, and their values -------------------------------

_ARGS = ("x", "y", "z")


def _scalar_point(name: str) -> tuple[float, ...]:
    return tuple(float(a[0]) for a in next(points(name, len(PRIMITIVES[name].formulas))))


@pytest.mark.parametrize("name", WITH_FORMULAS)
def test_explain_shows_the_rule_formula_and_its_value(name):
    prim = PRIMITIVES[name]
    params = PARAMS.get(name, [{}])[-1]
    point = _scalar_point(name)
    arity = len(point)
    fun = {
        1: lambda x: prim.bind(x, **params),
        2: lambda x, y: prim.bind(x, y, **params),
        3: lambda x, y, z: prim.bind(x, y, z, **params),
    }[arity]
    e = cr.explain(fun, *(np.float64(p) for p in point), argnums=tuple(range(arity)))
    (row,) = e.forward
    assert row.op == name
    for edge in row.edges:
        i = _ARGS.index(edge.input)
        formula = prim.formulas[i]
        assert edge.formula == _render_formula(formula, _ARGS[:arity], row.name, params)
        value = _evaluate_formula(formula, [np.float64(p) for p in point], row.value, params)
        np.testing.assert_allclose(float(edge.local), float(value), rtol=RTOL, atol=0)


def test_rendering_reads_like_the_textbook():
    r = lambda f, ops=("x", "y"), **params: _render_formula(f, ops, "out", params)
    assert r(PRIMITIVES["abs"].formulas[0]) == "1 if x≥0 else -1"
    assert r(PRIMITIVES["max"].formulas[0]) == "1 if x>y else 0.5 if x=y else 0"
    assert r(PRIMITIVES["sqrt"].formulas[0]) == "1/(2·out)"
    assert r(PRIMITIVES["tanh"].formulas[0]) == "1-out²"
    assert r(PRIMITIVES["div"].formulas[1]) == "-x/y²"
    assert r(PRIMITIVES["asin"].formulas[0]) == "1/√(1-x²)"
    ipow = PRIMITIVES["integer_pow"].formulas[0]
    assert [r(ipow, y=k) for k in (0, 1, 2, 3, -2)] == ["0", "1", "2·x", "3·x²", "-2·x⁻³"]
    clamp = PRIMITIVES["clamp"].formulas
    assert [r(f, ("lo", "x", "hi")) for f in clamp] == ["1[x<lo<hi]", "1[lo<x<hi]", "1[hi<x]"]
    assert [r(f, ("z1",)) for (f,) in _CUSTOM_JVP_FORMULAS.values()] == ["1[z1>0]", "1[0<z1<6]"]
    # operands that are not plain names are parenthesized
    assert r("y/x", ("a+b", "-1")) == "-1/(a+b)"
    assert r("x*y", ("t", "-1")) == "t·(-1)"
