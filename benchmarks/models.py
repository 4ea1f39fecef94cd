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
