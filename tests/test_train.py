"""chainrule.train: the jitted step (engines, optimizers, donation, no recompiles, data
parallel), checkpoints (atomic, pickle-free, corruption), data sets and the batch order."""

import json
import os
import re
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chainrule import nn, train
from chainrule.train import checkpoint as ckpt_lib
from chainrule.train import outdir
from tests.conftest import ROOT

F32 = {"rtol": 1e-5, "atol": 1e-6}
SIZES = [16, 32, 4]  # one small architecture for every test, so compilations are reused


def _problem(seed=0, n=64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SIZES[0])).astype(np.float32)
    labels = (x[:, :4].argmax(axis=1)).astype(np.int32)  # learnable
    return x, labels


def _loss(params, batch):
    x, labels = batch
    return nn.softmax_cross_entropy(nn.mlp_apply(params, x), labels)


def _params(seed=0):
    return nn.mlp_init(jax.random.key(seed), SIZES, jnp.float32)


def _train(engine, optimizer, steps=20, donate=True, batch_size=16):
    x, labels = _problem()
    step = train.make_train_step(_loss, optimizer, engine=engine, donate=donate)
    params = _params()
    state = optimizer.init(params)
    losses = []
    for i in range(steps):
        j = (i * batch_size) % len(x)
        params, state, metrics = step(
            params, state, (x[j : j + batch_size], labels[j : j + batch_size])
        )
        losses.append(float(metrics["loss"]))
    return params, state, losses


def _assert_trees_close(a, b, **tol):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for u, v in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


# --- the step ----------------------------------------------------------------------------------


def test_sgd_step_is_the_textbook_update():
    """The tutorial's first case: w=1, x=1, y=2: dloss/dw = -2, so SGD(0.1) gives 1.2."""
    loss = lambda w, batch: jnp.mean((w * batch[0] - batch[1]) ** 2)
    opt = optax.sgd(0.1)
    step = train.make_train_step(loss, opt, engine="chainrule", donate=False)
    w = jnp.float32(1.0)
    w, _, metrics = step(w, opt.init(w), (jnp.ones(1, jnp.float32), jnp.full(1, 2.0, jnp.float32)))
    assert float(metrics["loss"]) == 1.0
    assert float(metrics["grad_norm"]) == 2.0
    assert float(w) == pytest.approx(1.2, rel=1e-7)


@pytest.mark.parametrize("make_opt", [lambda: optax.sgd(0.1), lambda: optax.adam(1e-2)])
def test_engines_agree_after_many_steps(make_opt):
    p_cr, s_cr, l_cr = _train("chainrule", make_opt())
    p_jax, s_jax, l_jax = _train("jax", make_opt())
    _assert_trees_close(p_cr, p_jax, **F32)
    _assert_trees_close(s_cr, s_jax, **F32)
    np.testing.assert_allclose(l_cr, l_jax, **F32)
    assert l_cr[-1] < l_cr[0]  # it trains


def test_adam_step_matches_a_hand_written_optax_loop():
    opt = optax.adam(1e-2)
    params, _, _ = _train("chainrule", opt, steps=5)
    x, labels = _problem()
    ref = _params()
    state = opt.init(ref)
    grad = jax.jit(jax.grad(_loss))
    for i in range(5):
        j = (i * 16) % len(x)
        updates, state = opt.update(grad(ref, (x[j : j + 16], labels[j : j + 16])), state, ref)
        ref = optax.apply_updates(ref, updates)
    _assert_trees_close(params, ref, **F32)


