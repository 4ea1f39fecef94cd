"""chainrule.interop: state_dict <-> pytree, and the one-step comparison report against PyTorch.

The model here is not one of the tutorials': three Linear layers with tanh and
softmax cross-entropy. Tests that run PyTorch ask for it with importorskip;
the rest run without it.
"""

import copy
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chainrule.interop import (
    StateDictMismatchError,
    TorchNotInstalledError,
    check_names_and_shapes,
    compare_arrays,
    compare_step,
    import_torch,
    pytree_to_state_dict,
    state_dict_to_pytree,
    tolerance_for,
    ulp_distance,
)

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


def tanh_net(params, x):
    """nn.Sequential(Linear(8, 16), Tanh(), Linear(16, 12), Tanh(), Linear(12, 4))."""
    for i, name in enumerate(["0", "2", "4"]):
        x = x @ params[f"{name}.weight"].T + params[f"{name}.bias"]
        if i < 2:
            x = jnp.tanh(x)
    return x


def cross_entropy(params, x, labels):
    """nn.CrossEntropyLoss(): mean over the batch of -log softmax(logits)[label]."""
    logp = jax.nn.log_softmax(tanh_net(params, x), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def cross_entropy_summed(params, x, labels):  # wrong: a sum where torch takes the mean
    logp = jax.nn.log_softmax(tanh_net(params, x), axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def cross_entropy_no_first_tanh(params, x, labels):  # wrong: activation forgotten in layer 0
    h = x @ params["0.weight"].T + params["0.bias"]
    h = jnp.tanh(h @ params["2.weight"].T + params["2.bias"])
    logp = jax.nn.log_softmax(h @ params["4.weight"].T + params["4.bias"], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


@pytest.fixture(scope="module")
def torch_case():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)
    )
    x = torch.randn(16, 8, generator=g)
    labels = torch.randint(0, 4, (16,), generator=g)
    return torch, model, nn.CrossEntropyLoss(), x, labels


# --------------------------------------------------------------------------- without torch


def test_importing_interop_does_not_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import chainrule.interop as i, numpy as np\n"
        "t = i.state_dict_to_pytree({'0.weight': np.ones((2, 3), np.float32)})\n"
        "assert t['0.weight'].shape == (2, 3)\n"
        "try:\n    i.pytree_to_state_dict(t)\nexcept i.TorchNotInstalledError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install torch==2.13.0" in out.stdout


@pytest.mark.parametrize(
    "call",
    [
        lambda: import_torch(),
        lambda: pytree_to_state_dict({"w": np.zeros(2)}),
        lambda: compare_step(None, None, cross_entropy, None, np.zeros((1, 8)), np.zeros(1)),
    ],
)
def test_live_functions_without_torch_raise_a_clear_error(monkeypatch, call):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(TorchNotInstalledError, match=r"pip install torch==2\.13\.0") as e:
        call()
    assert isinstance(e.value, ImportError)


def test_state_dict_to_pytree_keeps_names_order_layout_and_casts_floats_only():
    sd = {
        "fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),  # (out, in)
        "fc.bias": np.float32([1, 2]),
        "bn.num_batches_tracked": np.int64(3),
    }
    tree = state_dict_to_pytree(sd, dtype=jnp.float64)
    assert list(tree) == list(sd)
    assert tree["fc.weight"].shape == (2, 3) and tree["fc.weight"].dtype == jnp.float64
    np.testing.assert_array_equal(tree["fc.weight"], sd["fc.weight"])
    assert jnp.issubdtype(tree["bn.num_batches_tracked"].dtype, jnp.integer)


def test_nested_or_non_dict_trees_are_rejected_with_the_fix():
    with pytest.raises(TypeError, match=r"nested dict; use dotted keys like 'fc.weight'"):
        state_dict_to_pytree({"fc": {"weight": np.zeros((2, 3))}})
    with pytest.raises(TypeError, match="flat dict keyed by torch names"):
        state_dict_to_pytree([np.zeros(3)])


def test_mismatched_names_and_shapes_are_listed():
    like = {"0.weight": np.zeros((5, 10)), "0.bias": np.zeros(5), "2.weight": np.zeros((1, 5))}
    tree = {"0.weight": np.zeros((10, 5)), "0.bias": np.zeros(4), "extra": np.zeros(1)}
    with pytest.raises(StateDictMismatchError) as e:
        check_names_and_shapes(tree, like)
    message = str(e.value)
    assert "missing from the pytree: ['2.weight']" in message
    assert "not in the state_dict: ['extra']" in message
    assert "shape of '0.weight': pytree (10, 5), state_dict (5, 10) (transposed?" in message
    assert "shape of '0.bias': pytree (4,), state_dict (5,)" in message
    assert isinstance(e.value, ValueError)


def test_compare_arrays_metrics():
    one = np.float32(1.0)
    c = compare_arrays("grad", "w", np.nextafter(one, np.float32(2)), one)
    assert (c.ok, c.ulps, c.rtol, c.atol) == (True, 1.0, 1e-5, 1e-6)
    c = compare_arrays(
        "grad", "w", np.float64([[1, 2], [3, 4 + 1e-9]]), np.float64([[1, 2], [3, 4]])
    )
    assert not c.ok and c.worst_index == (1, 1) and c.max_abs == pytest.approx(1e-9)
    assert c.ulps == float(ulp_distance(4 + 1e-9, 4.0, "float64")) > 1000
    c = compare_arrays("grad", "w", np.zeros((3, 2)), np.zeros((2, 3)))
    assert not c.ok and "shape (3, 2) != reference (2, 3)" in c.note
    assert not compare_arrays("loss", "", np.nan, 1.0).ok
    assert compare_arrays("loss", "", np.float32(-0.0), np.float32(0.0)).ulps == 0
    assert tolerance_for("float64") == (1e-12, 1e-12)
    with pytest.raises(ValueError, match="float32 or float64"):
        tolerance_for("float16")


# --------------------------------------------------------------------------- with torch


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_state_dict_round_trip_is_bit_exact(torch_case, dtype):
    torch, model, *_ = torch_case
    model = copy.deepcopy(model).to(getattr(torch, dtype))
    sd = model.state_dict()
    tree = state_dict_to_pytree(sd)
    assert list(tree) == NAMES and tree["2.weight"].shape == (12, 16)
    assert all(v.dtype == jnp.dtype(dtype) for v in tree.values())
    back = pytree_to_state_dict(tree, like=model)
    assert list(back) == list(sd)
    for name in sd:
        assert back[name].dtype == sd[name].dtype and torch.equal(back[name], sd[name]), name
    # Also without `like`; and an updated pytree loads back into the module.
    assert all(torch.equal(pytree_to_state_dict(tree)[n], sd[n]) for n in sd)
    before = model.state_dict()["4.bias"].clone()
    model.load_state_dict(pytree_to_state_dict({n: v * 2 for n, v in tree.items()}, like=sd))
    assert torch.equal(model.state_dict()["4.bias"], before * 2)


def test_pytree_to_state_dict_rejects_mismatches(torch_case):
    _, model, *_ = torch_case
    tree = state_dict_to_pytree(model.state_dict())
    transposed = {**tree, "0.weight": tree["0.weight"].T}
    with pytest.raises(StateDictMismatchError, match=r"'0\.weight': pytree \(8, 16\).*transposed"):
        pytree_to_state_dict(transposed, like=model)
    renamed = {("layer0.weight" if n == "0.weight" else n): v for n, v in tree.items()}
    with pytest.raises(StateDictMismatchError, match=r"missing from the pytree: \['0\.weight'\]"):
        pytree_to_state_dict(renamed, like=model.state_dict())


@pytest.mark.parametrize(
    "dtype, engine, jit, optimizer",
    [
        ("float32", "chainrule", True, ("sgd", 0.1)),
        ("float32", "jax", True, ("sgd", 0.1, 0.9)),
        ("float64", "chainrule", False, ("sgd", 0.1)),
        ("float64", "chainrule", True, ("adam", 1e-3)),
    ],
)
def test_compare_step_on_tanh_cross_entropy_model(torch_case, dtype, engine, jit, optimizer):
    torch, original, loss_fn, x, labels = torch_case
    model = copy.deepcopy(original).to(getattr(torch, dtype))
    start = copy.deepcopy(model.state_dict())
    report = compare_step(
        model, loss_fn, cross_entropy, None, x.to(model[0].weight.dtype), labels,
        optimizer=optimizer, engine=engine, jit=jit,
    )  # fmt: skip
    assert report.ok, str(report)
    rows = {(r.quantity, r.name): r for r in report.rows}
    assert set(rows) == {("loss", "")} | {
        (q, n) for q in ("grad", "param after step") for n in NAMES
    }
    row = rows["grad", "2.weight"]
    assert row.shape == (12, 16) and row.dtype == dtype and row.ok
    assert (row.rtol, row.atol) == tolerance_for(dtype)
    # The module passed in is not modified by the step.
    assert all(torch.equal(model.state_dict()[n], start[n]) for n in NAMES)
    text = str(report)
    assert text.splitlines()[-1] == "OK" and "param after step" in text and "2.weight" in text
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


@pytest.mark.parametrize(
    "port, must_fail",
    [
        (cross_entropy_summed, {"loss", "0.weight", "4.bias"}),
        (cross_entropy_no_first_tanh, {"loss", "0.weight", "2.weight", "4.weight"}),
    ],
)
def test_compare_step_names_the_parameters_of_a_wrong_port(torch_case, port, must_fail):
    _, model, loss_fn, x, labels = torch_case
    report = compare_step(model, loss_fn, port, None, x, labels, ("sgd", 0.1), engine="chainrule")
    assert not report.ok
    assert must_fail <= set(report.failed_names), report.failed_names
    assert report["grad", "0.weight"].ok is False
    text = str(report)
    assert "FAILED:" in text.splitlines()[-1] and "0.weight" in text.splitlines()[-1]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("grad") and " 0.weight " in ln]
    assert line.rstrip().endswith("FAIL")


