"""The user-facing transforms: `grad`, `value_and_grad`, `vjp`, with JAX's signatures.

Each call of a transform takes a fresh level, boxes the differentiated leaves
as `Tracer`s, runs the function (dynamic front end first; jaxpr replay when
the function hands a Tracer to a JAX function), then runs the backward pass.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chainrule.engine import core, dynamic, host, jaxtrace, replay, rules
from chainrule.engine.core import ReplayNeeded, Tracer, raw
from chainrule.errors import (
    ArgnumsError,
    AuxError,
    CotangentError,
    InputTypeError,
    NonScalarOutputError,
    UnrecordableJaxCallError,
)

del dynamic  # imported for its side effect: operators on Tracer

_CONTROL_FLOW_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)


# --- arguments ------------------------------------------------------------------


def _normalize_argnums(argnums: Any, fun_name: str) -> tuple[tuple[int, ...], bool]:
    """Returns (argnums as a tuple, whether the user passed a single int)."""
    if isinstance(argnums, (int, np.integer)) and not isinstance(argnums, bool):
        return (int(argnums),), True
    if (
        isinstance(argnums, Sequence)
        and argnums
        and all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in argnums)
    ):
        if len(set(argnums)) != len(argnums):
            raise ArgnumsError(f"{fun_name}: argnums {tuple(argnums)} contains duplicates.")
        return tuple(int(a) for a in argnums), False
    raise ArgnumsError(
        f"{fun_name}: argnums must be an int or a non-empty tuple of ints, got {argnums!r}. "
        "Example: cr.grad(loss, argnums=(0, 1))."
    )


def _resolve_argnums(argnums: tuple[int, ...], n_args: int, fun_name: str) -> tuple[int, ...]:
    out = []
    for a in argnums:
        if not -n_args <= a < n_args:
            raise ArgnumsError(
                f"{fun_name}: argnums={argnums if len(argnums) > 1 else argnums[0]} refers to "
                f"positional argument {a}, but the function was called with {n_args} "
                "positional argument(s). Pass the differentiated values positionally, "
                "or change argnums."
            )
        out.append(a % n_args)
    return tuple(out)


def _arg_name(fun: Callable, i: int) -> str:
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        return f"argument {i}"
    if i < len(params) and params[i].kind in (
        params[i].POSITIONAL_ONLY,
        params[i].POSITIONAL_OR_KEYWORD,
    ):
        return f"argument {i} ('{params[i].name}')"
    return f"argument {i}"


def _box_leaf(x: Any, where: Callable[[], str], fun_name: str, level: int) -> Tracer:
    """Boxes one leaf; `where()` names it, and is only called to report an error."""
    on_host = host.to_host(x)
    if on_host is not None:  # a float32/float64 array: nothing to check
        return Tracer(on_host, core.input_node(on_host), level)
    if isinstance(x, (Tracer, jax.Array)) or isinstance(x, jax.core.Tracer):
        value = x
    elif isinstance(x, (float, int, complex, np.ndarray, np.generic)) and not isinstance(x, str):
        value = jnp.asarray(x)
    else:
        raise InputTypeError(
            f"{fun_name}: {where()} is a {type(x).__name__}, which cannot be differentiated. "
            "Differentiated arguments must be float arrays or pytrees (dicts, lists, "
            "tuples) of them. Pass other values as non-differentiated arguments "
            "(outside argnums) or close over them."
        )
    dtype = raw(value).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else dtype.name
        fix = (
            "chainrule differentiates real floating-point inputs only"
            if kind == "complex"
            else "Convert it first, e.g. jnp.asarray(x, jnp.float32), or leave it out of argnums"
        )
        raise InputTypeError(
            f"{fun_name}: {where()} has dtype {dtype.name}; gradients are only defined for "
            f"floating-point inputs (float16, bfloat16, float32, float64). {fix}."
        )
    return Tracer(value, core.input_node(value), level)


def _leaf_name(fun: Callable, i: int, path: tuple) -> str:
    return _arg_name(fun, i) + (jax.tree_util.keystr(path) if path else "")


def _box_args(fun, args, argnums, level, fun_name):
    """Boxes the leaves of args[argnums]; returns (new args, tracers per argnum, trees)."""
    boxed_args = list(args)
    tracers, trees = [], []
    for i in argnums:
        with_path, tree = jax.tree_util.tree_flatten_with_path(args[i])
        leaves = []
        for path, leaf in with_path:
            where = functools.partial(_leaf_name, fun, i, path)
            leaves.append(_box_leaf(leaf, where, fun_name, level))
        boxed_args[i] = jax.tree_util.tree_unflatten(tree, leaves)
        tracers.append(leaves)
        trees.append(tree)
    return boxed_args, tracers, trees


# --- running the function --------------------------------------------------------


def _run(
    fun: Callable,
    args: list[Any],
    tracers: list[Tracer],
    level: int,
    memo: dict[str, bool] | None = None,
) -> Any:
    """Runs `fun(*args)` on the tape: dynamic front end, else jaxpr replay.

    `memo` (one per function, see `_memo_for`) remembers that `fun` needed replay
    (and whether the JAX-trace front end could not run it, see `_run_replay`),
    so later calls go straight to it: the dynamic attempt is not repeated (nor
    the side effects it ran before failing). Replay is exact whenever it
    succeeds, so this is never stale; should replay fail on a later call (Python
    control flow on a value), the dynamic front end is tried after all.
    """
    if memo is not None and memo.get("replay"):
        try:
            return _run_replay(fun, args, tracers, level, memo)
        except UnrecordableJaxCallError:
            memo["replay"] = False
    try:
        return fun(*args)
    except ReplayNeeded as e:
        if e.level != level:
            raise
    except (TypeError, ValueError) as e:
        if not core.names_tracer(e):
            raise
    out = _run_replay(fun, args, tracers, level, memo)
    if memo is not None:
        memo["replay"] = True
    return out


_MEMOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _memo_for(fun: Callable) -> dict[str, bool]:
    """The front-end memo of `fun` (see `_run`), shared by every `cr.grad(fun)`
    made for the same function object, so `cr.grad(loss)(p)` written inline in
    a loop skips the failed dynamic attempt too. It only orders the front ends,
    so it cannot make a result stale; it lives as long as `fun`."""
    try:
        return _MEMOS.setdefault(fun, {})
    except TypeError:  # not weakly referenceable or not hashable: one per transform
        return {}


def _replay(flat_fun: Callable, values: list[Any], level: int) -> tuple[list[Any], Any]:
    """Jaxpr replay of a whole function (a seam for tests of the fast path)."""
    return replay.replay(flat_fun, values, level)


def _run_replay(fun: Callable, args: list, tracers: list[Tracer], level: int, memo=None) -> Any:
    """The JAX-trace front end when it applies, else jaxpr replay; `memo` as in `_run`."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    lifted = [i for i, x in enumerate(leaves) if isinstance(x, Tracer)]

    def flat_fun(*xs):
        full = list(leaves)
        for i, x in zip(lifted, xs, strict=True):
            full[i] = x
        return fun(*jax.tree_util.tree_unflatten(tree, full))

    lifted_values = [leaves[i] for i in lifted]
    if (memo is None or memo.get("jaxtrace", True)) and jaxtrace.eligible(lifted_values, level):
        # The fast path (see `engine/jaxtrace.py`): the function runs once, eagerly.
        # Whatever it leaves to replay (or any error) is replayed below, which
        # gives the same result, or the error with its source line. The memo
        # then sends later calls of `fun` straight to replay.
        out_tree: list[Any] = []

        def flat_out(*xs):
            leaves_out, t = jax.tree_util.tree_flatten(flat_fun(*xs))
            out_tree.append(t)
            return leaves_out

        try:
            outs = jaxtrace.run(flat_out, lifted_values)
        except Exception:  # noqa: BLE001 - replay reproduces it or handles it
            if memo is not None:
                memo["jaxtrace"] = False
        else:
            return jax.tree_util.tree_unflatten(out_tree[0], outs)

    try:
        outs, out_tree = _replay(flat_fun, lifted_values, level)
    except _CONTROL_FLOW_ERRORS as e:
        raise UnrecordableJaxCallError(
            "The function passes a differentiated value to a jax.numpy/jax.nn/lax function, "
            "so chainrule captures it as a jaxpr, and it also uses Python control flow or "
            "conversions (if/while, float(), int(), np.asarray) on a differentiated value, "
            "which a jaxpr cannot capture. Either use chainrule.numpy functions and array "
            "methods (x.sum(), x @ w, ...) instead of jax.numpy, so that the function runs "
            "eagerly like PyTorch, or replace the Python control flow with jnp.where / "
            f"lax.cond. JAX said: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    return jax.tree_util.tree_unflatten(out_tree, outs)


def _unbox(x: Any, level: int) -> Any:
    return x.value if isinstance(x, Tracer) and x.level == level else x


def _zeros_for(t: Tracer) -> Any:
    return rules.zeros_like(t.value)


# --- vjp ---------------------------------------------------------------------------


def vjp(fun: Callable, *primals: Any, has_aux: bool = False):
    """Computes `fun(*primals)` and a function that pulls cotangents back through it.

    Same signature and semantics as `jax.vjp`, computed by chainrule's own rules.

    Args:
      fun: function of pytrees of float arrays, written with `jax.numpy`,
        `jax.nn`, `lax` or `chainrule.numpy`.
      *primals: the point at which to differentiate; every leaf is differentiated.
      has_aux: `fun` returns `(output, aux)`; `aux` is returned, not differentiated.

    Returns:
      `(output, vjp_fn)` or `(output, vjp_fn, aux)`. `vjp_fn(cotangent)` takes a
      cotangent with the structure, shapes and dtypes of `output` and returns a
      tuple with one cotangent per primal. It may be called many times.

    Examples:
      >>> import jax.numpy as jnp, chainrule as cr
      >>> out, vjp_fn = cr.vjp(lambda x: jnp.sin(x) * 2.0, 0.0)
      >>> (x_bar,) = vjp_fn(1.0)
      >>> float(x_bar)
      2.0
    """
    _check_callable(fun, "cr.vjp")
    level = core.new_level()
    argnums = tuple(range(len(primals)))
    boxed, tracers, trees = _box_args(fun, primals, argnums, level, "cr.vjp")
    with _quiet():
        out = _run(fun, boxed, [t for ts in tracers for t in ts], level)
    aux = None
    if has_aux:
        out, aux = _split_aux(out, "cr.vjp")
        aux = host.tree_to_jax(jax.tree_util.tree_map(lambda x: _unbox(x, level), aux), copy=True)
    out_leaves, out_tree = jax.tree_util.tree_flatten(out)
    primal_out = jax.tree_util.tree_unflatten(out_tree, [_output(o, level) for o in out_leaves])

    def vjp_fn(cotangent: Any) -> tuple[Any, ...]:
        ct_leaves = _check_cotangent(cotangent, out_tree, out_leaves, level)
        seeds = [
            (o.node, ct)
            for o, ct in zip(out_leaves, ct_leaves, strict=True)
            if isinstance(o, Tracer) and o.level == level
        ]
        with _quiet():
            input_cts = core.backward(seeds, rules.add_cotangents, release=False)
            return tuple(
                jax.tree_util.tree_unflatten(tree, [_input_ct(t, input_cts) for t in ts])
                for ts, tree in zip(tracers, trees, strict=True)
            )

    if has_aux:
        return primal_out, vjp_fn, aux
    return primal_out, vjp_fn


def _input_ct(t: Tracer, input_cts: dict) -> Any:
    """The cotangent of input `t`, as a `jax.Array` (or a Tracer of an outer level)."""
    ct = input_cts.get(t.node)
    if ct is None:  # the output does not depend on this input: its gradient is 0
        return host.to_jax(_zeros_for(t))
    return host.to_jax(rules.convert_element_type(ct, rules.dtype_of(t.value)))


def _output(x: Any, level: int) -> Any:
    """An output of the user's function, unboxed and handed back as JAX values:
    computed values as they are, anything the function returned untouched copied."""
    if isinstance(x, Tracer) and x.level == level:
        return host.to_jax(x.value)
    return host.to_jax(x, copy=True)


def _quiet():
    """NumPy's floating-point warnings off while chainrule evaluates on the host:
    like XLA, an overflow gives inf and an invalid operation NaN, silently."""
    return np.errstate(all="ignore")


def _check_cotangent(cotangent, out_tree, out_leaves, level) -> list[Any]:
    ct_leaves, ct_tree = jax.tree_util.tree_flatten(cotangent)
    if ct_tree != out_tree:
        raise CotangentError(
            f"vjp_fn: the cotangent's structure {ct_tree} does not match the function's "
            f"output structure {out_tree}. Pass one cotangent per output leaf, e.g. "
            "jax.tree_util.tree_map(jnp.ones_like, output)."
        )
    checked = []
    for i, (ct, o) in enumerate(zip(ct_leaves, out_leaves, strict=True)):
        oshape, odtype = rules.shape_of(o), raw(o).dtype if hasattr(raw(o), "dtype") else None
        if isinstance(ct, (float, int)) and not isinstance(ct, bool):
            ct = jnp.asarray(ct, dtype=odtype)
        cshape = rules.shape_of(ct)
        if cshape != oshape:
            raise CotangentError(
                f"vjp_fn: cotangent leaf {i} has shape {cshape}, but the output leaf it "
                f"belongs to has shape {oshape}. A cotangent must have its output's shape."
            )
        cdtype = raw(ct).dtype
        if odtype is not None and jnp.issubdtype(odtype, jnp.inexact) and cdtype != odtype:
            raise CotangentError(
                f"vjp_fn: cotangent leaf {i} has dtype {cdtype}, but the output leaf it "
                f"belongs to has dtype {odtype}. Cast it, e.g. ct.astype({odtype.name!r})."
            )
        checked.append(ct)
    return checked


def vjp_flat(fun: Callable, primals: Sequence[Any], cotangents: Sequence[Any]) -> list[Any]:
    """Internal: VJP of a function of flat arrays returning a flat list of arrays."""
    level = core.new_level()
    tracers = [Tracer(p, core.input_node(p), level) for p in primals]
    outs = fun(*tracers)
    seeds = [
        (o.node, ct)
        for o, ct in zip(outs, cotangents, strict=True)
        if isinstance(o, Tracer) and o.level == level
    ]
    input_cts = core.backward(seeds, rules.add_cotangents, release=True)
    return [_input_ct(t, input_cts) for t in tracers]


# --- grad and value_and_grad -----------------------------------------------------------


def value_and_grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False):
    """Returns a function computing `fun`'s value and gradient, like `jax.value_and_grad`.

    Args:
      fun: a function returning a real scalar (a loss), written with `jax.numpy`,
        `jax.nn`, `lax` or `chainrule.numpy`. Differentiated arguments are float
        arrays or pytrees of them.
      argnums: which positional argument(s) to differentiate.
      has_aux: `fun` returns `(loss, aux)`; `aux` is passed through.

    Returns:
      A function with `fun`'s signature returning `(value, grad)`, or
      `((value, aux), grad)` with `has_aux`. `grad` has the structure of the
      differentiated argument (a tuple of them if `argnums` is a tuple).

    Examples:
      >>> import chainrule as cr
      >>> loss, dw = cr.value_and_grad(lambda w, x, y: (w * x - y) ** 2)(1.0, 1.0, 2.0)
      >>> float(loss), float(dw)
      (1.0, -2.0)
    """
    _check_callable(fun, "cr.value_and_grad")
    return _value_and_grad(fun, argnums, has_aux, want_value=True)