def test_matches_the_pytorch_training_step():
    """The tutorial's training step: Sequential(Linear(10,5), ReLU, Linear(5,1)), MSE, SGD 0.01."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    x, y = torch.randn(32, 10), torch.randn(32, 1)
    params = [
        {
            "weight": jnp.asarray(m.weight.detach().numpy()),
            "bias": jnp.asarray(m.bias.detach().numpy()),
        }
        for m in (model[0], model[2])
    ]
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = torch.nn.MSELoss()(model(x), y)
    loss.backward()
    sgd.step()

    mse = lambda p, b: nn.mse_loss(nn.mlp_apply(p, b[0]), b[1])
    step = train.make_train_step(mse, optax.sgd(0.01), engine="chainrule")
    new, _, metrics = step(params, optax.sgd(0.01).init(params), (x.numpy(), y.numpy()))
    np.testing.assert_allclose(metrics["loss"], loss.item(), **F32)
    for ours, m in zip(new, (model[0], model[2]), strict=True):
        np.testing.assert_allclose(ours["weight"], m.weight.detach().numpy(), **F32)
        np.testing.assert_allclose(ours["bias"], m.bias.detach().numpy(), **F32)


@pytest.mark.parametrize("engine", ["chainrule", "jax"])
def test_second_call_does_not_recompile_or_retrace(engine):
    traces = []

    def loss(params, batch):
        traces.append(1)  # Python runs only while tracing
        return _loss(params, batch)

    opt = optax.adam(1e-3)
    step = train.make_train_step(loss, opt, engine=engine)
    x, labels = _problem()
    params = _params()
    state = opt.init(params)
    counts = []
    for i in range(3):
        batch = (x[i * 16 : (i + 1) * 16], labels[i * 16 : (i + 1) * 16])
        params, state, _ = step(params, state, batch)
        counts.append(len(traces))
    # chainrule may run the loss more than once while tracing (dynamic front end, then replay),
    # but only during the first call.
    assert counts[0] >= 1 and counts[1] == counts[2] == counts[0]
    assert step._cache_size() == 1


def test_donation_consumes_inputs_only_when_asked():
    opt = optax.sgd(0.1)
    x, labels = _problem()
    for donate in (True, False):
        step = train.make_train_step(_loss, opt, engine="jax", donate=donate)
        params = _params()
        state = opt.init(params)
        new, _, _ = step(params, state, (x[:16], labels[:16]))
        assert params[0]["weight"].is_deleted() is donate
        assert not new[0]["weight"].is_deleted()


def test_has_aux_adds_metrics():
    def loss(params, batch):
        logits = nn.mlp_apply(params, batch[0])
        return nn.softmax_cross_entropy(logits, batch[1]), {"acc": nn.accuracy(logits, batch[1])}

    opt = optax.sgd(0.1)
    step = train.make_train_step(loss, opt, engine="chainrule", has_aux=True)
    x, labels = _problem()
    params = _params()
    _, _, metrics = step(params, opt.init(params), (x[:16], labels[:16]))
    assert set(metrics) == {"loss", "grad_norm", "flow", "acc"}
    assert 0.0 <= float(metrics["acc"]) <= 1.0


def test_bad_engine_and_optimizer_options():
    with pytest.raises(train.ConfigError, match="Unknown engine 'torch'.*chainrule.*jax"):
        train.make_train_step(_loss, optax.sgd(0.1), engine="torch")
    for lr in (0.0, -1.0, float("nan")):
        with pytest.raises(train.ConfigError, match="learning rate must be a finite number > 0"):
            train.make_optimizer("sgd", lr)
    with pytest.raises(train.ConfigError, match="Unknown optimizer 'rmsprop'"):
        train.make_optimizer("rmsprop", 0.1)
    assert isinstance(train.make_optimizer("adam", 1e-3), optax.GradientTransformation)
    with pytest.raises(train.ConfigError, match="JAX sees 1"):
        train.data_mesh(jax.device_count() + 1)


_DATA_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from chainrule import cli, nn, train

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    labels = x[:, :4].argmax(axis=1).astype(np.int32)
    loss = lambda p, b: nn.softmax_cross_entropy(nn.mlp_apply(p, b[0]), b[1])
    opt = optax.adam(1e-2)
    out = {}
    for n in (1, 4):
        mesh = train.data_mesh(n)
        step = train.make_train_step(loss, opt, engine="chainrule", mesh=mesh)
        params = train.replicate(nn.mlp_init(jax.random.key(0), [16, 32, 4]), mesh)
        state = train.replicate(opt.init(params), mesh)
        for i in range(8):
            j = (i * 16) % 64
            batch = train.shard_batch((x[j : j + 16], labels[j : j + 16]), mesh)
            params, state, metrics = step(params, state, batch)
        w = params[0]["weight"]
        out[n] = {
            "params": [np.asarray(l).tolist() for l in jax.tree_util.tree_leaves(params)],
            "loss": float(metrics["loss"]),
            "batch_shard_rows": [s.data.shape[0] for s in batch[0].addressable_shards],
            "param_devices": len(w.sharding.device_set),
            "replicated": bool(w.sharding.is_fully_replicated),
            "cache_size": step._cache_size(),
        }
    codes = [
        cli.main(["train", "--steps", "12", "--devices", str(n), "--out", sys.argv[1] + f"/d{n}",
                  "--quiet", "--checkpoint-every", "12"])
        for n in (4, 1)
    ]
    out["cli_codes"] = codes
    print("RESULT" + json.dumps(out))
    """
)