def test_compare_step_with_given_params_shares_them_with_torch(torch_case):
    _, model, loss_fn, x, labels = torch_case
    params = {n: v * 0.5 for n, v in state_dict_to_pytree(model.state_dict()).items()}
    assert compare_step(model, loss_fn, cross_entropy, params, x, labels).ok
    with pytest.raises(StateDictMismatchError, match="transposed"):
        bad = {**params, "4.weight": params["4.weight"].T}
        compare_step(model, loss_fn, cross_entropy, bad, x, labels)
    with pytest.raises(ValueError, match=r"params\['0.weight'\] is float64 but the torch module"):
        wide = state_dict_to_pytree(model.state_dict(), dtype=jnp.float64)
        compare_step(model, loss_fn, cross_entropy, wide, x, labels)
    with pytest.raises(ValueError, match="engine must be 'chainrule' or 'jax'"):
        compare_step(model, loss_fn, cross_entropy, None, x, labels, engine="torch")
    with pytest.raises(ValueError, match="unsupported optimizer"):
        compare_step(model, loss_fn, cross_entropy, None, x, labels, optimizer=("lbfgs", 1.0))


def test_a_port_that_raises_gets_a_layout_hint(torch_case):
    _, model, loss_fn, x, labels = torch_case

    def untransposed(params, x, labels):  # x @ W with W stored (out, in): shapes clash
        return jnp.mean(x @ params["0.weight"])

    with pytest.raises(TypeError) as e:
        compare_step(model, loss_fn, untransposed, None, x, labels)
    assert any("x @ W.T + b" in note for note in e.value.__notes__)


