"""chainrule.nn: shapes, PyTorch semantics (with torch as the oracle), chainrule gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chainrule as cr
from chainrule import nn

F32 = {"rtol": 1e-5, "atol": 1e-6}
F64 = {"rtol": 1e-12, "atol": 1e-12}


# --- linear_init / linear -----------------------------------------------------------------------


def test_linear_init_layout_dtype_and_bounds():
    p = nn.linear_init(jax.random.key(0), 64, 32, jnp.float32)
    assert p["weight"].shape == (32, 64) and p["bias"].shape == (32,)
    assert p["weight"].dtype == jnp.float32 and p["bias"].dtype == jnp.float32
    bound = 1 / math.sqrt(64)
    for leaf in (p["weight"], p["bias"]):
        assert float(jnp.max(jnp.abs(leaf))) <= bound
    # Uniform over the whole interval, not a narrower one: extremes near ±bound, mean near 0.
    w = np.asarray(p["weight"])
    assert w.max() > 0.95 * bound and w.min() < -0.95 * bound
    assert abs(w.mean()) < 0.1 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound  # std of U(-b, b)


def test_linear_init_float64_and_keys():
    a = nn.linear_init(jax.random.key(0), 3, 2, jnp.float64)
    b = nn.linear_init(jax.random.key(1), 3, 2, jnp.float64)
    assert a["weight"].dtype == jnp.float64
    assert not np.allclose(a["weight"], b["weight"])
    again = nn.linear_init(jax.random.key(0), 3, 2, jnp.float64)  # deterministic in the key
    np.testing.assert_array_equal(a["weight"], again["weight"])


def test_linear_init_rejects_bad_arguments():
    with pytest.raises(ValueError, match="in_features"):
        nn.linear_init(jax.random.key(0), 0, 3)
    with pytest.raises(TypeError, match="floating point"):
        nn.linear_init(jax.random.key(0), 2, 3, jnp.int32)


def test_linear_init_matches_torch_linear_bounds():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.Linear(100, 50)
    ours = nn.linear_init(jax.random.key(0), 100, 50, jnp.float32)
    for name in ("weight", "bias"):
        theirs = getattr(layer, name).detach().numpy()
        assert theirs.shape == ours[name].shape
        # Both are U(-1/sqrt(100), 1/sqrt(100)): same support, extremes near the bound.
        assert np.abs(theirs).max() <= 0.1 and float(jnp.max(jnp.abs(ours[name]))) <= 0.1
    w = layer.weight.detach().numpy()
    assert np.abs(w).max() > 0.095
    assert abs(w.std() - np.asarray(ours["weight"]).std()) < 0.005


def test_linear_is_x_at_weight_transpose_plus_bias():
    p = {"weight": jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "bias": jnp.array([0.5, -1.0])}
    x = jnp.array([[1.0, 0.0, -1.0]])
    np.testing.assert_allclose(nn.linear(p, x), [[1.0 - 3.0 + 0.5, 4.0 - 6.0 - 1.0]])


def _torch_mlp(torch, params):
    layers = []
    for i, p in enumerate(params):
        lin = torch.nn.Linear(p["weight"].shape[1], p["weight"].shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(p["weight"], np.float64)))
            lin.bias.copy_(torch.from_numpy(np.array(p["bias"], np.float64)))
        layers.append(lin)
        if i < len(params) - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def test_mlp_matches_torch_sequential_forward_and_gradients():
    """The tutorial: Sequential(Linear(10, 5), ReLU(), Linear(5, 1)), MSELoss, batch 32."""
    torch = pytest.importorskip("torch")
    params = nn.mlp_init(jax.random.key(3), [10, 5, 1], jnp.float64)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 10)), rng.standard_normal((32, 1))
    loss = lambda p: nn.mse_loss(nn.mlp_apply(p, x), y)
    value, grads = jax.jit(cr.value_and_grad(loss))(params)

    model = _torch_mlp(torch, params)
    t_loss = torch.nn.MSELoss()(model(torch.from_numpy(x)), torch.from_numpy(y))
    t_loss.backward()
    np.testing.assert_allclose(value, t_loss.item(), **F64)
    for ours, lin in zip(grads, (model[0], model[2]), strict=True):
        np.testing.assert_allclose(ours["weight"], lin.weight.grad.numpy(), **F64)
        np.testing.assert_allclose(ours["bias"], lin.bias.grad.numpy(), **F64)


def test_mlp_init_and_apply_shapes_and_errors():
    params = nn.mlp_init(jax.random.key(0), [6, 8, 4])
    assert [p["weight"].shape for p in params] == [(8, 6), (4, 8)]
    assert jax.jit(nn.mlp_apply)(params, jnp.ones((7, 6), jnp.float32)).shape == (7, 4)
    # mlp_init draws each layer as linear_init does, from the split keys.
    first = nn.linear_init(jax.random.split(jax.random.key(0), 2)[0], 6, 8)
    np.testing.assert_array_equal(params[0]["weight"], first["weight"])
    with pytest.raises(ValueError, match="at least the input and output"):
        nn.mlp_init(jax.random.key(0), [3])


def test_mlp_apply_no_activation_after_last_layer():
    p = [{"weight": -jnp.eye(2), "bias": jnp.zeros(2)}]  # one layer: output may be negative
    np.testing.assert_allclose(nn.mlp_apply(p, jnp.array([[1.0, 2.0]])), [[-1.0, -2.0]])
    tanh_out = nn.mlp_apply(p * 2, jnp.array([[1.0, -2.0]]), activation=jnp.tanh)
    np.testing.assert_allclose(tanh_out, [[np.tanh(1.0), -np.tanh(2.0)]], **F64)


# --- relu -----------------------------------------------------------------------------------


def test_relu_gradient_is_zero_at_zero_like_torch():
    assert float(cr.grad(nn.relu)(0.0)) == 0.0
    assert float(cr.grad(nn.relu)(2.0)) == 1.0 and float(cr.grad(nn.relu)(-2.0)) == 0.0
    torch = pytest.importorskip("torch")
    t = torch.tensor([0.0, 2.0, -2.0], requires_grad=True)
    torch.relu(t).sum().backward()
    ours = cr.grad(lambda v: nn.relu(v).sum())(jnp.array([0.0, 2.0, -2.0]))
    np.testing.assert_array_equal(ours, t.grad.numpy())


# --- losses ---------------------------------------------------------------------------------


def test_mse_loss_is_a_mean_like_torch():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    y = np.array([[1.5, 2.0], [0.0, 4.0]])
    assert float(nn.mse_loss(x, y)) == pytest.approx((0.25 + 9.0) / 4, rel=1e-15)
    torch = pytest.importorskip("torch")
    ref = torch.nn.MSELoss()(torch.from_numpy(x), torch.from_numpy(y)).item()
    np.testing.assert_allclose(nn.mse_loss(x, y), ref, **F64)


def test_mse_loss_refuses_broadcasting():
    with pytest.raises(ValueError, match=r"\(32, 1\).*\(32,\)"):
        nn.mse_loss(jnp.zeros((32, 1)), jnp.zeros(32))


def test_softmax_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((16, 10)) * 3
    labels = rng.integers(0, 10, 16)
    ref = torch.nn.CrossEntropyLoss()(torch.from_numpy(logits), torch.from_numpy(labels))
    np.testing.assert_allclose(nn.softmax_cross_entropy(logits, labels), ref.item(), **F64)
    # Gradients too: chainrule's against torch's autograd.
    t_logits = torch.from_numpy(logits).requires_grad_()
    torch.nn.CrossEntropyLoss()(t_logits, torch.from_numpy(labels)).backward()
    ours = jax.jit(cr.grad(nn.softmax_cross_entropy))(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(ours, t_logits.grad.numpy(), **F64)
    # float32 too.
    l32 = logits.astype(np.float32)
    ref32 = torch.nn.CrossEntropyLoss()(torch.from_numpy(l32), torch.from_numpy(labels)).item()
    np.testing.assert_allclose(nn.softmax_cross_entropy(l32, labels), ref32, **F32)


def test_softmax_cross_entropy_is_stable_and_checks_inputs():
    big = jnp.array([[1000.0, 0.0], [0.0, 1000.0]])
    assert float(nn.softmax_cross_entropy(big, jnp.array([0, 1]))) == 0.0
    assert float(nn.softmax_cross_entropy(big, jnp.array([1, 1]))) == pytest.approx(500.0)
    with pytest.raises(TypeError, match="integer class indices"):
        nn.softmax_cross_entropy(big, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels"):
        nn.softmax_cross_entropy(big, jnp.array([0, 1, 1]))


def test_softmax_cross_entropy_grad_chainrule_equals_jax():
    rng = np.random.default_rng(2)
    params = nn.mlp_init(jax.random.key(0), [6, 8, 4], jnp.float64)
    x, labels = rng.standard_normal((12, 6)), rng.integers(0, 4, 12)
    loss = lambda p: nn.softmax_cross_entropy(nn.mlp_apply(p, x), labels)
    ours, ref = jax.jit(cr.grad(loss))(params), jax.jit(jax.grad(loss))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F64), ours, ref)


def test_accuracy():
    logits = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert float(nn.accuracy(logits, jnp.array([1, 0, 0]))) == pytest.approx(2 / 3)
