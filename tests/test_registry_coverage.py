"""Coverage of JAX's differentiable primitives, read from the installed JAX.

Every primitive that JAX can differentiate (one with a JVP or transpose rule
registered in `jax._src.interpreters.ad`) is either in chainrule's table or
on `NOT_IN_USER_CODE` below, with the reason it cannot reach a loss function
that `jax.grad` differentiates. The README's table of supported primitives is
generated (`python -m chainrule.engine.rules`) and checked here too.
"""

from __future__ import annotations

import importlib
import os

import jax

from chainrule.engine.rules import PRIMITIVES
from chainrule.engine.rules.__main__ import markdown
from chainrule.engine.rules.foreign import jax_own
from tests.conftest import ROOT

# The modules of JAX that register differentiation rules when imported.
JAX_RULE_MODULES = [
    "jax.numpy",
    "jax.scipy.special",
    "jax.scipy.linalg",
    "jax.random",
    "jax._src.lax.linalg",
    "jax._src.lax.fft",
    "jax._src.lax.special",
    "jax._src.lax.parallel",
    "jax._src.lax.control_flow",
    "jax._src.callback",
    "jax._src.debugging",
    "jax._src.ad_checkpoint",
    "jax._src.custom_derivatives",
    "jax._src.custom_batching",
    "jax._src.shard_map",
    "jax._src.checkify",
    "jax._src.ffi",
    "jax._src.hijax",
    "jax._src.state.discharge",
    "jax._src.lax.eval_jaxpr",
    "jax.experimental.multihost_utils",
    "jax.experimental.sparse",
    "jax.experimental.sparse.linalg",
    "jax.experimental.compute_on",
    "jax.experimental.xla_metadata",
]

_STATE = (
    "mutable array references (jax.new_ref, Pallas kernels' state): chainrule "
    "differentiates pure functions; JAX's own support is experimental"
)
_HIJAX = "JAX's experimental 'hijax' boxes and logs, internal to JAX"
_AD_INTERNAL = "made by JAX's own differentiation passes, never by user code"
_SHARDING_INTERNAL = (
    "'reduced'/'unreduced' sharding-type casts that JAX inserts while transposing "
    "collectives, not user code"
)

NOT_IN_USER_CODE: dict[str, str] = {
    # JAX's own AD machinery
    "custom_lin": _AD_INTERNAL,
    "dce_sink": "inserted by JAX's dead-code elimination",
    "tie": "internal ordering token of JAX's lowering",
    "stage": "internal to JAX's staging of eager values",
    "eval_jaxpr": "staged by JAX as closed_call (which is in the table) before a trace sees it",
    "remat_opt": "JAX's rewrite of a custom_vjp under its own linearize (optimize_remat)",
    # mutable state
    "accum_grad_in_ref": _STATE,
    "addupdate": _STATE,
    "get": _STATE,
    "swap": _STATE,
    "new_ref": _STATE,
    "empty_ref": _STATE,
    "free_ref": _STATE,
    "freeze": _STATE,
    "run_state": _STATE,
    "box_get": _HIJAX,
    "box_set": _HIJAX,
    "new_box": _HIJAX,
    "new_log": _HIJAX,
    "log_extend": _HIJAX,
    "log_read": _HIJAX,
    "call_hi_primitive": _HIJAX,
    # extended dtypes and comparisons only JAX's internals bind
    "from_edtype": "conversion of JAX's extended dtypes, internal to jax.random's key types",
    "to_edtype": "conversion of JAX's extended dtypes, internal to jax.random's key types",
    "mulhi": "integer high multiply inside JAX's random bit generators (no gradient)",
    # sharding-type internals of collectives
    "unreduced_psum": _SHARDING_INTERNAL,
    "unreduced_reduce_scatter": _SHARDING_INTERNAL,
    "reduced_vary_cast_p": _SHARDING_INTERNAL,
    "vary_unreduced_cast_p": _SHARDING_INTERNAL,
    "preduced": _SHARDING_INTERNAL,
    "all_gather_reduced": "not in JAX's public API (jax._src only): a collective of the "
    "experimental 'reduced' sharding types",
    "host_local_array_to_global_array": "multi-process input plumbing "
    "(jax.experimental.multihost_utils), applied to data before a loss, not inside one",
    "global_array_to_host_local_array": "multi-process output plumbing "
    "(jax.experimental.multihost_utils), applied to results after a loss, not inside one",
    # transformations of their own
    "ffi_call": "a foreign (C++/CUDA) function: JAX cannot differentiate it either "
    "(wrap it in jax.custom_vjp, which chainrule honours)",
}


# Primitives user code can emit that chainrule cannot differentiate yet: a known gap,
# said here and in the README, never a silent zero (they raise NoVJPRuleError).
KNOWN_GAPS: dict[str, str] = {
    "ragged_all_to_all": "lax.ragged_all_to_all (expert-parallel mixture-of-experts under "
    "shard_map): its transpose is not written yet",
}


def jax_differentiable_primitives() -> set[str]:
    for module in JAX_RULE_MODULES:
        importlib.import_module(module)
    from jax._src.interpreters import ad

    # (JAX's own: other libraries' primitives, which the test modules and
    # equinox register too, go through their own rules, see rules/foreign.py)
    return {p.name for p in (*ad.primitive_jvps, *ad.primitive_transposes) if jax_own(p)}


def test_every_primitive_jax_differentiates_is_covered_or_explained():
    names = jax_differentiable_primitives()
    assert len(names) > 150, "JAX's registry was not read"
    missing = sorted(names - set(PRIMITIVES) - set(NOT_IN_USER_CODE) - set(KNOWN_GAPS))
    assert not missing, (
        f"JAX differentiates {missing}, which chainrule's table lacks: add rules for them, "
        "or, if user code cannot emit them, list them in NOT_IN_USER_CODE with the reason"
    )


def test_the_exclusions_are_real_and_not_in_the_table():
    names = jax_differentiable_primitives()
    stale = sorted(set(NOT_IN_USER_CODE) - names)
    assert not stale, f"{stale} are no longer JAX primitives: drop them from the list"
    both = sorted((set(NOT_IN_USER_CODE) | set(KNOWN_GAPS)) & set(PRIMITIVES))
    assert not both, f"{both} have rules now: drop them from NOT_IN_USER_CODE / KNOWN_GAPS"
    assert len(KNOWN_GAPS) <= 1, "the known gaps only shrink"


def test_the_readme_table_is_generated_from_the_rule_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start, end = "<!-- primitive-table -->\n", "<!-- /primitive-table -->"
    assert start in readme and end in readme, "the README lost its primitive table markers"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == markdown(), (
        "the README's primitive table is stale: regenerate it with "
        "`python -m chainrule.engine.rules` and paste it between the markers"
    )


def test_jax_version_matches_the_registry_this_list_was_written_for():
    major, minor = (int(p) for p in jax.__version__.split(".")[:2])
    assert (major, minor) == (0, 10), "re-read JAX's registry for this version"