# --------------------------------------------------------------------------- issue 12, item 11

# Integers JAX stores in 32 bits while 64-bit types are off, at and past the edges.
INTEGERS_THAT_FIT = [
    (np.int64, [0, 3, -5, 2**31 - 1, -(2**31)]),
    (np.uint64, [0, 7, 2**32 - 1]),
    (np.int32, [2**31 - 1, -(2**31)]),
    (np.int16, [-(2**15), 2**15 - 1]),
    (np.uint8, [0, 255]),
    (np.bool_, [True, False]),
]
INTEGERS_THAT_DO_NOT_FIT = [
    (np.int64, 2**40),
    (np.int64, 2**31),
    (np.int64, -(2**31) - 1),
    (np.int64, 2**63 - 1),
    (np.int64, -(2**63)),
    (np.uint64, 2**32),
    (np.uint64, 2**64 - 1),
]


@pytest.mark.parametrize(
    "dtype, values, as_tensor",
    [(*case, False) for case in INTEGERS_THAT_FIT]
    + [(*case, True) for case in INTEGERS_THAT_FIT if case[0] != np.uint64],  # no torch uint64
)
def test_integer_buffers_that_fit_32_bits_convert_exactly_without_x64(dtype, values, as_tensor):
    array = np.array(values, dtype)
    value = pytest.importorskip("torch").from_numpy(array) if as_tensor else array
    with jax.enable_x64(False):
        tree = state_dict_to_pytree({"bn.num_batches_tracked": value, "scalar": array[0]})
        converted, scalar = tree["bn.num_batches_tracked"], tree["scalar"]
        assert converted.dtype == jax.dtypes.canonicalize_dtype(dtype)
        assert np.asarray(converted).tolist() == array.tolist()
        assert np.asarray(scalar).tolist() == array[0].tolist()


