"""Neural-network building blocks as pure functions, with PyTorch's semantics.

Parameters are plain pytrees (dicts and lists of arrays), PRNG keys are explicit
arguments, and nothing holds state: a layer is an `*_init` function that makes
its parameters and a function that applies them. Everything here is ordinary
`jax.numpy`, so `cr.grad`, `jax.grad`, `jax.jit` and `jax.vmap` all apply.

Where users compare with PyTorch, the behaviour matches it:

* `linear` stores `weight` as `(out_features, in_features)` and computes
  `x @ weight.T + bias`, like `torch.nn.Linear`; `linear_init` draws weight and
  bias from `U(-1/sqrt(in_features), 1/sqrt(in_features))`, the distribution of
  `torch.nn.Linear`'s default initialisation (the numbers differ: the PRNGs do).
* `conv2d` takes NCHW inputs and stores `weight` as `(out_channels,
  in_channels, kh, kw)`, like `torch.nn.Conv2d`, with its default
  initialisation bound `1/sqrt(in_channels * kh * kw)`; `max_pool2d` is
  `torch.nn.MaxPool2d(k)` (window and stride `k`, no padding).
* `relu` has gradient 0 at 0, like `torch.relu`.
* `mse_loss` and `softmax_cross_entropy` are means over the batch, like
  `torch.nn.MSELoss()` and `torch.nn.CrossEntropyLoss()`.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from chainrule import nn
  >>> params = nn.mlp_init(jax.random.key(0), [10, 5, 1], jnp.float32)
  >>> [p["weight"].shape for p in params]
  [(5, 10), (1, 5)]
  >>> nn.mlp_apply(params, jnp.ones((32, 10), jnp.float32)).shape
  (32, 1)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "accuracy",
    "cnn_apply",
    "cnn_init",
    "conv2d",
    "conv2d_init",
    "linear",
    "linear_init",
    "mlp_apply",
    "mlp_init",
    "max_pool2d",
    "mse_loss",
    "relu",
    "softmax_cross_entropy",
]

Params = dict[str, jax.Array]


def linear_init(
    key: jax.Array, in_features: int, out_features: int, dtype: Any = jnp.float32
) -> Params:
    """Parameters of a fully connected layer, initialised like `torch.nn.Linear`.

    Args:
      key: a JAX PRNG key (`jax.random.key(0)` or `jax.random.PRNGKey(0)`).
      in_features: size of each input example.
      out_features: size of each output example.
      dtype: floating-point dtype of the parameters.

    Returns:
      `{"weight": (out_features, in_features), "bias": (out_features,)}`, both
      drawn from `U(-1/sqrt(in_features), 1/sqrt(in_features))`. This is the
      layout and the distribution of `torch.nn.Linear` (its Kaiming-uniform
      default with `a=sqrt(5)` reduces to this bound); the values differ from
      PyTorch's because the random number generators differ.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> p = linear_init(jax.random.key(0), 4, 3, jnp.float32)
      >>> p["weight"].shape, p["bias"].shape
      ((3, 4), (3,))
      >>> bool(jnp.all(jnp.abs(p["weight"]) <= 0.5))  # 1/sqrt(4)
      True
    """
    if in_features < 1 or out_features < 1:
        raise ValueError(
            f"linear_init: in_features and out_features must be >= 1, got "
            f"in_features={in_features}, out_features={out_features}."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"linear_init: dtype must be floating point, got {jnp.dtype(dtype)}.")
    return _linear_init_jit(key, int(in_features), int(out_features), jnp.dtype(dtype))


def _linear_init(key, in_features, out_features, dtype):
    bound = 1.0 / math.sqrt(in_features)
    w_key, b_key = jax.random.split(key)
    weight = jax.random.uniform(w_key, (out_features, in_features), dtype, -bound, bound)
    bias = jax.random.uniform(b_key, (out_features,), dtype, -bound, bound)
    return {"weight": weight, "bias": bias}


# Compiled once per shape and dtype rather than one small compilation per random op.
_linear_init_jit = jax.jit(_linear_init, static_argnums=(1, 2, 3))


def linear(params: Params, x: jax.Array) -> jax.Array:
    """Applies a fully connected layer: `x @ weight.T + bias`, like `torch.nn.Linear`.

    Args:
      params: `{"weight": (out, in), "bias": (out,)}` as made by `linear_init`.
      x: inputs of shape `(..., in)`.

    Returns:
      Outputs of shape `(..., out)`.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = {"weight": jnp.array([[1.0, 2.0]]), "bias": jnp.array([0.5])}
      >>> linear(p, jnp.array([[3.0, 4.0]])).tolist()
      [[11.5]]
    """
    return x @ params["weight"].T + params["bias"]


def relu(x: jax.Array) -> jax.Array:
    """`max(x, 0)`, with gradient 0 at 0 like `torch.relu` (this is `jax.nn.relu`).

    Examples:
      >>> import chainrule as cr
      >>> float(relu(-1.0)), float(relu(2.0)), float(cr.grad(relu)(0.0))
      (0.0, 2.0, 0.0)
    """
    return jax.nn.relu(x)


def mlp_init(key: jax.Array, sizes: Sequence[int], dtype: Any = jnp.float32) -> list[Params]:
    """Parameters of a multilayer perceptron: one `linear_init` per pair of sizes.

    `mlp_init(key, [10, 5, 1])` matches
    `nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))` layer by layer
    (layout and init distribution; see `linear_init`).

    Args:
      key: a JAX PRNG key; it is split once per layer.
      sizes: `[in_features, hidden..., out_features]`, at least two sizes.
      dtype: floating-point dtype of the parameters.

    Returns:
      A list of `{"weight", "bias"}` dicts, one per layer.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = mlp_init(jax.random.key(0), [64, 128, 10], jnp.float32)
      >>> [(p["weight"].shape, p["bias"].shape) for p in params]
      [((128, 64), (128,)), ((10, 128), (10,))]
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2:
        raise ValueError(
            f"mlp_init: sizes must list at least the input and output sizes, got {sizes}. "
            "Example: mlp_init(key, [10, 5, 1])."
        )
    for n in sizes:
        if n < 1:
            raise ValueError(f"mlp_init: layer sizes must be >= 1, got {sizes}.")
    return _mlp_init(key, tuple(sizes), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2))  # one compilation per architecture
