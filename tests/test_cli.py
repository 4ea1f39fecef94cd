"""`chainrule train`: outputs, digits accuracy, resume == uninterrupted, Ctrl-C, corrupted
checkpoints, and one clear message (no traceback) for each kind of bad input.

Issue 12's training items, by test: 12 (planted links) `test_outputs_never_write_through_a_
planted_link`; 13 (one run per folder) `test_a_second_run_on_the_same_out_fails_at_once`;
14 (crafted checkpoints) `test_crafted_checkpoint_metadata_*`, `test_zip_bomb_checkpoint_*`,
`test_stale_temporary_files_are_removed_at_start` (and the bounded reads in test_train.py);
15 (no tracebacks) `BAD_INPUTS`, `test_unwritable_out_*`, `test_full_disk_*`,
`test_a_diverging_run_*`; 16 (Ctrl-C) `test_ctrl_c_*`, `test_resume_without_a_checkpoint_*`;
17 (the README in order) `test_readme_commands_run_in_order`, `test_overwrite_*`.
"""

import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from chainrule import cli
from chainrule.train import checkpoint as ckpt_lib
from chainrule.train import config, loop, outdir, progress
from tests.conftest import ROOT
from tests.test_train import rewrite_as_zip_bomb

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
    assert progress.progress_mode(loop.TrainConfig(), Stream(True)) == "bar"
    assert progress.progress_mode(loop.TrainConfig(), Stream(False)) == "log"
    assert progress.progress_mode(loop.TrainConfig(quiet=True), Stream(True)) == "off"
    monkeypatch.setenv("CI", "true")
    assert progress.progress_mode(loop.TrainConfig(), Stream(True)) == "log"


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
    if how == "signal":  # one Ctrl-C: the results of the 13 steps too
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["steps"] == 13 and summary["interrupted"] is True
        assert (tmp_path / "loss_curve.png").exists()
    else:  # a second Ctrl-C: only the checkpoint
        assert not (tmp_path / "summary.json").exists()

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
    assert _train(tmp_path, "--resume", "--quiet") == 2
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
    (tmp_path / "binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (tmp_path / "nul.csv").write_bytes(b"a,label\n1,0\n\x00\x00,1\n")
    (tmp_path / "utf16.csv").write_bytes(("a,label\n" + rows).encode("utf-16"))
    (tmp_path / "bigclass.csv").write_text("a,label\n" + rows + "3,1000000000\n")
    (tmp_path / "huge.csv").write_text("a,target\n" + rows + "1e39,1\n")  # inf in float32
    np.savez(tmp_path / "x3d.npz", x=np.ones((4, 2, 2)), label=np.zeros(4, int))
    np.savez(tmp_path / "lengths.npz", x=np.ones((4, 2)), label=np.zeros(5, int))
    np.savez(tmp_path / "nankey.npz", x=np.ones((4, 2)), target=np.array([1, np.nan, 2, 3]))
    np.savez(tmp_path / "nokeys.npz", features=np.ones((4, 2)))
    (tmp_path / "notzip.npz").write_bytes(b"hello")


BAD_INPUTS = [
    (["--data", "missing.csv"], 2, "Data file not found: 'missing.csv'"),
    (["--data", "model.h5"], 2, "neither a built-in data set"),
    (["--data", "{d}/nan.csv"], 2, "NaN or infinite value(s), the first in example 1"),
    (["--data", "{d}/text.csv"], 2, "line 3, column `a`: 'hello' is not a number"),
    (["--data", "{d}/nolabel.csv"], 2, "no `label` or `target` column"),
    (["--data", "{d}/ragged.csv"], 2, "line 3 has 1 value(s) but the header has 2"),
    (["--data", "{d}/fraction.csv"], 2, "integer class indices"),
    (["--data", "{d}/empty.csv"], 2, "the file is empty"),
    (["--data", "{d}/x3d.npz"], 2, "2-D array (examples, features)"),
    (["--data", "{d}/lengths.npz"], 2, "4 examples of features but 5 labels"),
    (["--data", "{d}/nankey.npz"], 2, "`target` contains 1 NaN"),
    (["--data", "{d}/nokeys.npz"], 2, "need `x` and exactly one of `label`, `target`"),
    (["--data", "{d}/notzip.npz"], 2, "cannot read it as a .npz file"),
    (
        ["--data", "{d}/binary.csv"],
        2,
        "not UTF-8 text (it has the byte 0x89): this looks like a binary",
    ),
    (["--data", "{d}/nul.csv"], 2, "line 3, column `a`: '\\x00\\x00' is not a number"),
    (["--data", "{d}/utf16.csv"], 2, "the file is UTF-16 text; chainrule train reads UTF-8"),
    (["--data", "{d}/bigclass.csv"], 2, "value 1000000000, which would make 1000000001 classes"),
    (["--data", "{d}/huge.csv"], 2, "NaN or infinite value(s), the first in example 10"),
    (["--seed", "-1"], 2, "--seed: must be an integer from 0 to 4294967295, got '-1'"),
    (["--seed", "1e20"], 2, "--seed: must be an integer from 0 to 4294967295, got '1e20'"),
    (["--seed", str(10**20)], 2, "--seed: must be an integer from 0 to 4294967295, got '1000"),
    (["--hidden", "1e8"], 2, "'1e8' is not a comma-separated list of layer sizes"),
    (["--hidden", "100000000"], 2, "1,200,000,001 parameters in 2 layers, more than the 100,000"),
    (["--resume", "--overwrite"], 2, "argument --overwrite: not allowed with argument --resume"),
    (["--lr", "0"], 2, "learning rate must be a finite number > 0, got --lr 0.0"),
    (["--lr", "-0.1"], 2, "learning rate must be a finite number > 0"),
    (["--lr", "fast"], 2, "argument --lr: invalid float value: 'fast'"),
    (["--engine", "torch"], 2, "Unknown engine 'torch'. Use --engine chainrule"),
    (["--optimizer", "rmsprop"], 2, "Unknown optimizer 'rmsprop'. Use --optimizer sgd or"),
    (["--steps", "0"], 2, "must be a positive integer, got 0"),
    (["--steps", "5", "--epochs", "2"], 2, "not allowed with argument"),
    (["--batch-size", "5000"], 2, "batch size must be between 1 and the number of training"),
    (["--hidden", "12,x"], 2, "comma-separated list of layer sizes"),
    (["--devices", "64"], 2, "Asked for 64 device(s) but JAX sees"),
    (["--test-fraction", "1.5"], 2, "test fraction must be in [0, 1)"),
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


def _one_line_error(err: str, message: str) -> None:
    assert err.startswith("chainrule train: error: ") and "Traceback" not in err, err
    assert err.strip().count("\n") == 0, err  # one paragraph
    assert message in err, err


# --- the output folder: links, locking, temporaries, unwritable, full -------------------------


def test_outputs_never_write_through_a_planted_link(tmp_path, capsys):
    """Issue 12, item 12: fixed temporary names let a planted symlink redirect a write."""
    out, victims = tmp_path / "run", tmp_path / "victims"
    out.mkdir()
    victims.mkdir()
    names = ["summary.tmp", "loss_curve.tmp.png", "summary.json", "loss_curve.png"]
    for name in names:  # the old fixed temporary names, and the final names
        (victims / name).write_text("precious")
        (out / name).symlink_to(victims / name)
    assert _train(out, "--steps", "4", "--quiet") == 0
    for name in names:
        assert (victims / name).read_text() == "precious", name
    for name in ("summary.json", "loss_curve.png"):  # the link was replaced, not followed
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert not list(out.glob(".*.tmp"))


def test_a_second_run_on_the_same_out_fails_at_once(tmp_path, capsys):
    """Issue 12, item 13: two runs on one --out both exited 0; one run's checkpoints were lost."""
    fd = os.open(tmp_path / outdir.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the folder
        os.write(fd, b"4242\n")
        assert _train(tmp_path, "--steps", "4", "--quiet") == 2
        _, err = capsys.readouterr()
        _one_line_error(err, f"--out '{tmp_path}' is in use by another chainrule train run")
        assert "(process 4242)" in err and "pick another --out" in err
        assert not list(tmp_path.glob("ckpt-*"))
    finally:
        os.close(fd)
    assert _train(tmp_path, "--steps", "4", "--quiet") == 0  # free again


def test_a_second_process_on_the_same_out_fails(tmp_path):
    """The same with two real processes: the second fails while the first trains."""
    code = (
        "import sys; from chainrule.train import outdir; from pathlib import Path\n"
        "with outdir.locked(Path(sys.argv[1]), 'x'):\n"
        "    print('locked', flush=True); sys.stdin.readline()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run(
            [sys.executable, "-m", "chainrule", "train", "--out", str(tmp_path), "--quiet"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        holder.communicate("\n", timeout=60)
    assert proc.returncode == 2, proc.stderr
    _one_line_error(proc.stderr, f"(process {holder.pid})")


def test_stale_temporary_files_are_removed_at_start(tmp_path, capsys):
    """Issue 12, item 14: a kill -9 during a save left `.ckpt-*.tmp` files for ever."""
    stale = [".ckpt-00000020.npz.k3j_x9.tmp", ".summary.json.abc.tmp", ".loss_curve.png.q.tmp"]
    kept = ["notes.tmp", ".ckpt-notes.txt", "ckpt-old.npz.tmp.bak"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    assert _train(tmp_path, "--steps", "4", "--quiet") == 0
    assert "Removed 3 temporary file(s)" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in stale)
    assert all((tmp_path / name).exists() for name in kept)


@pytest.mark.parametrize("how", ["chmod", "mocked"])
def test_unwritable_out_is_a_clear_error(tmp_path, capsys, monkeypatch, how):
    """Issue 12, item 15: an existing but read-only --out gave a PermissionError traceback."""
    out = tmp_path / "readonly"
    out.mkdir()
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out.chmod(0o500)
    else:  # what a read-only folder does to any file created in it
        real_open = os.open

        def refuse(path, *args, **kwargs):
            if str(path).startswith(str(out)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
        monkeypatch.setattr(outdir.tempfile, "mkstemp", lambda **kw: refuse(kw["dir"]))
    try:
        assert _train(out, "--steps", "4", "--quiet") == 2
    finally:
        out.chmod(0o700)
    message = f"Cannot write in --out '{out}' (Permission denied). Pass a folder you can write to"
    _one_line_error(capsys.readouterr().err, message)


@pytest.mark.parametrize("what", ["checkpoint", "summary"])
def test_full_disk_is_a_clear_error(tmp_path, capsys, monkeypatch, what):
    """Issue 12, item 15: ENOSPC while saving gave a traceback."""
    full = OSError(errno.ENOSPC, "No space left on device")
    if what == "checkpoint":

        def savez(file, **arrays):
            file.write(b"PK\x03\x04 partial")
            raise full

        monkeypatch.setattr(ckpt_lib.np, "savez", savez)
        name = "ckpt-00000002.npz"
    else:
        atomic_write = outdir.atomic_write

        def write(path, write):
            if path.name == "summary.json":
                raise full
            return atomic_write(path, write)

        monkeypatch.setattr(outdir, "atomic_write", write)
        name = "summary.json"
    code = _train(tmp_path, "--steps", "4", "--checkpoint-every", "2", "--quiet")
    _, err = capsys.readouterr()
    assert code == 2
    _one_line_error(err, f"Cannot write {name} in --out '{tmp_path}' (No space left on device)")
    assert "Free disk space" in err
    assert not list(tmp_path.glob(".*.tmp"))  # no partial temporary file left


def test_a_diverging_run_exits_1_with_a_message(tmp_path, capsys):
    """Issue 12, item 15: a loss that became NaN/inf ended with `final loss nan` and exit 0."""
    assert _train(tmp_path, "--steps", "20", "--lr", "1e10", "--quiet") == 1
    _, err = capsys.readouterr()
    _one_line_error(err, "The training loss became inf at step 2 (of 20)")
    assert "Lower the learning rate (this run: --lr 1e+10)" in err
    assert not (tmp_path / "summary.json").exists()


# --- crafted checkpoints --------------------------------------------------------------------------


def _rewrite_checkpoint(path, edit_meta):
    """Rewrites a checkpoint's metadata with `edit_meta(meta)`, its arrays unchanged."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["__meta__"]))
    edit_meta(meta)
    arrays["__meta__"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


@pytest.fixture
def no_huge_model(monkeypatch):
    """Fails the test (instead of hanging it) when the run allocates a giant MLP."""
    mlp_init = loop.nn.mlp_init

    def guarded(key, sizes, *args, **kwargs):
        weights = sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        assert weights < 10**7, f"allocating an MLP of sizes {sizes}"
        return mlp_init(key, sizes, *args, **kwargs)

    monkeypatch.setattr(loop.nn, "mlp_init", guarded)


def test_crafted_checkpoint_metadata_is_refused_before_allocating(tmp_path, capsys, no_huge_model):
    """Issue 12, item 14: metadata claiming hidden=1e9 made --resume hang allocating it."""
    assert _train(tmp_path, "--steps", "2", "--checkpoint-every", "2", "--quiet") == 0
    ckpt = tmp_path / "ckpt-00000002.npz"
    _rewrite_checkpoint(ckpt, lambda meta: meta["extra"]["config"].update(hidden=[10**9]))
    capsys.readouterr()
    assert _train(tmp_path, "--resume", "--steps", "4", "--quiet") == 2
    _one_line_error(capsys.readouterr().err, "No readable checkpoint in")
    assert (tmp_path / "ckpt-00000002.npz").exists()  # not renamed when nothing else is left


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["extra"]["config"].update(hidden=[10**9]), "impossible hidden [1000000000]"),
        (lambda m: m["extra"]["config"].update(hidden=[50000, 50000]), "100,000,000 parameters"),
        (lambda m: m["extra"]["config"].update(seed=-5), "impossible seed -5"),
        (lambda m: m["extra"]["config"].update(lr="0.1"), "impossible lr '0.1'"),
        (lambda m: m["extra"]["config"].pop("batch_size"), "lacks the training options"),
        (lambda m: m["extra"].update(config=[1, 2]), "lacks the training options"),
        (lambda m: m.update(step=-3), "the step -3 is not a count of steps"),
    ],
)
def test_crafted_checkpoint_metadata_falls_back_to_the_previous(
    tmp_path, capsys, no_huge_model, edit, message
):
    assert _train(tmp_path, "--steps", "4", "--checkpoint-every", "2", "--quiet") == 0
    _rewrite_checkpoint(tmp_path / "ckpt-00000004.npz", edit)
    capsys.readouterr()
    assert _train(tmp_path, "--resume", "--steps", "6", "--quiet") == 0
    err = capsys.readouterr().err
    assert "ckpt-00000004.npz" in err and message in err, err
    assert "Resuming from" in err and "(step 2)" in err
    assert (tmp_path / "ckpt-00000004.npz.corrupt").exists()


def test_crafted_checkpoint_shapes_are_refused_before_reading(tmp_path, capsys):
    """Metadata that agrees with the options, arrays that do not: refused from the headers."""
    assert _train(tmp_path, "--steps", "2", "--checkpoint-every", "2", "--quiet") == 0
    hidden_6 = lambda meta: meta["extra"]["config"].update(hidden=[6])  # the options say 5
    _rewrite_checkpoint(tmp_path / "ckpt-00000002.npz", hidden_6)
    capsys.readouterr()
    assert _train(tmp_path, "--resume", "--quiet") == 2
    _one_line_error(
        capsys.readouterr().err,
        "params[0]['bias'] is float32[5] in the checkpoint but float32[6] in this run",
    )


def _zip_bomb(path, megabytes=100):
    """A checkpoint whose first parameter unpacks to `megabytes` MB of zeros (a few hundred kB)."""
    return rewrite_as_zip_bomb(path, path, megabytes)


def test_zip_bomb_checkpoint_is_refused_without_unpacking(tmp_path, capsys):
    """Issue 12, item 14: a 3 MB zip bomb used 3.3 GB before --resume failed."""
    assert _train(tmp_path, "--steps", "2", "--checkpoint-every", "2", "--quiet") == 0
    _zip_bomb(tmp_path / "ckpt-00000002.npz")
    assert (tmp_path / "ckpt-00000002.npz").stat().st_size < 1 << 20
    capsys.readouterr()
    assert _train(tmp_path, "--resume", "--quiet") == 2
    _one_line_error(capsys.readouterr().err, "bytes from a")


# --- Ctrl-C --------------------------------------------------------------------------------------


def test_ctrl_c_after_the_last_step_still_writes_the_results(tmp_path, capsys, monkeypatch):
    """Issue 12, item 16: Ctrl-C while evaluating said "interrupted before training started"."""
    evaluate = loop._evaluate

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args)

    monkeypatch.setattr(loop, "_evaluate", interrupted)
    assert _train(tmp_path, "--steps", "8", "--quiet") == 130
    out, err = capsys.readouterr()
    assert "Interrupted after the last step (8/8); the run is complete" in err
    assert "before training started" not in err and "Traceback" not in err
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 8
    assert (tmp_path / "loss_curve.png").exists() and "test loss" in out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_second_ctrl_c_while_saving_results_stops_at_once(tmp_path, capsys, monkeypatch):
    def second_ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_evaluate", second_ctrl_c)
    assert _train(tmp_path, "--steps", "8", "--quiet") == 130
    err = capsys.readouterr().err
    assert "Interrupted while saving the results of step 8/8" in err and "Traceback" not in err
    assert f"the last checkpoint is {tmp_path / 'ckpt-00000008.npz'}" in err


@pytest.mark.parametrize("disposition", ["default", "ignored"])
def test_ctrl_c_during_start_up_stops_the_run(tmp_path, capsys, monkeypatch, disposition):
    """Issue 12, item 16: Ctrl-C while loading data was swallowed; the run went on to exit 0.

    "ignored": started the way a shell starts a background job (SIGINT ignored),
    where today's run only listened to Ctrl-C during the training loop.
    """
    if disposition == "ignored":
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    load_dataset = loop.load_dataset

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return load_dataset(*args)

    monkeypatch.setattr(loop, "load_dataset", interrupted)
    try:
        assert _train(tmp_path, "--steps", "8", "--quiet") == 130
        if disposition == "ignored":  # the run's handler is gone, the old one back
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        if disposition == "ignored":
            signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert "Interrupted before training started; nothing was changed" in err
    assert not list(tmp_path.glob("ckpt-*")) and not (tmp_path / "summary.json").exists()


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, capsys, monkeypatch):
    """Issue 12, item 16: Ctrl-C before the first checkpoint, then --resume, was an error."""
    monkeypatch.setattr(loop, "load_dataset", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert _train(tmp_path, "--steps", "8", "--quiet") == 130
    monkeypatch.undo()
    assert _train(tmp_path, "--resume", "--steps", "8", "--quiet") == 0
    err = capsys.readouterr().err
    assert f"--resume: no checkpoint in {tmp_path} yet; starting a new run." in err
    assert json.loads((tmp_path / "summary.json").read_text())["start_step"] == 0


# --- the README's commands, default folders, --overwrite -----------------------------------------


def _readme_train_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Train from the command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_readme_commands_run_in_order(tmp_path, capsys, monkeypatch):
    """Issue 12, item 17: the README's second `chainrule train` failed (the folder held a run)."""
    pytest.importorskip("sklearn")
    commands = _readme_train_commands()
    assert len(commands) >= 4 and all(c[:2] == ["chainrule", "train"] for c in commands)
    monkeypatch.chdir(tmp_path)
    for name in ("teacher", "digits"):  # the same commands, shorter runs
        monkeypatch.setitem(config.DEFAULTS[name], "epochs", 1)
    rng = np.random.default_rng(0)
    rows = "".join(f"{a:.3f},{b:.3f},{int(a > b)}\n" for a, b in rng.standard_normal((40, 2)))
    (tmp_path / "my.csv").write_text("f1,f2,label\n" + rows)
    for command in commands:
        code = cli.main([*command[1:], "--quiet"])
        err = capsys.readouterr().err
        assert code == 0, (command, err)
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["digits-chainrule", "digits-jax", "my-chainrule", "teacher-chainrule"]
    with open(os.path.join(ROOT, ".gitignore"), encoding="utf-8") as f:
        assert "/runs/" in f.read().split()


def test_overwrite_replaces_an_earlier_run(tmp_path, capsys):
    assert _train(tmp_path, "--steps", "6", "--quiet") == 0
    assert _train(tmp_path, "--steps", "4", "--quiet") == 2
    _one_line_error(capsys.readouterr().err, "Add --resume to continue that run, --overwrite to")
    assert _train(tmp_path, "--steps", "4", "--overwrite", "--quiet") == 0
    assert "--overwrite: deleted the earlier run's" in capsys.readouterr().err
    names = sorted(p.name for p in tmp_path.glob("ckpt-*"))
    assert names == ["ckpt-00000003.npz", "ckpt-00000004.npz"]  # the 6-step run's are gone
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 4


def test_default_out_is_per_data_set_and_engine():
    assert str(config.default_out(None, "chainrule")) == os.path.join("runs", "teacher-chainrule")
    assert str(config.default_out("digits", "jax")) == os.path.join("runs", "digits-jax")
    assert str(config.default_out("data/x.v2.npz", "jax")) == os.path.join("runs", "x.v2-jax")


# --- gradient flow and --check-finite (issue 18) ------------------------------------------------


def test_the_summary_records_the_gradient_flow_per_epoch(tmp_path, capsys):
    assert _train(tmp_path, "--steps", "30", "--quiet") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    flow = summary["gradient_flow"]
    steps_per_epoch = round(summary["steps"] / summary["epochs"])
    assert [f["step"] for f in flow] == sorted({*range(steps_per_epoch, 31, steps_per_epoch), 30})
    layers = flow[-1]["layers"]
    assert set(layers) == {"[0]['weight']", "[0]['bias']", "[1]['weight']", "[1]['bias']"}
    for values in layers.values():
        assert values["grad_norm"] > 0 and 0 < values["update_ratio"] < 1
    assert (tmp_path / "grad_flow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "grad flow" in capsys.readouterr().out


def test_the_flow_metrics_are_the_norms_of_jax_grads_gradient():
    import jax
    import jax.numpy as jnp
    import optax

    from chainrule.train.step import make_train_step

    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.2])}
    batch = (jnp.ones((4, 2)), jnp.zeros((4, 2)))

    def loss(p, batch):
        return jnp.mean((batch[0] @ p["w"] + p["b"] - batch[1]) ** 2)

    step = make_train_step(loss, optax.sgd(0.1), engine="chainrule", donate=False)
    new, _, metrics = step(params, optax.sgd(0.1).init(params), batch)
    grads = jax.grad(loss)(params, batch)
    for k in params:
        np.testing.assert_allclose(metrics["flow"]["grad_norm"][k], jnp.linalg.norm(grads[k]))
        ratio = jnp.linalg.norm(0.1 * grads[k]) / jnp.linalg.norm(new[k])
        np.testing.assert_allclose(metrics["flow"]["update_ratio"][k], ratio, rtol=1e-6)


def test_check_finite_stops_at_the_first_nan_gradient_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys
):
    # huge features: the loss overflows, and the weights' cotangent (x^T g) with it
    rows = ["x1,x2,target"] + [f"{i + 1}e29,{1 - i / 10},{i % 3}" for i in range(32)]
    data = tmp_path / "extreme.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    code = _train(
        out, "--data", str(data), "--batch-size", "16", "--test-fraction", "0.5",
        "--steps", "5", "--quiet", "--check-finite",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1, err
    assert "--check-finite: a gradient became NaN or infinite at step 1" in err
    assert "the backward pass produced a non-finite cotangent at" in err
    assert "Likely cause:" in err and "nothing saved" in err
    assert not list(out.glob("ckpt-*.npz"))  # no checkpoint of a diverged state
    assert "jax.debug.callback failed" not in err  # the report is the error, logged once


def test_check_finite_needs_the_chainrule_engine(tmp_path, capsys):
    assert _train(tmp_path, "--engine", "jax", "--check-finite", "--quiet") == 2
    assert "--check-finite watches chainrule's own backward pass" in capsys.readouterr().err