@pytest.mark.parametrize("dtype, value", INTEGERS_THAT_DO_NOT_FIT)
@pytest.mark.parametrize("shape", [(), (3,)], ids=["scalar", "array"])
def test_integer_buffers_that_would_wrap_raise_and_name_x64(dtype, value, shape):
    # int64 2**40 used to become int32 0 without a word.
    array = np.zeros(shape, dtype)
    array[...] = 1
    array.reshape(-1)[-1] = value
    with jax.enable_x64(False), pytest.raises(ValueError) as e:
        state_dict_to_pytree({"steps": np.float32(1), "counter": array})
    message = str(e.value)
    assert "'counter'" in message and str(value) in message and "wrap" in message
    assert 'jax.config.update("jax_enable_x64", True)' in message
    # With 64-bit types on (as in this test suite) the value and dtype are kept exactly.
    kept = state_dict_to_pytree({"counter": array})["counter"]
    assert kept.dtype == dtype and np.asarray(kept).tolist() == array.tolist()


def test_an_int64_torch_buffer_of_2_to_the_40_keeps_its_value(torch_case):
    torch = torch_case[0]
    sd = {"num_batches_tracked": torch.tensor(2**40), "ids": torch.tensor([-(2**62), 5])}
    tree = state_dict_to_pytree(sd)  # x64 is on in this suite
    assert tree["num_batches_tracked"].dtype == jnp.int64
    assert int(tree["num_batches_tracked"]) == 2**40
    assert np.asarray(tree["ids"]).tolist() == [-(2**62), 5]
    back = pytree_to_state_dict(tree, like=sd)
    assert all(torch.equal(back[n], sd[n]) for n in sd)
    with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64"):
        state_dict_to_pytree(sd)


def batchnorm_mse(params, x, y):
    """nn.Sequential(Linear(8, 6), BatchNorm1d(6), Tanh(), Linear(6, 3)) in training mode."""
    h = x @ params["0.weight"].T + params["0.bias"]
    h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5) * params["1.weight"] + params["1.bias"]
    out = jnp.tanh(h) @ params["3.weight"].T + params["3.bias"]
    return jnp.mean((out - y) ** 2)


