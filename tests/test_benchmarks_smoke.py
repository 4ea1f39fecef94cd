"""A bounded smoke run of `python -m benchmarks --quick`: correctness, not timings.

Runs every section in this process at tiny sizes with one repeat, then checks
that what is benchmarked is right (chainrule's steps and gradients agree with
jax.grad's, and with PyTorch's where installed) and that the JSON report has
every section and every target. Timings are not asserted: they are noise here.
"""

import json
import math

import pytest

from benchmarks import __main__ as bench
from benchmarks import compile_time, deep_chain, eager, forward, jit_step

EXPECTED_TARGETS = {
    "jit_step": ["(1) jit step", "XLA flops", "(1) big MLP"],
    "compile_time": [
        "(2) compile",
        "(2) chainrule first call linear",
        "(2) chainrule trace phase linear",
    ],
    "eager": ["/ jax.grad", "/ PyTorch"],
    "deep_chain": ["(4) chainrule linear in N", "chainrule time / PyTorch", "peak-memory"],
    "forward": ["(5) HVP", "(5) jacfwd"],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    bench.main(["--quick", "--repeats", "1", "--in-process", "--json", str(path)])
    with open(path) as f:
        return json.load(f)


def test_json_has_every_section_and_target(report):
    assert set(report["sections"]) == set(bench.SECTIONS)
    for name, section in report["sections"].items():
        assert section["rows"], name
        names = [t["name"] for t in section["targets"]]
        for expected in EXPECTED_TARGETS[name]:
            assert any(expected in n for n in names), (name, expected, names)
        for t in section["targets"]:
            assert set(t) >= {"name", "value", "limit", "op", "pass"}
            assert t["pass"] in (True, False, None)
            if t["value"] is not None:  # its size is a timing: not asserted here
                assert math.isfinite(t["value"]), t
    summary = report["summary"]
    n_targets = sum(len(s["targets"]) for s in report["sections"].values())
    assert summary["passed"] + summary["failed"] + summary["not_measured"] == n_targets


def _agreements(section):
    return {k: v for k, v in section["info"].items() if k.startswith("agreement")}


def test_jitted_steps_agree_and_compile_to_the_same_xla_work(report):
    section = report["sections"]["jit_step"]
    agreements = _agreements(section)
    assert len(agreements) == 3  # the big MLP, the tutorial's 10-5-1 MLP, the CNN
    for label, agree in agreements.items():
        for what, a in agree.items():
            assert a["allclose"], (label, what, a)
    for key, xla in section["info"].items():
        if key.startswith("xla "):
            assert xla["chainrule"]["flops"] == xla["jax.grad"]["flops"], key
            assert xla["chainrule"]["hlo_ops"] == xla["jax.grad"]["hlo_ops"], key


def test_compiled_gradients_agree(report):
    agreements = _agreements(report["sections"]["compile_time"])
    assert agreements
    for label, a in agreements.items():
        assert a["allclose"], (label, a)


def test_eager_gradients_agree_for_both_front_ends(report):
    agreements = _agreements(report["sections"]["eager"])
    assert len(agreements) == 4
    for label, per_contender in agreements.items():
        assert {"chainrule dynamic", "chainrule jnp"} <= set(per_contender), label
        for name, a in per_contender.items():
            assert a["allclose"], (label, name, a)


def test_deep_chain_gradients_agree(report):
    raw = report["sections"]["deep_chain"]["info"]["raw"]
    by_n: dict[str, dict[str, float]] = {}
    for key, r in raw.items():
        engine, n = key.rsplit(" N=", 1)
        if "grad" in r:
            by_n.setdefault(n, {})[engine] = r["grad"]
            assert r["mem_growth_kib"] >= 0 and r["time"] > 0, (key, r)
    assert by_n
    for n, grads in by_n.items():
        ref = grads["jax.grad"]
        for engine, g in grads.items():
            assert math.isclose(g, ref, rel_tol=1e-4, abs_tol=1e-7), (n, engine, g, ref)


def test_tutorial_values_are_the_documented_ones():
    """The benchmarked tutorial losses give the DESIGN.md numbers (-2; -3, -9, -2.25)."""
    import chainrule as cr

    cases = {c["case"]: c for c in eager.cases(quick=True)}
    lin = cases["tutorial (w*x-y)**2"]
    for fun in (lin["cnp"], lin["jnp"]):
        assert float(cr.grad(fun)(*lin["args"])) == -2.0
    net = cases["tutorial x->w1->ReLU->w2"]
    for fun in (net["cnp"], net["jnp"]):
        dw1, dw2, dx = cr.grad(fun, (0, 1, 2))(*net["args"])
        assert (float(dw1), float(dw2), float(dx)) == (-9.0, -3.0, -2.25)


def test_forward_mode_rows_agree_and_compile_to_the_same_xla_work(report):
    section = report["sections"]["forward"]
    agreements = _agreements(section)
    assert len(agreements) == 2  # the HVP and jacfwd
    for label, per_mode in agreements.items():
        for mode, a in per_mode.items():
            assert a["allclose"], (label, mode, a)
    for key, xla in section["info"].items():
        if key.startswith("xla "):
            assert xla["chainrule"]["flops"] == xla["jax"]["flops"], key
            assert xla["chainrule"]["hlo_ops"] == xla["jax"]["hlo_ops"], key


def test_sections_are_importable_modules():
    for module in (jit_step, compile_time, eager, deep_chain, forward):
        assert callable(module.run)


def test_the_eager_profile_splits_all_the_time_by_owner(capsys):
    from benchmarks import profile_eager

    per_call, shares = profile_eager.profile(
        eager.contenders(eager.cases(quick=True)[1], torch=None)["chainrule jnp"], calls=3
    )
    assert per_call > 0 and math.isclose(sum(shares.values()), 1.0)
    assert shares["chainrule"] > 0 and shares["JAX custom_jvp entry"] > 0  # relu's rule
    profile_eager.main(["--calls", "2"])
    table = capsys.readouterr().out
    assert table.count("\n") == 5 and "tutorial x->w1->ReLU->w2" in table


def test_jax_floor_replays_the_jnp_loss_and_prints_its_table(capsys):
    """The floor runs the loss on tracers whose hooks do no work: the same
    calls as a real run, each returning an output of the right type."""
    import jax.numpy as jnp

    from benchmarks import jax_floor, models

    p = models.init_mlp((4, 3, 1))
    x, y = models.regression_data(5, 4, 1)
    run = jax_floor.floor(models.mse_jnp, (p, jnp.asarray(x), jnp.asarray(y)), 0)
    out = run()
    assert isinstance(out, jax_floor.FloorTracer) and out.aval.shape == ()
    assert run() is out  # replayed: the recorded output itself
    jax_floor.main(["--number", "1", "--repeat", "1"])
    printed = capsys.readouterr().out
    assert "JAX floor (us)" in printed and printed.count("\n") >= 5


def test_big_mlp_parts_runs_and_its_hand_written_gradient_is_right():
    """`python -m benchmarks.big_mlp_parts` at the small size: its hand-written
    NumPy gradient is checked against jax.grad's inside `run`; every part is
    timed, and wrapping the parts leaves the engine as it was."""
    from benchmarks import big_mlp_parts
    from chainrule.engine import core

    backward = core.backward
    out = big_mlp_parts.run(quick=True, rounds=1, calls=1)
    assert core.backward is backward
    assert set(out["times_ms"]) >= {"chainrule", "NumPy by hand"}
    assert [label for label, _, _ in big_mlp_parts.PARTS] == list(out["parts_ms"])
    assert out["parts_ms"]["backward pass"] > 0


def test_alternate_times_this_checkout_with_and_without_subnormal_handling():
    """`python -m benchmarks.alternate . .:plain` at one call per case: a
    timing process per entry, chainrule imported from the tree it names, a
    table with a row per case; and the experiment's switch really turns the
    subnormal handling off (inside a process of its own)."""
    import subprocess
    import sys

    from benchmarks import alternate

    times = alternate.run([".", ".:plain"], rounds=1, calls=1, repeats=1)
    assert set(times) == {".", ".:plain"}
    for per_case in times.values():
        assert set(per_case) == set(alternate.CASES)
        assert all(len(ts) == 1 and ts[0] > 0 for ts in per_case.values())
    printed = alternate.table(times)
    assert all(case in printed for case in alternate.CASES)
    switched = "\n".join(
        [
            "import numpy as np",
            "from benchmarks import alternate",
            "from chainrule.engine import host",
            "tiny = np.array([1e-45], np.float32)",
            "with host.evaluating(), host.FLUSHING:",
            "    assert host.has_subnormal(tiny) and (tiny * np.float32(1))[0] == 0",
            "alternate.without_subnormal_handling()",
            "assert not host.has_subnormal(tiny)",
            "with host.evaluating(), host.FLUSHING:",
            "    assert (tiny * np.float32(1))[0] != 0  # no flush-to-zero mode",
        ]
    )
    subprocess.run([sys.executable, "-c", switched], cwd=alternate.REPO, check=True)


def test_fixed_cost_times_every_part_and_prints_its_table(capsys):
    """`python -m benchmarks.fixed_cost`: every part timed, positive, and the
    parts of one call add up to no more than several whole calls (a part
    that silently timed nothing, or the wrong thing, would show)."""
    from benchmarks import fixed_cost

    parts = fixed_cost.parts(200)
    assert set(parts) == {
        "enter",
        "trace_call",
        "backward",
        "gradients",
        "exit",
        "jax.Array alone",
        "whole cr.grad call",
    }
    assert all(us > 0 for us in parts.values())
    inside = sum(parts[k] for k in ("enter", "trace_call", "backward", "gradients", "exit"))
    assert inside < 5 * parts["whole cr.grad call"]
    fixed_cost.main(["--calls", "100"])
    assert "| whole cr.grad call |" in capsys.readouterr().out
