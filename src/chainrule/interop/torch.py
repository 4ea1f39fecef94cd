"""PyTorch interop: share weights with a torch module and compare one training step.

Parameters cross the border as a **flat dict keyed by torch's names**
(`"0.weight"`, `"encoder.layer1.bias"`, exactly `module.state_dict()`'s keys) with
torch's layouts kept (`Linear.weight` is `(out, in)`, so a JAX port computes
`x @ W.T + b`). A flat dict is a pytree, so it goes straight into `cr.grad`,
`jax.grad` and optax, and the names in a comparison report are the names a
PyTorch user already knows.

torch is imported lazily: importing this module never needs it, and
`state_dict_to_pytree` works on NumPy arrays without it. Functions that must
run PyTorch raise `TorchNotInstalledError` when it is missing.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from chainrule.errors import ChainruleError
from chainrule.interop._report import StepReport, compare_arrays, tolerance_for

TORCH_PIN = "torch==2.13.0"


class TorchNotInstalledError(ChainruleError, ImportError):
    """A function that runs PyTorch was called, but torch cannot be imported."""


class StateDictMismatchError(ChainruleError, ValueError):
    """A pytree and a torch state_dict disagree on parameter names or shapes."""


def import_torch():
    """Returns the `torch` module, or raises `TorchNotInstalledError` saying how to install it."""
    try:
        import torch
    except ImportError as e:
        raise TorchNotInstalledError(
            f"this needs PyTorch, which is not installed: pip install {TORCH_PIN} "
            "(CPU build: add --index-url https://download.pytorch.org/whl/cpu), "
            "or pip install -e '.[compare]'."
        ) from e
    return torch


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _x64_enabled() -> bool:
    return jax.dtypes.canonicalize_dtype(np.float64) == np.dtype(np.float64)


def _require_dtype_available(dtype: np.dtype, what: str) -> None:
    if dtype == np.float64 and not _x64_enabled():
        raise ValueError(
            f"{what} is float64 but JAX would silently make it float32. Enable float64 first: "
            'jax.config.update("jax_enable_x64", True), or pass dtype=jnp.float32.'
        )


def _check_flat(tree: Any) -> Mapping[str, Any]:
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"expected a flat dict keyed by torch names (e.g. {{'0.weight': ...}}), got "
            f"{type(tree).__name__}. Build one with state_dict_to_pytree(module.state_dict())."
        )
    for name, value in tree.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be strings like '0.weight', got {name!r}")
        if isinstance(value, Mapping):
            raise TypeError(
                f"expected a flat dict keyed by torch names, but {name!r} holds a nested dict; "
                f"use dotted keys like '{name}.weight' instead of nesting."
            )
    return tree


def state_dict_to_pytree(state_dict: Mapping[str, Any], dtype: Any = None) -> dict[str, jax.Array]:
    """Converts a torch `state_dict` to a flat dict of JAX arrays keyed by torch names.

    Layouts are kept as torch stores them (`Linear.weight` is `(out, in)`), and
    so are the names and their order. Needs torch only if the values are torch
    tensors; NumPy arrays and nested lists work too.

    Args:
      state_dict: `module.state_dict()`, or any mapping from torch names to arrays.
      dtype: if given, floating-point entries are cast to it (integer buffers
        such as BatchNorm's `num_batches_tracked` keep their dtype).

    Returns:
      A dict `{name: jax.Array}`: a pytree for `cr.grad`, `jax.grad` and optax.

    Raises:
      ValueError: an entry is float64 while JAX's float64 is disabled.

    Examples:
      >>> import numpy as np
      >>> tree = state_dict_to_pytree({"0.weight": np.ones((5, 10), np.float32)})
      >>> list(tree), tree["0.weight"].shape, str(tree["0.weight"].dtype)
      (['0.weight'], (5, 10), 'float32')
    """
    _check_flat(state_dict)
    out = {}
    for name, value in state_dict.items():
        array = _to_numpy(value)
        if dtype is not None and np.issubdtype(array.dtype, np.floating):
            array = array.astype(dtype)
        if np.issubdtype(array.dtype, np.floating):
            _require_dtype_available(array.dtype, f"state_dict entry {name!r}")
        out[name] = jnp.asarray(array)
    return out


def check_names_and_shapes(tree: Mapping[str, Any], like: Mapping[str, Any]) -> None:
    """Raises `StateDictMismatchError` unless `tree` and `like` have the same names and shapes.

    The message lists missing and unexpected names and every shape mismatch,
    and says when a shape is the transpose of the expected one.

    Examples:
      >>> import numpy as np
      >>> check_names_and_shapes({"w": np.zeros((2, 3))}, {"w": np.zeros((3, 2)), "b": 0.0})
      Traceback (most recent call last):
      ...
      chainrule.interop.torch.StateDictMismatchError: pytree and state_dict disagree:
        missing from the pytree: ['b']
        shape of 'w': pytree (2, 3), state_dict (3, 2) (transposed? ...)
    """
    _check_flat(tree)
    problems = []
    missing = [n for n in like if n not in tree]
    unexpected = [n for n in tree if n not in like]
    if missing:
        problems.append(f"missing from the pytree: {missing}")
    if unexpected:
        problems.append(f"not in the state_dict: {unexpected}")
    for name in like:
        if name in tree:
            got, want = tuple(np.shape(tree[name])), tuple(np.shape(like[name]))
            if got != want:
                hint = ""
                if len(got) == 2 and got[::-1] == want:
                    hint = " (transposed? torch stores Linear weights as (out, in))"
                problems.append(f"shape of {name!r}: pytree {got}, state_dict {want}{hint}")
    if problems:
        raise StateDictMismatchError("pytree and state_dict disagree:\n  " + "\n  ".join(problems))


def pytree_to_state_dict(tree: Mapping[str, Any], like: Any = None) -> OrderedDict:
    """Converts a flat dict keyed by torch names back to a torch `state_dict`.

    The inverse of `state_dict_to_pytree`: `pytree_to_state_dict(state_dict_to_pytree(sd),
    like=sd)` equals `sd` bit for bit. Needs torch.

    Args:
      tree: `{name: array}` with torch names and torch layouts.
      like: optional `module.state_dict()` or `nn.Module`. When given, names and
        shapes must match it exactly, and each tensor takes its dtype, device
        and key order, so the result loads with `module.load_state_dict(...)`.

    Returns:
      An `OrderedDict` of `torch.Tensor`s.

    Raises:
      StateDictMismatchError: names or shapes differ from `like`.
      TorchNotInstalledError: torch is not installed.
    """
    torch = import_torch()
    _check_flat(tree)
    if like is None:
        return OrderedDict((n, torch.from_numpy(np.array(_to_numpy(v)))) for n, v in tree.items())
    if isinstance(like, torch.nn.Module):
        like = like.state_dict()
    check_names_and_shapes(tree, like)
    return OrderedDict(
        (
            name,
            torch.as_tensor(np.array(_to_numpy(tree[name]))).to(dtype=ref.dtype, device=ref.device),
        )
        for name, ref in like.items()
    )


@contextlib.contextmanager
def _torch_highest_precision(torch):
    """Full-precision float32 matmuls in torch (no TF32), restored afterwards."""
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32 = saved[1]
        torch.backends.cudnn.allow_tf32 = saved[2]


def _optimizers(optimizer: tuple) -> tuple[optax.GradientTransformation, Callable]:
    """`("sgd", lr)`, `("sgd", lr, momentum)` or `("adam", lr)` -> (optax, torch factory)."""
    if not isinstance(optimizer, tuple) or len(optimizer) not in (2, 3):
        raise ValueError(
            f"optimizer must be ('sgd', lr), ('sgd', lr, momentum) or ('adam', lr); "
            f"got {optimizer!r}"
        )
    kind, lr, *rest = optimizer
    if kind == "sgd":
        momentum = float(rest[0]) if rest else 0.0
        return (
            optax.sgd(lr, momentum=momentum or None),
            lambda torch, ps: torch.optim.SGD(ps, lr=lr, momentum=momentum),
        )
    if kind == "adam" and not rest:  # torch and optax defaults agree (0.9, 0.999, eps 1e-8)
        return optax.adam(lr), lambda torch, ps: torch.optim.Adam(ps, lr=lr)
    raise ValueError(
        f"unsupported optimizer {optimizer!r}; use ('sgd', lr[, momentum]) or ('adam', lr)"
    )


def compare_step(
    torch_module: Any,
    torch_loss_fn: Callable,
    jax_loss_fn: Callable,
    params: Mapping[str, Any] | None,
    inputs: Any,
    targets: Any,
    optimizer: tuple = ("sgd", 0.01),
    engine: str = "chainrule",
    jit: bool = True,
) -> StepReport:
    """Runs one training step in PyTorch and in JAX from the same weights, and compares.

    PyTorch: `loss = torch_loss_fn(module(inputs), targets); loss.backward();
    opt.step()` on a deep copy of `torch_module` (yours is never modified).
    JAX: `loss, grads = value_and_grad(jax_loss_fn)(params, inputs, targets)`
    with `engine` `"chainrule"` (`cr.value_and_grad`) or `"jax"`
    (`jax.value_and_grad`), then the matching optax update, under `jax.jit`
    when `jit` is True. Matmuls run at "highest" precision on both sides
    (no TF32), restored afterwards.

    The report has one row for the loss, one per trainable parameter for its
    gradient, and one per trainable parameter after the optimizer step, keyed
    by torch name. Each row has shape, max abs and rel error, ULPs in the
    compared dtype (the module's), the index of the worst element, the
    tolerance (float64: 1e-12; float32: rtol 1e-5, atol 1e-6) and pass/fail.
    Buffers (e.g. BatchNorm statistics) are passed to `jax_loss_fn` but not
    differentiated or compared.

    Args:
      torch_module: a `torch.nn.Module`, in float32 or float64.
      torch_loss_fn: `(predictions, targets) -> scalar tensor`, e.g. `nn.MSELoss()`.
      jax_loss_fn: `(params, inputs, targets) -> scalar`, params a flat dict
        keyed by torch names with torch layouts (see `state_dict_to_pytree`).
      params: the shared starting weights; `None` converts `torch_module`'s
        state_dict once. If given, they are also loaded into the torch copy.
      inputs: array or tensor passed as `module(inputs)` (a tuple is unpacked).
      targets: array or tensor passed to both losses.
      optimizer: `("sgd", lr)`, `("sgd", lr, momentum)` or `("adam", lr)`.
      engine: `"chainrule"` or `"jax"`.
      jit: run the JAX step under `jax.jit`.

    Returns:
      A `StepReport`: `.ok`, `.failures`, `.to_dict()`, `str(report)`.

    Raises:
      TorchNotInstalledError: torch is not installed.
      StateDictMismatchError: `params` and the module disagree on names or shapes.

    Example (needs torch)::

      model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))
      def loss(p, x, y):
          h = jax.nn.relu(x @ p["0.weight"].T + p["0.bias"])
          return jnp.mean((h @ p["2.weight"].T + p["2.bias"] - y) ** 2)
      report = compare_step(model, nn.MSELoss(), loss, None, x, y, ("sgd", 0.01))
      print(report); assert report.ok
    """
    torch = import_torch()
    if engine not in ("chainrule", "jax"):
        raise ValueError(f"engine must be 'chainrule' or 'jax', got {engine!r}")
    tx, make_torch_optimizer = _optimizers(optimizer)

    module = copy.deepcopy(torch_module)
    like = module.state_dict()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the torch module has no trainable parameters to compare")
    dtype = np.dtype(str(dict(module.named_parameters())[trainable[0]].dtype).split(".")[-1])
    tolerance_for(dtype)  # float32 or float64 only, with a clear error otherwise
    if params is None:
        params = state_dict_to_pytree(like)
    else:
        check_names_and_shapes(params, like)
        for name in trainable:
            got = np.dtype(params[name].dtype)
            if got != dtype:
                raise ValueError(
                    f"params[{name!r}] is {got} but the torch module is {dtype}; "
                    f"convert one side (module.double() / module.float(), or "
                    f"state_dict_to_pytree(..., dtype=jnp.{dtype}))."
                )
        module.load_state_dict(pytree_to_state_dict(params, like=like))
        params = {n: jnp.asarray(_to_numpy(v)) for n, v in params.items()}
    _require_dtype_available(dtype, "the torch module")

    # --- PyTorch ---
    device = next(module.parameters()).device
    as_tensor = lambda a: (a if hasattr(a, "detach") else torch.as_tensor(np.asarray(a))).to(device)
    inputs_t = tuple(map(as_tensor, inputs)) if isinstance(inputs, tuple) else (as_tensor(inputs),)
    targets_t = as_tensor(targets)
    with _torch_highest_precision(torch):
        torch_opt = make_torch_optimizer(torch, module.parameters())
        torch_opt.zero_grad()
        torch_loss = torch_loss_fn(module(*inputs_t), targets_t)
        torch_loss.backward()
        named = dict(module.named_parameters())
        torch_grads = {
            n: np.zeros(named[n].shape, dtype)
            if named[n].grad is None
            else _to_numpy(named[n].grad)
            for n in trainable
        }
        torch_opt.step()
        torch_after = {n: _to_numpy(named[n]).copy() for n in trainable}
    torch_loss = _to_numpy(torch_loss).copy()

    # --- JAX ---
    to_jax = lambda a: jnp.asarray(_to_numpy(a))
    inputs_j = tuple(map(to_jax, inputs)) if isinstance(inputs, tuple) else to_jax(inputs)
    targets_j = to_jax(targets)
    frozen = {n: v for n, v in params.items() if n not in trainable}

    def loss_of_trainable(trainable_params, x, y):
        return jax_loss_fn({**frozen, **trainable_params}, x, y)

    if engine == "chainrule":
        import chainrule

        value_and_grad = chainrule.value_and_grad
    else:
        value_and_grad = jax.value_and_grad

    @jax.jit  # the optimizer is not under test; compiled even when the gradient is eager
    def update(grads, opt_state, trainable_params):
        updates, _ = tx.update(grads, opt_state, trainable_params)
        return optax.apply_updates(trainable_params, updates)

    def step(trainable_params, opt_state, x, y):
        loss, grads = value_and_grad(loss_of_trainable)(trainable_params, x, y)
        return loss, grads, update(grads, opt_state, trainable_params)

    start = {n: params[n] for n in trainable}
    with jax.default_matmul_precision("highest"):
        try:
            loss, grads, after = (jax.jit(step) if jit else step)(
                start, tx.init(start), inputs_j, targets_j
            )
        except Exception as e:
            shapes = {n: tuple(np.shape(v)) for n, v in params.items()}
            e.add_note(
                f"raised by jax_loss_fn on params with shapes {shapes}: these are torch's "
                "layouts (Linear weights are (out, in), so a port computes x @ W.T + b)."
            )
            raise

    rows = [compare_arrays("loss", "", loss, torch_loss, dtype=dtype)]
    rows += [compare_arrays("grad", n, grads[n], torch_grads[n], dtype=dtype) for n in trainable]
    rows += [
        compare_arrays("param after step", n, after[n], torch_after[n], dtype=dtype)
        for n in trainable
    ]
    settings = {
        "engine": engine,
        "jit": jit,
        "optimizer": optimizer,
        "dtype": dtype.name,
        "torch": torch.__version__,
        "device": str(device),
    }
    return StepReport(rows, settings)