def _value_and_grad(fun: Callable, argnums: Any, has_aux: bool, want_value: bool):
    """`value_and_grad`; without `want_value` the value is not handed back as a
    `jax.Array` (`grad` drops it), which saves a host-to-JAX transfer."""
    argnums_t, single = _normalize_argnums(argnums, "cr.value_and_grad")

    name = f"cr.grad of {getattr(fun, '__name__', 'function')}"
    memo = _memo_for(fun)  # see `_run`

    @functools.wraps(fun)
    def value_and_grad_fun(*args: Any, **kwargs: Any):
        nums = _resolve_argnums(argnums_t, len(args), name)
        level = core.new_level()
        boxed, tracers, trees = _box_args(fun, args, nums, level, name)
        call = functools.partial(fun, **kwargs) if kwargs else fun
        with _quiet():
            out = _run(call, boxed, [t for ts in tracers for t in ts], level, memo)
            aux = None
            if has_aux:
                out, aux = _split_aux(out, name)
                aux = jax.tree_util.tree_map(lambda x: _unbox(x, level), aux)
                aux = host.tree_to_jax(aux, copy=True)
            _check_scalar(out, name)
            if isinstance(out, Tracer) and out.level == level:
                one = np.ones((), raw(out).dtype)
                input_cts = core.backward([(out.node, one)], rules.add_cotangents, release=True)
            else:  # the output does not depend on the differentiated inputs
                input_cts = {}
            grads = tuple(
                jax.tree_util.tree_unflatten(tree, [_input_ct(t, input_cts) for t in ts])
                for ts, tree in zip(tracers, trees, strict=True)
            )
        value = _output(out, level) if want_value else None
        if has_aux:
            value = (value, aux)
        return value, grads[0] if single else grads

    return value_and_grad_fun


def grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False):
    """Returns a function computing the gradient of `fun`, like `jax.grad`.

    Args:
      fun: a function returning a real scalar (a loss); see `value_and_grad`.
      argnums: which positional argument(s) to differentiate.
      has_aux: `fun` returns `(loss, aux)`; the result is then `(grad, aux)`.

    Returns:
      A function with `fun`'s signature returning the gradient (the structure
      of the differentiated argument, or a tuple of them).

    Examples:
      >>> import chainrule as cr
      >>> float(cr.grad(lambda w, x, y: (w * x - y) ** 2)(1.0, 1.0, 2.0))
      -2.0
    """
    _check_callable(fun, "cr.grad")
    value_and_grad_fun = _value_and_grad(fun, argnums, has_aux, want_value=False)

    @functools.wraps(fun)
    def grad_fun(*args: Any, **kwargs: Any):
        value, g = value_and_grad_fun(*args, **kwargs)
        return (g, value[1]) if has_aux else g

    return grad_fun


# --- checks ------------------------------------------------------------------------


def _check_callable(fun: Any, name: str) -> None:
    if not callable(fun):
        raise TypeError(
            f"{name} expects a function as its first argument, got {type(fun).__name__}. "
            f"Usage: {name}(loss)(params, ...)."
        )


def _split_aux(out: Any, name: str) -> tuple[Any, Any]:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise AuxError(
            f"{name}: has_aux=True requires the function to return a pair (output, aux), "
            f"but it returned {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            + ". Return e.g. `return loss, {'accuracy': acc}`, or drop has_aux."
        )
    return out[0], out[1]


def _check_scalar(out: Any, name: str) -> None:
    value = raw(out)
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        if isinstance(out, (float, int)) and not isinstance(out, bool):
            return
        raise NonScalarOutputError(
            f"{name} requires the function to return a real scalar (e.g. a loss), but it "
            f"returned a {type(out).__name__}. With several outputs use cr.vjp; to return "
            "extra values use has_aux=True."
        )
    if tuple(shape) != ():
        raise NonScalarOutputError(
            f"{name} requires a scalar output; the function returned shape {tuple(shape)}. "
            "Reduce it (e.g. .mean() or .sum()) or use cr.vjp for non-scalar outputs."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise NonScalarOutputError(
            f"{name} requires a real floating-point output; the function returned dtype "
            f"{dtype.name}. Gradients of integer, boolean or complex outputs are not defined; "
            "compute the loss in floating point."
        )