def _mlp_init(key, sizes, dtype):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        _linear_init(k, n_in, n_out, dtype)
        for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_apply(
    params: Sequence[Params],
    x: jax.Array,
    activation: Callable[[jax.Array], jax.Array] = relu,
) -> jax.Array:
    """Applies an MLP: `linear` layers with `activation` between them, none after the last.

    Like `nn.Sequential(Linear, ReLU, ..., Linear)`: the output is the last
    layer's raw output (logits for classification).

    Args:
      params: a list of layer dicts as made by `mlp_init`.
      x: inputs of shape `(..., sizes[0])`.
      activation: elementwise function applied after every layer but the last.

    Returns:
      Outputs of shape `(..., sizes[-1])`.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = [
      ...     {"weight": jnp.array([[1.0], [-1.0]]), "bias": jnp.zeros(2)},
      ...     {"weight": jnp.array([[1.0, 1.0]]), "bias": jnp.zeros(1)},
      ... ]
      >>> mlp_apply(params, jnp.array([[2.0], [-3.0]])).tolist()  # |x|
      [[2.0], [3.0]]
    """
    for i, layer in enumerate(params):
        x = linear(layer, x)
        if i < len(params) - 1:
            x = activation(x)
    return x


def conv2d_init(
    key: jax.Array, in_channels: int, out_channels: int, kernel_size: int, dtype: Any = jnp.float32
) -> Params:
    """Parameters of a 2-D convolution, initialised like `torch.nn.Conv2d`.

    Returns:
      `{"weight": (out_channels, in_channels, k, k), "bias": (out_channels,)}`,
      both from `U(-b, b)` with `b = 1/sqrt(in_channels * k * k)` (PyTorch's
      default bound; the values differ, the PRNGs do).

    Examples:
      >>> import jax
      >>> p = conv2d_init(jax.random.key(0), 1, 4, 3)
      >>> p["weight"].shape, p["bias"].shape
      ((4, 1, 3, 3), (4,))
    """
    if min(in_channels, out_channels, kernel_size) < 1:
        raise ValueError(
            f"conv2d_init: in_channels, out_channels and kernel_size must be >= 1, got "
            f"{in_channels}, {out_channels}, {kernel_size}."
        )
    return _conv2d_init(
        key, int(in_channels), int(out_channels), int(kernel_size), jnp.dtype(dtype)
    )


def _conv2d_init_eager(key, in_channels, out_channels, k, dtype):
    bound = 1.0 / math.sqrt(in_channels * k * k)
    w_key, b_key = jax.random.split(key)
    weight = jax.random.uniform(w_key, (out_channels, in_channels, k, k), dtype, -bound, bound)
    bias = jax.random.uniform(b_key, (out_channels,), dtype, -bound, bound)
    return {"weight": weight, "bias": bias}


_conv2d_init = jax.jit(_conv2d_init_eager, static_argnums=(1, 2, 3, 4))


def conv2d(params: Params, x: jax.Array) -> jax.Array:
    """A stride-1 2-D convolution with "same" padding, like
    `torch.nn.Conv2d(in, out, k, padding="same")` (NCHW, cross-correlation).

    Examples:
      >>> import jax.numpy as jnp
      >>> p = {"weight": jnp.ones((1, 1, 3, 3)), "bias": jnp.zeros(1)}
      >>> conv2d(p, jnp.ones((1, 1, 3, 3)))[0, 0].tolist()  # 3x3 box sums
      [[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]
    """
    w = params["weight"]
    dtype = jnp.result_type(x, w)  # lax's convolution takes one dtype: promote as jnp does
    out = jax.lax.conv_general_dilated(
        x.astype(dtype), w.astype(dtype), (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    return out + params["bias"][:, None, None]


def max_pool2d(x: jax.Array, k: int = 2) -> jax.Array:
    """`torch.nn.MaxPool2d(k)` on NCHW inputs: the max of each `k x k` tile.

    Examples:
      >>> import jax.numpy as jnp
      >>> max_pool2d(jnp.arange(16.0).reshape(1, 1, 4, 4))[0, 0].tolist()
      [[5.0, 7.0], [13.0, 15.0]]
    """
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, k, k), (1, 1, k, k), "VALID")


