"""The JAX ports of the tutorials' programs: pure `jax.numpy` functions.

MLP parameters are a flat dict keyed by torch's names with torch's layouts
(`"0.weight"` is `(out, in)` = `(5, 10)`), so PyTorch's initial state_dict is
converted once with `chainrule.interop.state_dict_to_pytree` and shared.
"""

import jax
import jax.numpy as jnp


def linear_loss(w, x, y):
    """`loss = (w*x - y)**2`."""
    y_hat = w * x
    return (y_hat - y) ** 2


def relu_loss(w1, w2, x, target):
    """`y = w2 * relu(w1 * x)`, `loss = (y - target)**2`."""
    z1 = w1 * x
    a1 = jax.nn.relu(z1)
    y = w2 * a1
    return (y - target) ** 2


def linear_layer(params, name, x):
    """torch's `nn.Linear`: `x @ W.T + b`, W stored `(out, in)`."""
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def mlp(params, x):
    """`nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))`."""
    h = jax.nn.relu(linear_layer(params, "0", x))
    return linear_layer(params, "2", h)


def mlp_loss(params, x, y):
    """`nn.MSELoss()(mlp(x), y)`: the mean of squared errors."""
    return jnp.mean((mlp(params, x) - y) ** 2)