def test_data_parallel_on_four_simulated_devices_matches_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", CI="true")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _DATA_PARALLEL_SCRIPT, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    one, four = result["1"], result["4"]
    assert four["batch_shard_rows"] == [4, 4, 4, 4]  # the batch is split over 4 devices
    assert one["batch_shard_rows"] == [16]
    assert four["param_devices"] == 4 and four["replicated"]  # weights on all, whole
    assert one["cache_size"] == four["cache_size"] == 1
    np.testing.assert_allclose(four["loss"], one["loss"], **F32)
    for a, b in zip(four["params"], one["params"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **F32)
    # The command line too: --devices 4 ends where --devices 1 does.
    assert result["cli_codes"] == [0, 0]
    p4 = np.load(tmp_path / "d4" / "ckpt-00000012.npz", allow_pickle=False)
    p1 = np.load(tmp_path / "d1" / "ckpt-00000012.npz", allow_pickle=False)
    assert json.loads(str(p4["__meta__"]))["params"] == json.loads(str(p1["__meta__"]))["params"]
    for key in p1.files:
        if key.startswith("params/"):
            np.testing.assert_allclose(p4[key], p1[key], **F32)


# --- checkpoints -------------------------------------------------------------------------------


def _adam_state():
    opt = optax.adam(1e-2)
    params, state, _ = _train("jax", opt, steps=3, donate=False)
    return opt, params, state


def test_checkpoint_round_trip_without_pickle(tmp_path):
    opt, params, state = _adam_state()
    history = np.arange(5, dtype=np.float32)
    path = train.save_checkpoint(tmp_path, 3, params, state, {"seed": 7, "loss_history": history})
    assert path.name == "ckpt-00000003.npz"
    # Readable by plain numpy without pickle; metadata is JSON of key paths.
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["__meta__"]))
        assert all(f[k].dtype.kind != "O" for k in f.files)
    assert meta["step"] == 3 and meta["params"][0] == "[0]['bias']"
    assert any("mu" in p for p in meta["opt_state"])  # Adam's first moment is in there
    fresh = _params(seed=1)
    step, p2, s2, extra = train.load_checkpoint(path, fresh, opt.init(fresh))
    assert step == 3 and extra["seed"] == 7
    np.testing.assert_array_equal(extra["loss_history"], history)
    leaves, restored = jax.tree.leaves((params, state)), jax.tree.leaves((p2, s2))
    for a, b in zip(leaves, restored, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert jax.tree_util.tree_structure(s2) == jax.tree_util.tree_structure(state)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_checkpoint_keeps_the_newest_two(tmp_path):
    params = {"w": np.ones(3, np.float32)}
    for step in (1, 2, 10, 3):
        train.save_checkpoint(tmp_path, step, params, ())
    names = [p.name for p in train.list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000010.npz", "ckpt-00000003.npz"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    params = {"w": np.ones(3, np.float32)}
    good = train.save_checkpoint(tmp_path, 1, params, ())
    before = good.read_bytes()

    def crash(file, **arrays):  # a crash half-way through writing
        file.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_lib.np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(tmp_path, 2, {"w": np.zeros(3, np.float32)}, ())
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.npz"]  # no partial file, no temp file
    assert good.read_bytes() == before


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, damage):
    params = {"w": np.arange(1000, dtype=np.float32)}
    train.save_checkpoint(tmp_path, 1, params, ())
    newest = train.save_checkpoint(tmp_path, 2, {"w": params["w"] + 1}, ())
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # inside the stored array: the zip CRC catches it
        i = data.index(np.float32(500).tobytes())
        newest.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    elif damage == "garbage":
        newest.write_bytes(b"not a zip file at all")
    else:
        newest.write_bytes(b"")
    with pytest.raises(train.CheckpointError, match="ckpt-00000002.npz.*(truncated|corrupted)"):
        train.read_checkpoint(newest)
    ckpt, problems = train.latest_checkpoint(tmp_path)
    assert ckpt.step == 1 and [p.name for p, _ in problems] == ["ckpt-00000002.npz"]
    restored, _ = ckpt.restore(params, ())
    np.testing.assert_array_equal(restored["w"], params["w"])


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(train.CheckpointError, match="no checkpoint"):
        train.latest_checkpoint(tmp_path)
    (tmp_path / "ckpt-00000005.npz").write_bytes(b"junk")
    with pytest.raises(train.CheckpointError, match="No readable checkpoint.*ckpt-00000005"):
        train.latest_checkpoint(tmp_path)


def test_checkpoint_structure_mismatch(tmp_path):
    path = train.save_checkpoint(tmp_path, 1, {"w": np.ones(3, np.float32)}, ())
    with pytest.raises(train.CheckpointMismatchError, match="different structure"):
        train.load_checkpoint(path, {"v": np.ones(3, np.float32)}, ())
    with pytest.raises(train.CheckpointMismatchError, match=r"float32\[3\].*float32\[4\]"):
        train.load_checkpoint(path, {"w": np.ones(4, np.float32)}, ())


def test_pickled_npz_is_refused(tmp_path):
    bad = tmp_path / "ckpt-00000001.npz"
    np.savez(bad, __meta__=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(train.CheckpointError, match="ckpt-00000001.npz"):
        train.read_checkpoint(bad)
    assert zipfile.is_zipfile(bad)


# --- data ---------------------------------------------------------------------------------------


def test_batch_order_is_a_pure_function_of_seed_and_step():
    order = train.BatchOrder(n=10, batch_size=3, seed=5)
    assert order.steps_per_epoch == 3
    epoch0 = np.concatenate([order.indices(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # no repeats inside an epoch
    late = train.BatchOrder(10, 3, 5).indices(7)  # a fresh object (a resumed run) agrees
    np.testing.assert_array_equal(late, order.indices(7))
    assert not np.array_equal(order.indices(0), order.indices(3))  # epochs reshuffle
    assert not np.array_equal(order.indices(0), train.BatchOrder(10, 3, 6).indices(0))
    with pytest.raises(train.DataError, match="batch size"):
        train.BatchOrder(10, 11, 0)


def test_builtin_datasets():
    t = train.teacher_dataset()
    assert t.task == "regression" and t.n_features == 10 and t.n_outputs == 1
    assert t.x_train.dtype == np.float32 and len(t.x_test) == 256
    np.testing.assert_array_equal(t.y_train, train.teacher_dataset().y_train)  # fixed teacher
    assert 0.3 < float(np.std(t.y_train)) < 10
    d = train.digits_dataset()
    assert d.task == "classification" and d.n_features == 64 and d.n_outputs == 10
    assert len(d.x_train) + len(d.x_test) == 1797 and len(d.x_test) == 359
    assert d.x_train.min() >= 0 and d.x_train.max() <= 1 and d.y_train.dtype == np.int32


def test_load_csv_and_npz(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i},{-i},{i % 3}\n" for i in range(10)))
    ds = train.load_dataset(str(csv), test_fraction=0.2)
    assert ds.task == "classification" and ds.num_classes == 3 and ds.n_features == 2
    assert len(ds.x_train) == 8 and len(ds.x_test) == 2
    assert set(ds.x_train[:, 0] + ds.x_train[:, 1]) == {0.0}  # features stay in their columns

    reg = tmp_path / "r.csv"
    reg.write_text("target_1,x,target_2\n1,2,3\n4,5,6\n7,8,9\n")
    ds = train.load_dataset(str(reg), test_fraction=0.0)
    assert ds.task == "regression" and ds.n_outputs == 2 and ds.n_features == 1
    np.testing.assert_array_equal(np.sort(ds.x_train[:, 0]), [2, 5, 8])

    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.ones((20, 4)), target=np.zeros(20))
    ds = train.load_dataset(str(npz))
    assert ds.task == "regression" and ds.y_train.shape == (16, 1)


# --- bounded checkpoint reads (issue 12, item 14) ------------------------------------------------


def rewrite_as_zip_bomb(src, dst, megabytes):
    """Copies checkpoint `src` to `dst` with `params/0` replaced by `megabytes` MB of
    deflated zeros (a few hundred kB on disk). Also used by tests/test_cli.py."""
    with zipfile.ZipFile(src) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    header = np.lib.format.header_data_from_array_1_0(np.zeros(0, np.float32))
    header["shape"] = (megabytes * (1 << 20) // 4,)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            if name != "params/0.npy":
                zf.writestr(name, data)
                continue
            with zf.open(name, "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                chunk = bytes(1 << 20)
                for _ in range(megabytes):
                    f.write(chunk)
    return dst


def _bomb(path, megabytes=64):
    """A valid checkpoint whose `params/0` is replaced by `megabytes` MB of deflated zeros."""
    train.save_checkpoint(path.parent, 1, {"w": np.ones(3, np.float32)}, ())
    return rewrite_as_zip_bomb(ckpt_lib.checkpoint_path(path.parent, 1), path, megabytes)


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("how", ["read_checkpoint", "read_header", "expected", "latest"])
def test_zip_bomb_is_refused_before_unpacking(tmp_path, how):
    bomb = _bomb(tmp_path / "ckpt-00000002.npz")
    assert bomb.stat().st_size < (1 << 20)
    expected = train.Expected({"w": jax.ShapeDtypeStruct((3,), np.float32)}, ())

    def read():
        with pytest.raises(train.CheckpointError, match=r"unpack to 67,1\d\d,\d\d\d bytes from a"):
            if how == "read_checkpoint":
                train.read_checkpoint(bomb)
            elif how == "read_header":
                train.read_header(bomb)
            elif how == "expected":
                train.read_checkpoint(bomb, expected)
            else:
                ckpt, problems = train.latest_checkpoint(tmp_path)  # falls back to step 1
                assert ckpt.step == 1 and problems[0][0] == bomb
                raise train.CheckpointError(problems[0][1])

    assert _peak_bytes(read) < 8 << 20  # 64 MB if it were unpacked


def test_declared_sizes_must_agree_with_the_npy_headers(tmp_path):
    path = train.save_checkpoint(tmp_path, 1, {"w": np.ones(3, np.float32)}, ())
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    members["params/0.npy"] += bytes(64)  # more bytes than the header's float32[3]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(train.CheckpointError, match="params/0.npy declares 204 bytes but its"):
        train.read_checkpoint(path)


def test_expected_shapes_are_checked_before_any_array_is_read(tmp_path, monkeypatch):
    params = {"w": np.ones((3, 4), np.float32)}
    path = train.save_checkpoint(tmp_path, 1, params, (), {"loss_history": np.zeros(1, np.float32)})
    reads = []
    read_array = np.lib.format.read_array
    monkeypatch.setattr(
        np.lib.format, "read_array", lambda f, **kw: reads.append(f.name) or read_array(f, **kw)
    )
    history = {"loss_history": jax.ShapeDtypeStruct((1,), np.float32)}
    for wrong, match in [
        ({"w": jax.ShapeDtypeStruct((3, 5), np.float32)}, r"float32\[3, 4\].*float32\[3, 5\]"),
        ({"v": jax.ShapeDtypeStruct((3, 4), np.float32)}, "different structure"),
    ]:
        with pytest.raises(train.CheckpointMismatchError, match=match):
            train.read_checkpoint(path, train.Expected(wrong, (), history))
    with pytest.raises(train.CheckpointMismatchError, match="'loss_history' that this run"):
        train.read_checkpoint(path, train.Expected(params, ()))
    assert reads == ["__meta__.npy"] * 3  # only the metadata was read
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    ckpt = train.read_checkpoint(path, train.Expected(abstract, (), history))
    restored, _ = ckpt.restore(abstract, ())  # abstract templates are enough to restore
    np.testing.assert_array_equal(restored["w"], params["w"])


# --- the output folder (issue 12, items 12-14) ----------------------------------------------------


def test_atomic_write_replaces_a_planted_link_and_leaves_no_temporary(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    final = tmp_path / "out" / "summary.json"
    final.symlink_to(victim)
    outdir.atomic_write(final, lambda f: f.write(b"{}"))
    assert victim.read_text() == "precious"
    assert not final.is_symlink() and final.read_text() == "{}"
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(path, "w")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        outdir.atomic_write(final, fail)
    assert final.read_text() == "{}" and sorted(os.listdir(tmp_path / "out")) == ["summary.json"]


def test_folder_lock_is_exclusive_and_released(tmp_path):
    with outdir.locked(tmp_path, "--out 'x'"):
        assert (tmp_path / outdir.LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(
            train.ConfigError, match=rf"--out 'x' is in use .*process {os.getpid()}"
        ):
            with outdir.locked(tmp_path, "--out 'x'"):
                pass
    with outdir.locked(tmp_path, "--out 'x'"):  # released
        pass
    (tmp_path / outdir.LOCK_NAME).unlink()
    (tmp_path / outdir.LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(train.OutputError, match="is a symbolic link"):
        with outdir.locked(tmp_path, "--out 'x'"):
            pass
    assert not (tmp_path / "elsewhere").exists()


def test_a_killed_save_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    code = textwrap.dedent(
        """
        import os, sys, numpy as np
        from chainrule.train import checkpoint
        def savez(f, **arrays):
            f.write(b"PK partial")
            os._exit(9)  # killed half-way through a save
        checkpoint.np.savez = savez
        checkpoint.save_checkpoint(sys.argv[1], 5, {"w": np.ones(3, np.float32)}, ())
        """
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, timeout=120)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".ckpt-00000005.npz.") and left[0].endswith(".tmp")
    (tmp_path / "notes.tmp").write_text("mine")
    assert [p.name for p in outdir.remove_stale_temporaries(tmp_path)] == left
    assert [p.name for p in tmp_path.iterdir()] == ["notes.tmp"]


# --- data: values that do not fit (issue 12, item 15) ---------------------------------------------


def test_values_too_large_for_float32_are_rejected(tmp_path):
    for row, what in [("1e39,1", "the features"), ("1,-1e39", "`target`")]:
        path = tmp_path / "d.csv"
        path.write_text(f"a,target\n1,2\n3,4\n{row}\n")
        with pytest.raises(train.DataError, match=f"{re.escape(what)} contains 1 NaN or inf"):
            train.load_dataset(str(path))
    np.savez(tmp_path / "d.npz", x=np.full((3, 2), 1e300), target=np.zeros(3))
    with pytest.raises(train.DataError, match="do not fit in float32"):
        train.load_dataset(str(tmp_path / "d.npz"))


def test_labels_are_bounded_before_any_cast(tmp_path):
    for labels in (np.array([0, 1, 2**40]), np.array([0.0, 1.0, 1e30])):
        np.savez(tmp_path / "d.npz", x=np.ones((3, 2)), label=labels)
        with pytest.raises(train.DataError, match="at most 100,000 are supported"):
            train.load_dataset(str(tmp_path / "d.npz"))
    np.savez(
        tmp_path / "d.npz", x=np.ones((3, 2)), label=np.array([0, 1, train.data.MAX_CLASSES - 1])
    )
    assert train.load_dataset(str(tmp_path / "d.npz")).num_classes == train.data.MAX_CLASSES


def test_csv_encodings(tmp_path):
    rows = "a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(10))
    (tmp_path / "bom.csv").write_bytes(rows.encode("utf-8-sig"))  # Excel's "CSV UTF-8"
    assert train.load_dataset(str(tmp_path / "bom.csv")).task == "classification"
    latin1 = "caf\xe9,label\n1,0\n".encode("latin-1")
    for name, data, match in [
        ("utf16.csv", rows.encode("utf-16"), "UTF-16 text"),
        ("latin1.csv", latin1, r"not UTF-8 text \(it has the byte 0xe9\)"),
    ]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(train.DataError, match=match):
            train.load_dataset(str(tmp_path / name))