def cnn_init(
    key: jax.Array,
    image_size: int,
    channels: Sequence[int] = (16, 32),
    n_classes: int = 10,
    dtype: Any = jnp.float32,
) -> dict[str, Params]:
    """A small CNN for `image_size x image_size` single-channel images.

    Two 3x3 convolutions with ReLU (`channels[0]`, `channels[1]` maps), a 2x2
    max pool, and a linear head on the flattened maps; the PyTorch model is
    `Sequential(Conv2d(1, c0, 3, padding="same"), ReLU(), Conv2d(c0, c1, 3,
    padding="same"), ReLU(), MaxPool2d(2), Flatten(), Linear(c1 * (s//2)**2, n))`.

    Examples:
      >>> import jax
      >>> params = cnn_init(jax.random.key(0), 8)
      >>> cnn_apply(params, jax.numpy.zeros((5, 64))).shape
      (5, 10)
    """
    if len(channels) != 2 or image_size < 2:
        raise ValueError(
            f"cnn_init: two conv layers' channels and an image of at least 2x2 are needed, "
            f"got channels={list(channels)}, image_size={image_size}. Example: cnn_init(key, 8, "
            "(16, 32))."
        )
    k1, k2, k3 = jax.random.split(key, 3)
    c0, c1 = (int(c) for c in channels)
    return {
        "conv1": conv2d_init(k1, 1, c0, 3, dtype),
        "conv2": conv2d_init(k2, c0, c1, 3, dtype),
        "head": linear_init(k3, c1 * (image_size // 2) ** 2, n_classes, dtype),
    }


def cnn_apply(params: dict[str, Params], x: jax.Array) -> jax.Array:
    """Logits of the CNN of `cnn_init` for flattened square images `(batch, size * size)`."""
    side = math.isqrt(x.shape[-1])
    if side * side != x.shape[-1]:
        raise ValueError(
            f"cnn_apply: expected flattened square images (batch, size*size), got shape "
            f"{x.shape}; {x.shape[-1]} is not a square."
        )
    h = x.reshape(x.shape[0], 1, side, side)
    h = relu(conv2d(params["conv1"], h))
    h = relu(conv2d(params["conv2"], h))
    h = max_pool2d(h, 2)
    return linear(params["head"], h.reshape(h.shape[0], -1))


def mse_loss(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error over all elements, like `torch.nn.MSELoss()` (reduction="mean").

    Unlike PyTorch, which broadcasts mismatched shapes with a warning, this
    raises: `(32, 1)` predictions against `(32,)` targets would silently make a
    `(32, 32)` matrix.

    Args:
      predictions: any shape.
      targets: the same shape as `predictions`.

    Returns:
      A scalar: `mean((predictions - targets) ** 2)`.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(mse_loss(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0])))
      2.0
    """
    if jnp.shape(predictions) != jnp.shape(targets):
        raise ValueError(
            f"mse_loss: predictions have shape {jnp.shape(predictions)} but targets have shape "
            f"{jnp.shape(targets)}. Reshape one of them (e.g. targets.reshape(-1, 1)) so the "
            "shapes match."
        )
    return jnp.mean((predictions - targets) ** 2)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of integer class labels, like `torch.nn.CrossEntropyLoss()`.

    Computes `mean(-log_softmax(logits)[i, labels[i]])` with a numerically
    stable log-softmax. As in PyTorch the logits are unnormalised scores and
    the labels are class indices (not one-hot); there is no `ignore_index` or
    label smoothing.

    Args:
      logits: `(batch, classes)` floating-point scores.
      labels: `(batch,)` integers in `[0, classes)`.

    Returns:
      A scalar: the mean over the batch.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [0.0, 0.0]])
      >>> round(float(softmax_cross_entropy(logits, jnp.array([0, 1]))), 6)  # log(2)
      0.693147
    """
    if jnp.ndim(logits) != 2 or jnp.shape(labels) != jnp.shape(logits)[:1]:
        raise ValueError(
            f"softmax_cross_entropy: expected logits (batch, classes) and labels (batch,), got "
            f"logits {jnp.shape(logits)} and labels {jnp.shape(labels)}."
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(
            f"softmax_cross_entropy: labels must be integer class indices, got dtype "
            f"{jnp.result_type(labels)}. Convert with labels.astype(jnp.int32); for one-hot "
            "targets use optax.softmax_cross_entropy."
        )
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)
    return -jnp.mean(picked)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of examples whose highest-scoring class is the label.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(accuracy(jnp.array([[2.0, 1.0], [0.0, 3.0]]), jnp.array([0, 0])))
      0.5
    """
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
