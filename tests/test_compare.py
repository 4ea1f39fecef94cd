"""The comparison suite (`compare/`): tutorial numbers exact, PyTorch matched, wrong ports caught.

The recorded-reference path runs without torch (torch's import is blocked);
only the live-PyTorch tests need torch.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # compare/ is a top-level folder, not an installed package
    sys.path.insert(0, ROOT)

from chainrule.interop import TorchNotInstalledError, compare_arrays  # noqa: E402
from compare import ports, suite  # noqa: E402


@pytest.fixture
def no_torch(monkeypatch):
    """Makes `import torch` fail, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "torch", None)


@pytest.fixture(scope="module")
def recorded_rows():
    """Every case, dtype and engine against the recording (torch not used)."""
    saved = sys.modules.get("torch", "absent")
    sys.modules["torch"] = None
    try:
        rows, info = suite.run_cases(source="recorded")
    finally:
        if saved == "absent":
            del sys.modules["torch"]
        else:
            sys.modules["torch"] = saved
    assert info["source"] == "recorded"
    return rows


def _row(rows, case, dtype, quantity):
    (row,) = [r for r in rows if (r["case"], r["dtype"], r["quantity"]) == (case, dtype, quantity)]
    return row


def test_recorded_path_passes_every_row_without_torch(recorded_rows):
    failed = [
        (r["case"], r["dtype"], r["quantity"], r["failed"]) for r in recorded_rows if not r["ok"]
    ]
    assert not failed
    quantities = {(r["case"], r["quantity"]) for r in recorded_rows}
    assert {("linear", "dw"), ("relu", "dw1"), ("relu", "dw2"), ("relu", "dx")} <= quantities
    assert {("mlp", "loss"), ("mlp", "grad 0.weight"), ("mlp", "after step 2.bias")} <= quantities
    assert ("mlp", "trajectory (loss per step)") in quantities
    for r in recorded_rows:
        assert set(r["engines"]) == {"jax.grad", "cr eager", "cr jit"}, r["quantity"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "case, quantity, value",
    [
        ("linear", "dw", -2.0),
        ("linear", "loss", 1.0),
        ("relu", "dw2", -3.0),
        ("relu", "dw1", -9.0),
        ("relu", "dx", -2.25),
        ("relu", "loss", 2.25),
    ],
)
def test_tutorial_numbers_are_exact(recorded_rows, case, quantity, value, dtype):
    row = _row(recorded_rows, case, dtype, quantity)
    assert row["tutorial"] == value
    assert row["pytorch"].dtype == np.dtype(dtype) and row["pytorch"] == value
    for engine, got in row["engines"].items():
        assert got.dtype == np.dtype(dtype), engine
        assert got == value, (engine, got)  # exact: every value is representable


def test_mlp_trajectory_decreases_and_matches_the_recording(recorded_rows):
    reference = suite.load_reference()
    for dtype in ("float32", "float64"):
        row = _row(recorded_rows, "mlp", dtype, "trajectory (loss per step)")
        assert row["pytorch"].shape == (10,)
        np.testing.assert_array_equal(row["pytorch"], reference[dtype]["mlp"]["trajectory"])
        assert np.all(np.diff(row["engines"]["cr jit"]) < 0)  # SGD on one batch: loss falls


def test_reference_stores_shared_weights_and_batch():
    reference = suite.load_reference()
    for dtype in ("float32", "float64"):
        mlp = reference[dtype]["mlp"]
        assert {k: v.shape for k, v in mlp["initial"].items()} == {
            "0.weight": (5, 10),
            "0.bias": (5,),
            "2.weight": (1, 5),
            "2.bias": (1,),
        }
        assert mlp["x"].shape == (32, 10) and mlp["y"].shape == (32, 1)
    # float64 starts from the same numbers as float32 (converted with .double()).
    np.testing.assert_array_equal(
        reference["float32"]["mlp"]["x"], reference["float64"]["mlp"]["x"]
    )


# --------------------------------------------------------------------------- wrong ports


def wrong_not_transposed(params, x, y):
    """The classic port bug: W reshaped to (in, out) instead of transposed."""
    w0 = params["0.weight"].reshape(10, 5)
    h = jax.nn.relu(x @ w0 + params["0.bias"])
    return jnp.mean((ports.linear_layer(params, "2", h) - y) ** 2)


def wrong_mse_as_sum(params, x, y):
    return jnp.sum((ports.mlp(params, x) - y) ** 2)


def wrong_relu_place(params, x, y):
    h = ports.linear_layer(params, "0", x)  # relu moved after the last layer
    return jnp.mean((jax.nn.relu(ports.linear_layer(params, "2", h)) - y) ** 2)


