"""The benchmarked models, written out here (params dicts, `x @ W.T + b`).

Each loss exists in two spellings with the same math: `*_jnp` uses
`jax.numpy`/`jax.nn` (JAX's dispatch hands its primitives to chainrule's trace)
and `*_cnp` uses `chainrule.numpy` and operators only (chainrule's own fast
paths record it). `jax.grad` always differentiates the `jnp` spelling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import chainrule.numpy as cnp

F32 = np.float32


def init_mlp(sizes: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """PyTorch `nn.Linear` layout (out, in) and init bounds, float32, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        bound = 1.0 / np.sqrt(n_in)
        params[f"W{i}"] = rng.uniform(-bound, bound, (n_out, n_in)).astype(F32)
        params[f"b{i}"] = rng.uniform(-bound, bound, (n_out,)).astype(F32)
    return params


def n_layers(params: dict) -> int:
    return len(params) // 2


def classification_data(batch: int, n_in: int, n_classes: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n_in)).astype(F32)
    labels = rng.integers(0, n_classes, batch)
    return x, np.eye(n_classes, dtype=F32)[labels], labels


def regression_data(batch: int, n_in: int, n_out: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, n_in)).astype(F32),
        rng.standard_normal((batch, n_out)).astype(F32),
    )


def mlp_logits_jnp(params, x):
    h = x
    n = n_layers(params)
    for i in range(n):
        h = h @ params[f"W{i}"].T + params[f"b{i}"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


def xent_jnp(params, x, y_onehot):
    logp = jax.nn.log_softmax(mlp_logits_jnp(params, x), axis=-1)
    return -jnp.mean(jnp.sum(y_onehot * logp, axis=-1))


def mse_jnp(params, x, y):
    return jnp.mean((mlp_logits_jnp(params, x) - y) ** 2)


def mlp_logits_cnp(params, x):
    h = x
    n = n_layers(params)
    for i in range(n):
        h = h @ params[f"W{i}"].T + params[f"b{i}"]
        if i < n - 1:
            h = cnp.maximum(h, 0.0)
    return h


def xent_cnp(params, x, y_onehot):
    z = mlp_logits_cnp(params, x)
    s = z - cnp.max(z, axis=-1, keepdims=True)
    logp = s - cnp.log(cnp.sum(cnp.exp(s), axis=-1, keepdims=True))
    return -cnp.mean(cnp.sum(y_onehot * logp, axis=-1))


def mse_cnp(params, x, y):
    return cnp.mean((mlp_logits_cnp(params, x) - y) ** 2)


# --- the CNN of `chainrule train --model cnn` ------------------------------------


def init_cnn(image: int = 8, channels: tuple[int, int] = (16, 32), n_classes: int = 10, seed=0):
    """Conv(1, c0, 3) -> Conv(c0, c1, 3) -> MaxPool(2) -> Linear, PyTorch layouts and bounds."""
    rng = np.random.default_rng(seed)
    c0, c1 = channels
    shapes = {
        "conv1": ((c0, 1, 3, 3), 9),
        "conv2": ((c1, c0, 3, 3), 9 * c0),
        "head": ((n_classes, c1 * (image // 2) ** 2), c1 * (image // 2) ** 2),
    }
    params = {}
    for name, (shape, fan_in) in shapes.items():
        bound = 1.0 / np.sqrt(fan_in)
        params[f"{name}_W"] = rng.uniform(-bound, bound, shape).astype(F32)
        params[f"{name}_b"] = rng.uniform(-bound, bound, shape[:1]).astype(F32)
    return params


def cnn_logits_jnp(params, x):
    side = int(np.sqrt(x.shape[-1]))
    h = x.reshape(x.shape[0], 1, side, side)
    for name in ("conv1", "conv2"):
        h = jax.lax.conv_general_dilated(h, params[f"{name}_W"], (1, 1), "SAME")
        h = jax.nn.relu(h + params[f"{name}_b"][:, None, None])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    return h.reshape(h.shape[0], -1) @ params["head_W"].T + params["head_b"]


def cnn_xent_jnp(params, x, y_onehot):
    logp = jax.nn.log_softmax(cnn_logits_jnp(params, x), axis=-1)
    return -jnp.mean(jnp.sum(y_onehot * logp, axis=-1))


def cnn_forward_flops(batch: int, image: int = 8, channels=(16, 32), n_classes: int = 10):
    c0, c1 = channels
    pixels = image * image
    convs = 2 * pixels * 9 * (c0 + c0 * c1)
    return batch * (convs + 2 * c1 * pixels // 4 * n_classes)


# --- the tutorials' scalar cases -------------------------------------------------


def linear_sq_cnp(w, x, y):
    return (w * x - y) ** 2


def linear_sq_jnp(w, x, y):
    return jnp.square(jnp.multiply(w, x) - y)


def relu_net_cnp(w1, w2, x, target):
    y = w2 * cnp.maximum(w1 * x, 0.0)
    return (y - target) ** 2


def relu_net_jnp(w1, w2, x, target):
    y = w2 * jax.nn.relu(w1 * x)
    return jnp.square(y - target)


# --- PyTorch ports ---------------------------------------------------------------


def torch_mlp(torch, params: dict):
    """`nn.Sequential(Linear, ReLU, ..., Linear)` holding copies of `params`."""
    layers = []
    n = n_layers(params)
    for i in range(n):
        w = params[f"W{i}"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(w)))
            lin.bias.copy_(torch.from_numpy(np.array(params[f"b{i}"])))
        layers.append(lin)
        if i < n - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)