def test_compare_step_checks_int64_buffers_without_x64(torch_case):
    torch = torch_case[0]
    nn = torch.nn
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(10, 8), torch.randn(10, 3)
    with jax.enable_x64(False):
        for counter in (0, 2**31 - 1):  # fits: the comparison runs as before
            model[1].num_batches_tracked.fill_(counter)
            assert compare_step(model, nn.MSELoss(), batchnorm_mse, None, x, y).ok
        model[1].num_batches_tracked.fill_(2**40)  # used to become 0 silently
        with pytest.raises(ValueError, match=r"'1\.num_batches_tracked' holds 1099511627776"):
            compare_step(model, nn.MSELoss(), batchnorm_mse, None, x, y)
        params = {n: t.numpy() for n, t in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"params\['1\.num_batches_tracked'\].*x64"):
            compare_step(model, nn.MSELoss(), batchnorm_mse, params, x, y)
    assert compare_step(model, nn.MSELoss(), batchnorm_mse, None, x, y).ok  # x64 on


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "source",
    ["state_dict", "named_parameters", "scaled tensors", "mixed"],
)
def test_compare_step_accepts_torch_tensors_as_params(torch_case, dtype, source):
    # Used to fail with "Cannot interpret 'torch.float32' as a data type".
    torch, original, loss_fn, x, labels = torch_case
    model = copy.deepcopy(original).to(getattr(torch, dtype))
    x = x.to(getattr(torch, dtype))
    start = copy.deepcopy(model.state_dict())
    if source == "state_dict":
        params = model.state_dict()
    elif source == "named_parameters":  # Parameters that require grad
        params = dict(model.named_parameters())
    elif source == "scaled tensors":
        params = {n: t * 0.5 for n, t in model.state_dict().items()}
    else:  # torch, NumPy and JAX arrays in one dict
        sd = model.state_dict()
        params = {
            n: [sd[n], sd[n].numpy(), jnp.asarray(sd[n].numpy())][i % 3] for i, n in enumerate(sd)
        }
    report = compare_step(model, loss_fn, cross_entropy, params, x, labels)
    assert report.ok, str(report)
    # The same weights as JAX arrays give the very same report.
    numpy = lambda t: t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)
    as_jax = {n: jnp.asarray(numpy(t)) for n, t in params.items()}
    reference = compare_step(model, loss_fn, cross_entropy, as_jax, x, labels)
    assert [r.to_dict() for r in report.rows] == [r.to_dict() for r in reference.rows]
    # Neither the module nor the given tensors were modified.
    assert all(torch.equal(model.state_dict()[n], start[n]) for n in NAMES)
    if source != "scaled tensors":
        assert all(
            torch.equal(torch.as_tensor(np.array(numpy(params[n]))), start[n]) for n in NAMES
        )


def test_torch_tensor_params_that_disagree_get_the_usual_errors(torch_case):
    torch, model, loss_fn, x, labels = torch_case
    sd = model.state_dict()
    with pytest.raises(ValueError, match=r"params\['0\.weight'\] is float64 but the torch module"):
        compare_step(
            model, loss_fn, cross_entropy, {n: t.double() for n, t in sd.items()}, x, labels
        )
    with pytest.raises(StateDictMismatchError, match="transposed"):
        compare_step(model, loss_fn, cross_entropy, {**sd, "2.weight": sd["2.weight"].T}, x, labels)
    with pytest.raises(TypeError, match="flat dict keyed by torch names"):
        compare_step(model, loss_fn, cross_entropy, list(sd.values()), x, labels)
    check_names_and_shapes(sd, sd)  # the other functions taking params accept tensors too
    assert all(torch.equal(pytree_to_state_dict(sd, like=sd)[n], sd[n]) for n in sd)


def make_tied_model(torch, dtype, kind):
    """A model with one Parameter under two state_dict names."""
    nn = torch.nn
    torch.manual_seed(3)

    class TiedEmbedding(nn.Module):  # language-model style: output layer = embedding^T
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.mix = nn.Linear(5, 5)
            self.out = nn.Linear(5, 7, bias=kind == "embedding+bias")
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.mix(self.emb(ids))))

    class SharedLayer(nn.Module):  # one Linear registered (and used) twice
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(7, 7)
            self.again = self.first
            self.emb = nn.Embedding(7, 7)

        def forward(self, ids):
            return self.again(torch.tanh(self.first(self.emb(ids))))

    model = SharedLayer() if kind == "shared layer" else TiedEmbedding()
    return model.to(getattr(torch, dtype))


