"""`chainrule train`: outputs, digits accuracy, resume == uninterrupted, Ctrl-C, corrupted
checkpoints, and one clear message (no traceback) for each kind of bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from chainrule import cli
from chainrule.train import loop
from tests.conftest import ROOT

STEPS = ["--steps", "40", "--checkpoint-every", "20", "--quiet"]


def _train(tmp, *args):
    return cli.main(["train", "--out", str(tmp), *args])


def _arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k != "__meta__"}


def _assert_same_run(a, b):
    """Same parameters, optimizer state and loss history, bit for bit."""
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    assert any(k.startswith("opt_state/") for k in arrays_a)
    for key in arrays_a:
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """40 steps of the teacher problem with Adam, checkpoints at 20 and 40."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert _train(out, "--optimizer", "adam", "--lr", "0.01", *STEPS) == 0
    return out


# --- normal runs ---------------------------------------------------------------------------------


def test_help(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--engine" in out and "`label`" in out and "FILE.npz" in out


def test_teacher_run_prints_a_summary_and_writes_outputs(tmp_path, capsys, uninterrupted):
    out = capsys.readouterr().out  # (the fixture's output)
    assert _train(tmp_path, "--steps", "30", "--quiet") == 0
    out, err = capsys.readouterr()
    assert err == ""  # --quiet: no progress output
    for text in (
        "teacher (regression)",
        "engine=chainrule",
        "sgd(lr=0.01)",
        "test loss",
        "steps/s",
    ):
        assert text in out
    assert "accuracy" not in out  # regression
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["task"] == "regression"
    assert np.isfinite(summary["test_loss"]) and summary["steps_per_second"] > 0
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["loss_curve"] == str(tmp_path / "loss_curve.png")
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [
        "ckpt-00000027.npz",
        "ckpt-00000030.npz",
    ]
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("engine", ["chainrule", "jax"])
def test_digits_defaults_reach_95_percent_test_accuracy(tmp_path, capsys, engine):
    pytest.importorskip("sklearn")  # `digits` is an optional extra
    assert _train(tmp_path, "--data", "digits", "--engine", engine, "--quiet") == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95, out
    assert f"test accuracy {100 * summary['test_accuracy']:.2f}%" in out
    assert summary["wall_seconds"] < 60


def test_engines_give_the_same_cli_run(tmp_path, uninterrupted):
    assert _train(tmp_path, "--engine", "jax", "--optimizer", "adam", "--lr", "0.01", *STEPS) == 0
    a = _arrays(uninterrupted / "ckpt-00000040.npz")
    b = _arrays(tmp_path / "ckpt-00000040.npz")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_progress_bar_only_on_a_tty_outside_ci(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.delenv("CI", raising=False)
    assert loop._progress_mode(loop.TrainConfig(), Stream(True)) == "bar"
    assert loop._progress_mode(loop.TrainConfig(), Stream(False)) == "log"
    assert loop._progress_mode(loop.TrainConfig(quiet=True), Stream(True)) == "off"
    monkeypatch.setenv("CI", "true")
    assert loop._progress_mode(loop.TrainConfig(), Stream(True)) == "log"


def test_log_lines_when_not_a_tty(tmp_path, capsys):
    assert _train(tmp_path, "--steps", "20") == 0
    err = capsys.readouterr().err
    assert "step 20/20" in err and "\r" not in err


# --- resume, Ctrl-C, damaged checkpoints -----------------------------------------------------


def test_resume_from_the_midpoint_equals_the_uninterrupted_run(tmp_path, capsys, uninterrupted):
    shutil.copy(uninterrupted / "ckpt-00000020.npz", tmp_path)
    assert _train(tmp_path, "--resume", *STEPS) == 0  # options come from the checkpoint
    assert "Resuming from" in capsys.readouterr().err
    _assert_same_run(tmp_path / "ckpt-00000040.npz", uninterrupted / "ckpt-00000040.npz")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["start_step"] == 20 and summary["optimizer"] == "adam"


@pytest.mark.parametrize("how", ["signal", "raise"])
def test_ctrl_c_saves_the_last_step_exits_130_and_resumes(
    tmp_path, capsys, monkeypatch, uninterrupted, how
):
    update = loop.Progress.update

    def interrupt_at_13(self, step, loss):
        update(self, step, loss)
        if step == 13:
            if how == "signal":  # a real SIGINT: the handler lets step 13 finish
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt

    monkeypatch.setattr(loop.Progress, "update", interrupt_at_13)
    assert _train(tmp_path, "--optimizer", "adam", "--lr", "0.01", *STEPS) == 130
    err = capsys.readouterr().err
    assert "Interrupted after step 13/40" in err and "--resume" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000013.npz"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    monkeypatch.setattr(loop.Progress, "update", update)
    assert _train(tmp_path, "--resume", *STEPS) == 0
    _assert_same_run(tmp_path / "ckpt-00000040.npz", uninterrupted / "ckpt-00000040.npz")


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, uninterrupted):
    for name in ("ckpt-00000020.npz", "ckpt-00000040.npz"):
        shutil.copy(uninterrupted / name, tmp_path)
    newest = tmp_path / "ckpt-00000040.npz"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated, as by a crash mid-copy
    assert _train(tmp_path, "--resume", *STEPS) == 0
    err = capsys.readouterr().err
    assert "ckpt-00000040.npz is truncated or corrupted" in err
    assert "Resuming from" in err and "ckpt-00000020.npz" in err
    assert (tmp_path / "ckpt-00000040.npz.corrupt").exists()
    _assert_same_run(newest, uninterrupted / "ckpt-00000040.npz")


def test_no_readable_checkpoint(tmp_path, capsys):
    (tmp_path / "ckpt-00000010.npz").write_bytes(b"PK\x03\x04 broken")
    assert _train(tmp_path, "--resume", "--quiet") == 1
    err = capsys.readouterr().err
    assert "ckpt-00000010.npz" in err and "without --resume" in err and "Traceback" not in err


def test_resume_with_different_options_is_refused(tmp_path, capsys, uninterrupted):
    shutil.copy(uninterrupted / "ckpt-00000020.npz", tmp_path)
    assert _train(tmp_path, "--resume", "--lr", "0.5", *STEPS) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5" in err and "--lr 0.01" in err


def test_existing_checkpoints_need_resume(tmp_path, capsys, uninterrupted):
    shutil.copy(uninterrupted / "ckpt-00000020.npz", tmp_path)
    assert _train(tmp_path, *STEPS) == 2
    assert "--resume" in capsys.readouterr().err


# --- bad input: one paragraph on stderr, non-zero exit, no traceback ------------------------------


def _write_inputs(tmp_path):
    rows = "".join(f"{i},{i % 2}\n" for i in range(10))
    files = {
        "nan.csv": "a,label\n1,0\nnan,1\n" + rows,
        "text.csv": "a,label\n1,0\nhello,1\n",
        "nolabel.csv": "a,b\n1,2\n3,4\n",
        "ragged.csv": "a,label\n1,0\n2\n",
        "fraction.csv": "a,label\n1,0.5\n2,1\n",
        "empty.csv": "",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    np.savez(tmp_path / "x3d.npz", x=np.ones((4, 2, 2)), label=np.zeros(4, int))
    np.savez(tmp_path / "lengths.npz", x=np.ones((4, 2)), label=np.zeros(5, int))
    np.savez(tmp_path / "nankey.npz", x=np.ones((4, 2)), target=np.array([1, np.nan, 2, 3]))
    np.savez(tmp_path / "nokeys.npz", features=np.ones((4, 2)))
    (tmp_path / "notzip.npz").write_bytes(b"hello")


BAD_INPUTS = [
    (["--data", "missing.csv"], 1, "Data file not found: 'missing.csv'"),
    (["--data", "model.h5"], 1, "neither a built-in data set"),
    (["--data", "{d}/nan.csv"], 1, "NaN or infinite value(s), the first in example 1"),
    (["--data", "{d}/text.csv"], 1, "line 3, column `a`: 'hello' is not a number"),
    (["--data", "{d}/nolabel.csv"], 1, "no `label` or `target` column"),
    (["--data", "{d}/ragged.csv"], 1, "line 3 has 1 value(s) but the header has 2"),
    (["--data", "{d}/fraction.csv"], 1, "integer class indices"),
    (["--data", "{d}/empty.csv"], 1, "the file is empty"),
    (["--data", "{d}/x3d.npz"], 1, "2-D array (examples, features)"),
    (["--data", "{d}/lengths.npz"], 1, "4 examples of features but 5 labels"),
    (["--data", "{d}/nankey.npz"], 1, "`target` contains 1 NaN"),
    (["--data", "{d}/nokeys.npz"], 1, "need `x` and exactly one of `label`, `target`"),
    (["--data", "{d}/notzip.npz"], 1, "cannot read it as a .npz file"),
    (["--lr", "0"], 2, "learning rate must be a finite number > 0, got --lr 0.0"),
    (["--lr", "-0.1"], 2, "learning rate must be a finite number > 0"),
    (["--lr", "fast"], 2, "argument --lr: invalid float value: 'fast'"),
    (["--engine", "torch"], 2, "Unknown engine 'torch'. Use --engine chainrule"),
    (["--optimizer", "rmsprop"], 2, "Unknown optimizer 'rmsprop'. Use --optimizer sgd or"),
    (["--steps", "0"], 2, "must be a positive integer, got 0"),
    (["--steps", "5", "--epochs", "2"], 2, "not allowed with argument"),
    (["--batch-size", "5000"], 1, "batch size must be between 1 and the number of training"),
    (["--hidden", "12,x"], 2, "comma-separated list of layer sizes"),
    (["--devices", "64"], 2, "Asked for 64 device(s) but JAX sees"),
    (["--test-fraction", "1.5"], 1, "test fraction must be in [0, 1)"),
    (["--resume"], 1, "no checkpoint (ckpt-<step>.npz) in"),
    (["--frobnicate"], 2, "unrecognized arguments: --frobnicate"),
]


@pytest.mark.parametrize(
    "argv, code, message", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS]
)
def test_bad_input_gets_a_clear_message(tmp_path, capsys, monkeypatch, argv, code, message):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # --devices may extend it
    _write_inputs(tmp_path)
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--quiet", *argv]) == code
    out, err = capsys.readouterr()
    assert message in err, err
    assert err.startswith("chainrule train: error: ") and "Traceback" not in err
    assert err.strip().count("\n") == 0  # one paragraph
    assert not list((tmp_path / "run").glob("ckpt-*"))  # nothing was trained


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert _train(tmp_path / "f", "--quiet") == 2
    assert "Cannot use --out" in capsys.readouterr().err


def test_user_csv_trains(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    lines = "".join(f"{a:.5f},{b:.5f},{c:.5f},{int(a + b > 0)}\n" for a, b, c in x)
    (tmp_path / "d.csv").write_text("f1,f2,f3,label\n" + lines)
    assert _train(tmp_path / "run", "--data", str(tmp_path / "d.csv"), "--epochs", "30") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "classification" and summary["test_accuracy"] >= 0.85
    assert "test accuracy" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "chainrule", "train", "--engine", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Unknown engine 'nope'" in proc.stderr and "Traceback" not in proc.stderr
