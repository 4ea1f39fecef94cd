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
import dataclasses
import functools
import itertools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from chainrule.errors import ChainruleError
from chainrule.interop._report import Comparison, StepReport, compare_arrays, tolerance_for

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


def _jax_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype JAX stores `dtype` as: itself, or its 32-bit twin while 64-bit types are off."""
    if dtype.kind not in "biufc":  # not a number: let JAX raise its own error later
        return dtype
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def _require_dtype_available(dtype: np.dtype, what: str) -> None:
    """Raises unless JAX keeps floating-point (or complex) `dtype` as it is.

    JAX with 64-bit types disabled (its default) silently stores float64 as
    float32 and complex128 as complex64; a comparison in float64 would then
    measure float32 rounding.
    """
    dtype = np.dtype(dtype)
    target = _jax_dtype(dtype)
    if dtype.kind in "fc" and target != dtype:
        alternative = f", or pass dtype=jnp.{target.name}" if dtype.kind == "f" else ""
        raise ValueError(
            f"{what} is {dtype.name} but JAX would silently make it {target.name}. Enable "
            f'{dtype.name} first: jax.config.update("jax_enable_x64", True){alternative}.'
        )


def _require_integers_fit(array: np.ndarray, what: str) -> None:
    """Raises unless every value of integer `array` survives JAX's storage dtype unchanged.

    With 64-bit types disabled JAX stores int64 as int32 and uint64 as uint32,
    wrapping values that do not fit (2**40 becomes 0). Values that fit (a
    BatchNorm's `num_batches_tracked`, class labels) convert exactly.
    """
    target = _jax_dtype(array.dtype)
    if array.dtype.kind not in "iu" or target == array.dtype or array.size == 0:
        return
    info = np.iinfo(target)
    low, high = array.min(), array.max()
    if low >= info.min and high <= info.max:
        return
    bad = int(high) if high > info.max else int(low)
    raise ValueError(
        f"{what} holds {bad} ({array.dtype.name}), which does not fit in {target.name}: with "
        f"64-bit types disabled (JAX's default) JAX stores {array.dtype.name} as {target.name} "
        f"and would silently wrap it. Enable 64-bit types before converting: "
        f'jax.config.update("jax_enable_x64", True).'
    )


def _as_jax_array(value: Any, what: str, *, exact_floats: bool = True) -> jax.Array:
    """`value` (a torch tensor, array or nested list) as a JAX array with exactly its values.

    Raises `ValueError` naming `what` and the fix where JAX would change a value
    (see `_require_dtype_available` and `_require_integers_fit`). With
    `exact_floats=False`, float64 data may become float32 as JAX's own
    `jnp.asarray` does (for inputs and targets; integers are still checked).
    """
    array = _to_numpy(value)
    if exact_floats:
        _require_dtype_available(array.dtype, what)
    _require_integers_fit(array, what)
    return jnp.asarray(array)


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
      dtype: if given, floating-point entries are cast to it. Integer buffers
        (BatchNorm's `num_batches_tracked`) are never cast and keep their values
        exactly: with `jax_enable_x64` on they keep their dtype too; with it off
        (JAX's default) JAX stores int64 as int32, which is done only when every
        value fits, and raises otherwise.

    Returns:
      A dict `{name: jax.Array}`: a pytree for `cr.grad`, `jax.grad` and optax.

    Raises:
      ValueError: with `jax_enable_x64` off, an entry is float64 (or complex128),
        or an int64/uint64 entry holds a value that does not fit in 32 bits; the
        message says how to enable 64-bit types.

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
        out[name] = _as_jax_array(array, f"state_dict entry {name!r}")
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

    Tied weights (one Parameter under several state_dict names, e.g. an
    embedding shared with the output layer) are one parameter, as in PyTorch:
    `jax_loss_fn` receives the same array under every name, its gradient is the
    sum over all uses (PyTorch accumulates it the same way), and the report
    has one row per tied weight, under its `named_parameters()` name, with a
    note listing the other names.

    Args:
      torch_module: a `torch.nn.Module`, in float32 or float64.
      torch_loss_fn: `(predictions, targets) -> scalar tensor`, e.g. `nn.MSELoss()`.
      jax_loss_fn: `(params, inputs, targets) -> scalar`, params a flat dict
        keyed by torch names with torch layouts (see `state_dict_to_pytree`).
      params: the shared starting weights, a flat dict of JAX or NumPy arrays or
        torch tensors; `None` converts `torch_module`'s state_dict once. If
        given, they are also loaded into the torch copy.
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
      ValueError: `params` disagree with the module on dtype, or give a tied
        weight's names different values.

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
    module = copy.deepcopy(torch_module)  # the caller's module is never modified
    layout = _module_layout(module)
    params = _shared_params(module, params, layout)
    with _torch_highest_precision(torch):
        torch_result = _torch_step(
            torch, module, torch_loss_fn, make_torch_optimizer, inputs, targets, layout
        )
    with jax.default_matmul_precision("highest"):
        jax_result = _jax_step(jax_loss_fn, params, inputs, targets, layout, tx, engine, jit)
    settings = {
        "engine": engine,
        "jit": jit,
        "optimizer": optimizer,
        "dtype": layout.dtype.name,
        "torch": torch.__version__,
        "device": str(_device_of(module)),
    }
    return StepReport(_compare_results(jax_result, torch_result, layout), settings)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What `compare_step` needs to know about the torch module's parameters."""

    trainable: list[str]  # names of the parameters that require grad, each tensor once
    aliases: dict[str, str]  # {second state_dict name: first name} of each tied tensor
    dtype: np.dtype  # the dtype both sides compare in: the module's


@dataclasses.dataclass(frozen=True)
class _StepResult:
    """One side's training step: the loss, and per trainable name its gradient and new value."""

    loss: Any
    grads: Mapping[str, Any]
    after: Mapping[str, Any]


def _module_layout(module: Any) -> _Layout:
    """Trainable names, tied-weight aliases and the compared dtype of a torch module."""
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the torch module has no trainable parameters to compare")
    dtype = _numpy_dtype(dict(module.named_parameters())[trainable[0]].dtype)
    tolerance_for(dtype)  # float32 or float64 only, with a clear error otherwise
    return _Layout(trainable, _tied_aliases(module), dtype)


def _numpy_dtype(torch_dtype: Any) -> np.dtype:
    """`torch.float32` -> `np.dtype("float32")`."""
    return np.dtype(str(torch_dtype).split(".")[-1])


def _tied_aliases(module: Any) -> dict[str, str]:
    """`{alias: name}` for every state_dict key naming a tensor listed under another name.

    A tied weight (`model.out.weight = model.emb.weight`) is one Parameter:
    `named_parameters()` lists it once (as `name`), `state_dict()` once per
    module that holds it. A module registered twice gives aliases for all its
    tensors.
    """
    entries = module.state_dict(keep_vars=True)  # the Parameter and buffer objects themselves
    first_name: dict[int, str] = {}
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if name in entries:
            first_name.setdefault(id(tensor), name)
    aliases = {}
    for name, tensor in entries.items():
        owner = first_name.setdefault(id(tensor), name)
        if owner != name:
            aliases[name] = owner
    return aliases


def _shared_params(module: Any, params: Mapping[str, Any] | None, layout: _Layout) -> dict:
    """The starting weights as JAX arrays; user-given `params` are also loaded into `module`.

    `None` converts the module's state_dict. Given `params` (JAX or NumPy arrays,
    or torch tensors) must match the module's names, shapes and dtype, and give
    every name of a tied weight the same value.
    """
    like = module.state_dict()
    if params is None:
        params = state_dict_to_pytree(like)
    else:
        params = {n: _to_numpy(v) for n, v in _check_flat(params).items()}
        check_names_and_shapes(params, like)
        _check_params_dtype(params, layout)
        _check_ties_agree(params, layout.aliases)
        module.load_state_dict(pytree_to_state_dict(params, like=like))
        params = {n: _as_jax_array(v, f"params[{n!r}]") for n, v in params.items()}
    _require_dtype_available(layout.dtype, "the torch module")
    return params


def _check_params_dtype(params: Mapping[str, np.ndarray], layout: _Layout) -> None:
    """Raises unless every trainable entry of `params` has the module's dtype."""
    for name in layout.trainable:
        got = params[name].dtype
        if got != layout.dtype:
            raise ValueError(
                f"params[{name!r}] is {got} but the torch module is {layout.dtype}; "
                f"convert one side (module.double() / module.float(), or "
                f"state_dict_to_pytree(..., dtype=jnp.{layout.dtype}))."
            )


def _check_ties_agree(params: Mapping[str, np.ndarray], aliases: Mapping[str, str]) -> None:
    """Raises unless both names of each tied tensor hold the same values in `params`."""
    for alias, name in aliases.items():
        if not np.array_equal(
            params[alias], params[name], equal_nan=params[name].dtype.kind in "fc"
        ):
            raise ValueError(
                f"params[{alias!r}] and params[{name!r}] differ, but in the torch module they "
                f"are one tied tensor (state_dict lists it under both names); give both names "
                f"the same array."
            )


def _device_of(module: Any) -> Any:
    """The device of the module's parameters (where inputs and targets are moved)."""
    return next(module.parameters()).device


def _torch_step(
    torch, module, loss_fn: Callable, make_optimizer: Callable, inputs, targets, layout: _Layout
) -> _StepResult:
    """One PyTorch step on `module` (modified in place): loss, gradients and updated weights.

    A parameter the loss does not reach has no `.grad`; its gradient is zeros.
    """
    device = _device_of(module)
    as_tensor = lambda a: (a if hasattr(a, "detach") else torch.as_tensor(np.asarray(a))).to(device)
    inputs_t = tuple(map(as_tensor, inputs)) if isinstance(inputs, tuple) else (as_tensor(inputs),)
    optimizer = make_optimizer(torch, module.parameters())
    optimizer.zero_grad()
    loss = loss_fn(module(*inputs_t), as_tensor(targets))
    loss.backward()
    named = dict(module.named_parameters())
    grads = {
        n: np.zeros(named[n].shape, layout.dtype)
        if named[n].grad is None
        else _to_numpy(named[n].grad)
        for n in layout.trainable
    }
    optimizer.step()
    after = {n: _to_numpy(named[n]).copy() for n in layout.trainable}
    return _StepResult(_to_numpy(loss).copy(), grads, after)


def _jax_step(
    jax_loss_fn: Callable,
    params: Mapping[str, Any],
    inputs,
    targets,
    layout: _Layout,
    tx: optax.GradientTransformation,
    engine: str,
    jit: bool,
) -> _StepResult:
    """One JAX step: `value_and_grad` of `jax_loss_fn` in the trainable parameters, then `tx`.

    An exception from `jax_loss_fn` gets a note on torch's layouts.
    """
    as_data = functools.partial(_as_jax_array, exact_floats=False)
    if isinstance(inputs, tuple):
        x = tuple(as_data(a, f"inputs[{i}]") for i, a in enumerate(inputs))
    else:
        x = as_data(inputs, "inputs")
    y = as_data(targets, "targets")
    loss_of_trainable = _loss_of_trainable(jax_loss_fn, params, layout)
    value_and_grad = _value_and_grad(engine)

    @jax.jit  # the optimizer is not under test; compiled even when the gradient is eager
    def update(grads, opt_state, trainable_params):
        updates, _ = tx.update(grads, opt_state, trainable_params)
        return optax.apply_updates(trainable_params, updates)

    def step(trainable_params, opt_state, x, y):
        loss, grads = value_and_grad(loss_of_trainable)(trainable_params, x, y)
        return loss, grads, update(grads, opt_state, trainable_params)

    start = {n: params[n] for n in layout.trainable}
    try:
        loss, grads, after = (jax.jit(step) if jit else step)(start, tx.init(start), x, y)
    except Exception as e:
        _add_layout_note(e, params)
        raise
    return _StepResult(loss, grads, after)


def _loss_of_trainable(jax_loss_fn: Callable, params: Mapping[str, Any], layout: _Layout):
    """`jax_loss_fn` as a function of the trainable parameters alone.

    Frozen entries (buffers, parameters without grad) are closed over; every
    alias of a tied weight receives that weight's own value, so its gradient
    is the sum over all the names the port uses it by.
    """
    frozen = {n: v for n, v in params.items() if n not in layout.trainable}
    names = list(params)

    def loss_of_trainable(trainable_params, x, y):
        given = {**frozen, **trainable_params}
        full = {n: given[layout.aliases.get(n, n)] for n in names}
        return jax_loss_fn(full, x, y)

    return loss_of_trainable


def _value_and_grad(engine: str) -> Callable:
    """`cr.value_and_grad` for engine "chainrule", `jax.value_and_grad` for "jax"."""
    if engine == "chainrule":
        import chainrule

        return chainrule.value_and_grad
    return jax.value_and_grad


def _add_layout_note(error: Exception, params: Mapping[str, Any]) -> None:
    """Notes on `error` the parameter shapes and that they are torch's layouts."""
    shapes = {n: tuple(np.shape(v)) for n, v in params.items()}
    error.add_note(
        f"raised by jax_loss_fn on params with shapes {shapes}: these are torch's "
        "layouts (Linear weights are (out, in), so a port computes x @ W.T + b)."
    )


def _compare_results(
    actual: _StepResult, expected: _StepResult, layout: _Layout
) -> list[Comparison]:
    """The report's rows: the loss, then each gradient, then each parameter after the step.

    A tied weight's rows note its other state_dict names.
    """
    dtype = layout.dtype
    rows = [compare_arrays("loss", "", actual.loss, expected.loss, dtype=dtype)]
    for quantity, got, want in (
        ("grad", actual.grads, expected.grads),
        ("param after step", actual.after, expected.after),
    ):
        rows += [
            _note_ties(compare_arrays(quantity, n, got[n], want[n], dtype=dtype), layout.aliases)
            for n in layout.trainable
        ]
    return rows


def _note_ties(row: Comparison, aliases: Mapping[str, str]) -> Comparison:
    """`row` with a note naming the other state_dict names of its (tied) parameter, if any."""
    others = [alias for alias, name in aliases.items() if name == row.name]
    if not others:
        return row
    note = "; ".join(filter(None, [row.note, f"tied: also {', '.join(others)}"]))
    return dataclasses.replace(row, note=note)