def tied_port(kind, names="both"):
    def port(p, ids, labels):
        if kind == "shared layer":
            linear = lambda h, who: h @ p[f"{who}.weight"].T + p[f"{who}.bias"]
            h = linear(jnp.tanh(linear(p["emb.weight"][ids], "first")), "again")
        else:
            out_name = "out.weight" if names == "both" else "emb.weight"
            h = jnp.tanh(p["emb.weight"][ids] @ p["mix.weight"].T + p["mix.bias"])
            h = h @ p[out_name].T + (p["out.bias"] if "out.bias" in p else 0.0)
        logp = jax.nn.log_softmax(h, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    return port


@pytest.mark.parametrize(
    "kind, dtype, engine, jit",
    [
        ("embedding", "float32", "chainrule", True),
        ("embedding", "float64", "chainrule", False),
        ("embedding", "float64", "jax", True),
        ("embedding+bias", "float32", "chainrule", False),
        ("embedding+bias", "float64", "chainrule", True),
        ("shared layer", "float64", "chainrule", True),
        ("shared layer", "float32", "jax", False),
    ],
)
def test_compare_step_passes_a_correct_port_of_tied_weights(torch_case, kind, dtype, engine, jit):
    # A tied weight has two state_dict names; the use through the alias used to be
    # left out of the gradient and the comparison reported FAIL.
    torch = torch_case[0]
    model = make_tied_model(torch, dtype, kind)
    sd = model.state_dict()
    ids, labels = torch.tensor([0, 3, 6, 2, 3, 1]), torch.tensor([1, 2, 0, 6, 5, 3])
    report = compare_step(
        model, torch.nn.CrossEntropyLoss(), tied_port(kind), None, ids, labels,
        optimizer=("sgd", 0.5, 0.9), engine=engine, jit=jit,
    )  # fmt: skip
    assert report.ok, str(report)
    trainable = [n for n, _ in model.named_parameters()]
    assert len(trainable) < len(sd)  # the alias names are not compared twice
    assert [r.name for r in report.rows if r.quantity == "grad"] == trainable
    tied = "emb.weight" if kind != "shared layer" else "first.weight"
    assert report["grad", tied].note == (
        "tied: also out.weight" if kind != "shared layer" else "tied: also again.weight"
    )
    assert "PASS (tied: also" in str(report)
    # The port may also use the one name for both uses.
    if kind == "embedding":
        port = tied_port(kind, names="one")
        assert compare_step(model, torch.nn.CrossEntropyLoss(), port, None, ids, labels).ok


def test_tied_weights_still_fail_a_wrong_port_and_given_params_must_agree(torch_case):
    torch = torch_case[0]
    model = make_tied_model(torch, "float64", "embedding")
    ids, labels = torch.tensor([0, 3, 6, 2]), torch.tensor([1, 2, 0, 6])
    loss_fn = torch.nn.CrossEntropyLoss()

    def untied(p, ids, labels):  # wrong: the output layer's use is cut from the gradient
        h = jnp.tanh(p["emb.weight"][ids] @ p["mix.weight"].T + p["mix.bias"])
        logp = jax.nn.log_softmax(h @ jax.lax.stop_gradient(p["out.weight"]).T, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    report = compare_step(model, loss_fn, untied, None, ids, labels)
    assert report["loss", ""].ok  # the forward pass is right; only the gradient is not
    assert report.failed_names == ["emb.weight"]
    assert str(report).splitlines()[-1] == "FAILED: emb.weight"

    params = state_dict_to_pytree(model.state_dict())
    halved = {n: v * 0.5 for n, v in params.items()}  # both names halved: still one tensor
    assert compare_step(model, loss_fn, tied_port("embedding"), halved, ids, labels).ok
    differ = {**params, "out.weight": params["out.weight"] + 1.0}
    with pytest.raises(ValueError, match=r"'out\.weight'\] and params\['emb\.weight'\] differ"):
        compare_step(model, loss_fn, tied_port("embedding"), differ, ids, labels)