@pytest.mark.parametrize(
    "port, must_fail",
    [
        (wrong_not_transposed, ["loss", "grad 0.weight", "after step 0.weight"]),
        (wrong_mse_as_sum, ["loss", "grad 0.weight", "grad 2.bias", "after step 2.weight"]),
        (wrong_relu_place, ["loss", "grad 0.weight", "grad 2.weight"]),
    ],
)
def test_wrong_port_fails_and_names_the_parameter(no_torch, port, must_fail):
    rows, _ = suite.run_cases(
        source="recorded",
        cases=("mlp",),
        dtypes=("float64",),
        engines=("jax.grad", "cr jit"),
        ports_override={"mlp": port},
    )
    failed = {r["quantity"] for r in rows if not r["ok"]}
    assert set(must_fail) <= failed, failed
    text = suite.table(rows, engines=("jax.grad", "cr jit"))
    for quantity in must_fail:
        (line,) = [ln for ln in text.splitlines() if f" {quantity} " in ln]
        assert "FAIL" in line and "vs PyTorch" in line


def test_correct_port_passes_the_same_checks(no_torch):
    rows, _ = suite.run_cases(
        source="recorded", cases=("mlp",), dtypes=("float32",), engines=("jax.grad", "cr jit")
    )
    assert all(r["ok"] for r in rows), [r["failed"] for r in rows if not r["ok"]]


def test_wrong_tutorial_port_breaks_exactness(no_torch):
    rows, _ = suite.run_cases(
        source="recorded",
        cases=("relu",),
        dtypes=("float64",),
        engines=("cr eager",),
        ports_override={"relu": lambda w1, w2, x, t: (w2 * jax.nn.relu(w1 * x) - t) ** 2 / 2},
    )
    assert not _row(rows, "relu", "float64", "dw1")["ok"]
    assert "cr eager == tutorial" in " ".join(_row(rows, "relu", "float64", "dw1")["failed"])


# --------------------------------------------------------------------------- the command


def test_command_prints_table_writes_json_and_exits_zero(no_torch, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["--source", "recorded", "--cases", "linear", "relu", "--json", str(out)]
    assert suite.main(args) == 0
    printed = capsys.readouterr().out
    assert "recorded by torch 2.13.0" in printed
    header = printed.splitlines()[1].split()
    assert header[:5] == ["case", "dtype", "quantity", "tutorial", "PyTorch"]
    assert "jax.grad" in header and "eager" in header and "jit" in header
    assert "FAIL" not in printed and "rows pass" in printed
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["source"] == "recorded"
    dw1 = [r for r in data["rows"] if r["quantity"] == "dw1" and r["dtype"] == "float64"][0]
    assert dw1["tutorial"] == -9.0 and dw1["pytorch"] == -9.0
    assert dw1["engines"] == {"jax.grad": -9.0, "cr eager": -9.0, "cr jit": -9.0}


def test_command_exits_nonzero_when_the_recording_disagrees(no_torch, tmp_path, capsys):
    data = json.loads(open(suite.REFERENCE).read())
    data["float32"]["mlp"]["grads"]["2.bias"][0] *= 1.001  # a tampered PyTorch number
    bad = tmp_path / "reference.json"
    bad.write_text(json.dumps(data))
    args = ["--source", "recorded", "--reference", str(bad), "--cases", "mlp"]
    assert suite.main([*args, "--dtypes", "float32"]) == 1
    printed = capsys.readouterr().out
    (line,) = [ln for ln in printed.splitlines() if "float32" in ln and "grad 2.bias" in ln]
    assert "FAIL" in line


def test_live_run_without_torch_says_how_to_install(no_torch):
    with pytest.raises(TorchNotInstalledError, match=r"pip install torch==2\.13\.0"):
        suite.run_cases(source="live", cases=("linear",), dtypes=("float64",))


# --------------------------------------------------------------------------- live PyTorch


def test_live_pytorch_matches_the_recording_and_the_ports(tmp_path):
    pytest.importorskip("torch")
    rows, info = suite.run_cases(source="live", engines=("cr jit",))
    assert info["source"] == "live"
    assert all(r["ok"] for r in rows), [(r["quantity"], r["failed"]) for r in rows if not r["ok"]]
    # The recording is checked against the live run in every row, inputs included.
    quantities = {r["quantity"] for r in rows}
    assert {"input x", "initial 0.weight", "grad 0.weight"} <= quantities


def test_regenerate_reproduces_the_recording(tmp_path):
    """Same torch, same seed: the recording is what PyTorch computes today."""
    pytest.importorskip("torch")
    path = tmp_path / "reference.json"
    suite.regenerate(str(path))
    new, old = suite.load_reference(str(path)), suite.load_reference()
    for dtype in ("float32", "float64"):
        for case in ("linear", "relu"):
            assert new[dtype][case] == old[dtype][case]
        leaves = jax.tree_util.tree_leaves_with_path(old[dtype]["mlp"])
        for path_, leaf in leaves:
            other = new[dtype]["mlp"]
            for key in path_:
                other = other[key.key]
            assert compare_arrays("", str(path_), other, leaf).ok, path_
