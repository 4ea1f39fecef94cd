"""`chainrule train --model cnn`: the small CNN on the digits, both engines, same numbers.

The default run does a shortened training (both engines, parameters equal to
float32 rounding); the full run (the 98% test accuracy of the README) is
marked slow.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chainrule as cr
from chainrule import cli, nn
from tests.oracle import emitted

pytest.importorskip("sklearn")  # `digits` is an optional extra


def _train(out, *args):
    return cli.main(["train", "--out", str(out), "--data", "digits", "--model", "cnn", *args])


def _arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k != "__meta__"}


def test_cnn_emits_convolutions_and_max_pooling_and_has_jax_gradients():
    params = nn.cnn_init(jax.random.key(0), 8)
    x = jax.random.uniform(jax.random.key(1), (5, 64), jnp.float32)
    labels = jnp.arange(5)
    loss = lambda p: nn.softmax_cross_entropy(nn.cnn_apply(p, x), labels)  # noqa: E731
    assert {"conv_general_dilated", "reduce_window_max"} <= emitted(loss, params)
    want = jax.grad(loss)(params)
    for grad in (cr.grad(loss), jax.jit(cr.grad(loss))):
        got = grad(params)
        jax.tree_util.tree_map(
            lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want
        )


def test_shortened_run_engines_agree_to_float32_rounding(tmp_path, capsys):
    steps = ["--steps", "60", "--quiet"]
    assert _train(tmp_path / "cr", "--engine", "chainrule", *steps) == 0
    out = capsys.readouterr().out
    assert "CNN channels [16, 32]" in out and "test accuracy" in out
    assert _train(tmp_path / "jax", "--engine", "jax", *steps) == 0
    a, b = (
        _arrays(tmp_path / "cr" / "ckpt-00000060.npz"),
        _arrays(tmp_path / "jax" / "ckpt-00000060.npz"),
    )
    assert sorted(a) == sorted(b) and any(v.shape == (16, 1, 3, 3) for v in a.values())
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    summaries = [json.loads((tmp_path / e / "summary.json").read_text()) for e in ("cr", "jax")]
    assert all(s["model"] == "cnn" for s in summaries)
    assert summaries[0]["test_accuracy"] == pytest.approx(summaries[1]["test_accuracy"], abs=0.01)
    # it learns: below half the loss of guessing (log 10) after 60 steps
    assert summaries[0]["final_loss"] < np.log(10) / 2


def test_resume_keeps_the_model(tmp_path, capsys):
    assert _train(tmp_path, "--steps", "3", "--quiet") == 0
    resumed = ["train", "--out", str(tmp_path), "--data", "digits", "--resume", "--quiet"]
    assert cli.main([*resumed, "--steps", "4"]) == 0  # the checkpoint's model: the CNN
    assert "CNN channels [16, 32]" in capsys.readouterr().out
    assert cli.main([*resumed, "--steps", "5", "--model", "mlp"]) == 2
    assert "--model 'mlp' but the checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "teacher", "--model", "cnn"], "10 features, not a square number"),
        (["--data", "digits", "--model", "cnn", "--hidden", "16"], "two numbers, got [16]"),
        (["--data", "digits", "--model", "resnet"], "Use --model mlp or --model cnn"),
    ],
)
def test_bad_cnn_options_get_a_clear_message(tmp_path, capsys, args, message):
    assert cli.main(["train", "--out", str(tmp_path), "--steps", "2", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["chainrule", "jax"])
def test_full_run_reaches_98_percent_test_accuracy(tmp_path, capsys, engine):
    assert _train(tmp_path, "--engine", engine, "--quiet") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.98, capsys.readouterr().out
