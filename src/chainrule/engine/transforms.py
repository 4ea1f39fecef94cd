"""The user-facing transforms `grad`, `value_and_grad`, `vjp`, `fwd_and_bwd` (JAX's signatures).

Each call of a transform makes a new `Trace` (a fresh level), boxes the
differentiated leaves as `Tracer`s, runs the function once with that trace
current (`_trace_call`), then runs the backward pass (`core.backward`) on the
trace outside and hands the cotangents back as pytrees.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from chainrule.engine import core, debugging, host, rules
from chainrule.engine.arrays import ArrayTracer
from chainrule.engine.core import Node, Trace, Tracer, raw
from chainrule.errors import (
    ArgnumsError,
    AuxError,
    CotangentError,
    InputTypeError,
    NonScalarOutputError,
)

# --- arguments ------------------------------------------------------------------


def _normalize_argnums(
    argnums: Any, fun_name: str, python_int_single: bool = False
) -> tuple[tuple[int, ...], bool]:
    """Returns (argnums as a tuple, whether the user passed a single int).

    As JAX reads them: an integer (a bool, a NumPy integer, a 0-d integer
    array) is one argument number, a sequence or 1-d integer array several.
    With `python_int_single` (`jax.jacrev`'s reading) only a Python int
    counts as single: other integers give a 1-tuple of results, as in JAX."""
    single = isinstance(argnums, int) or not python_int_single
    if isinstance(argnums, jax.Array) and not isinstance(argnums, jax.core.Tracer):
        argnums = np.asarray(argnums)  # a concrete integer array: as a NumPy one
    if isinstance(argnums, np.ndarray) and argnums.dtype.kind in "iu" and argnums.ndim <= 1:
        argnums = argnums.tolist()  # (a Python int, or a list of them)
    if isinstance(argnums, (int, np.integer)):
        return (int(argnums),), single
    if isinstance(argnums, Sequence) and argnums:  # entries as JAX reads them: any
        argnums = [_index_or_none(a) for a in argnums]  # integer scalar (a 0-d array too)
    if (
        isinstance(argnums, Sequence)
        and argnums
        and all(isinstance(a, (int, np.integer)) for a in argnums)
    ):
        if len(set(argnums)) != len(argnums):
            raise ArgnumsError(f"{fun_name}: argnums {tuple(argnums)} contains duplicates.")
        return tuple(int(a) for a in argnums), False
    raise ArgnumsError(
        f"{fun_name}: argnums must be an int or a non-empty tuple of ints, got {argnums!r}. "
        "Example: cr.grad(loss, argnums=(0, 1))."
    )


def _index_or_none(a: Any) -> Any:
    """An argnums entry as an int if it is an integer scalar (a NumPy or
    concrete 0-d JAX integer array too, as `operator.index` reads it); else
    as it is, for the error below to name it."""
    if isinstance(a, (bool, int, np.integer)) or isinstance(a, jax.core.Tracer):
        return a
    if isinstance(a, (np.ndarray, jax.Array)) and a.ndim == 0 and a.dtype.kind in "iu":
        return int(a)
    return a


def _resolve_argnums(argnums: tuple[int, ...], n_args: int, fun_name: str) -> tuple[int, ...]:
    if len(argnums) == 1 and 0 <= argnums[0] < n_args:  # the common case
        return argnums
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
    if len(out) > 1 and len(set(out)) != len(out):
        raise ArgnumsError(
            f"{fun_name}: argnums={argnums} names the same positional argument twice "
            f"(as {tuple(out)} for {n_args} arguments). Each argument may appear once."
        )
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


def _box_leaf(
    x: Any, where: Callable[[], str], fun_name: str, trace: Trace, mode: _InputMode
) -> Any:
    """Boxes one leaf; `where()` names it, and is only called to report an error.

    An integer or boolean leaf that `mode` allows (`allow_int`, or `cr.vjp`) is
    returned unboxed: its cotangent is a float0 zero array, as in JAX.
    """
    if not mode.holomorphic and type(x) is not np.ma.MaskedArray:
        on_host = host.to_host(x)
        if on_host is not None:  # a float32/float64 array: nothing to check
            return trace.new_input(on_host)
    if isinstance(x, np.ma.MaskedArray):  # (an ndarray: its mask would be ignored)
        raise ValueError(
            f"{fun_name}: {where()} is a NumPy masked array; JAX does not support masked "
            "arrays, and its data would be used with the mask ignored. Pass "
            "x.filled(fill_value), or the data and the mask as separate arrays."
        )
    if isinstance(x, (Tracer, jax.Array)) or isinstance(x, jax.core.Tracer):
        value = x
    elif isinstance(x, (float, int, complex, np.ndarray, np.generic)) and not isinstance(x, str):
        value = jnp.asarray(x)
    else:
        raise InputTypeError(
            f"{fun_name}: {where()} is a {type(x).__name__}, which cannot be differentiated. "
            "Differentiated arguments must be float or complex arrays or pytrees (dicts, "
            "lists, tuples) of them. Pass other values as non-differentiated arguments "
            "(outside argnums) or close over them."
        )
    dtype = np.dtype(raw(value).dtype) if isinstance(raw(value).dtype, np.dtype) else None
    if dtype is not None and mode.holomorphic and not jnp.issubdtype(dtype, jnp.complexfloating):
        raise InputTypeError(
            f"{fun_name} with holomorphic=True requires inputs with complex dtype, but "
            f"{where()} has dtype {dtype.name}. Convert it, e.g. "
            "jnp.asarray(x, jnp.complex64), or drop holomorphic=True for a real input."
        )
    if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
        return trace.new_input(value)
    if dtype is not None and (jnp.issubdtype(dtype, jnp.integer) or dtype == np.bool_):
        if mode.allow_int:
            # handed to `fun` as JAX hands it: a Python int stays one, a NumPy
            # array stays NumPy (in JAX's canonical dtype), so `n / 3` or
            # `n + 0.5` computes as under jax.grad (in NumPy, float64)
            if isinstance(x, int) and not isinstance(x, bool):
                return x
            if isinstance(x, (np.ndarray, np.generic)):
                return np.asarray(x, jax.dtypes.canonicalize_dtype(x.dtype))
            return value
        raise InputTypeError(
            f"{fun_name}: {where()} has dtype {dtype.name}; gradients are only defined for "
            "floating-point or complex inputs (float16, bfloat16, float32, float64, "
            "complex64, complex128). Convert it first, e.g. jnp.asarray(x, jnp.float32), "
            "leave it out of argnums, or pass allow_int=True to get a float0 zero "
            "gradient for it (as jax.grad does)."
        )
    if dtype is None and mode.allow_int and jnp.issubdtype(raw(value).dtype, jax.dtypes.prng_key):
        return value  # a typed PRNG key: held fixed like an integer, as JAX does
    name = dtype.name if dtype is not None else str(raw(value).dtype)
    raise InputTypeError(
        f"{fun_name}: {where()} has dtype {name}, which has no gradient (inputs must be "
        "floating-point or complex, or integer/boolean with allow_int=True). Leave it "
        "out of argnums or close over it."
    )


class _InputMode(NamedTuple):
    """What a transform accepts as differentiated inputs (JAX's flags)."""

    holomorphic: bool = False
    allow_int: bool = False


_REAL_INPUTS = _InputMode()  # jax.grad's defaults: inexact inputs only


def _leaf_name(fun: Callable, i: int, path: tuple) -> str:
    return _arg_name(fun, i) + (jax.tree_util.keystr(path) if path else "")


def _box_args(fun, args, argnums, trace, fun_name, mode):
    """Boxes the leaves of args[argnums]; returns (new args, tracers per argnum, trees)."""
    boxed_args = list(args)
    tracers, trees = [], []
    for i in argnums:
        with_path, tree = jax.tree_util.tree_flatten_with_path(args[i])
        leaves = []
        for path, leaf in with_path:
            where = functools.partial(_leaf_name, fun, i, path)
            leaves.append(_box_leaf(leaf, where, fun_name, trace, mode))
        boxed_args[i] = jax.tree_util.tree_unflatten(tree, leaves)
        tracers.append(leaves)
        trees.append(tree)
    return boxed_args, tracers, trees


# --- running the function once ----------------------------------------------------------


def trace_call(
    fun: Callable,
    args: Sequence[Any],
    nums: tuple[int, ...],
    name: str,
    prepare: Callable[[Trace, list[Any]], None] | None = None,
    mode: _InputMode = _REAL_INPUTS,
):
    """Runs `fun(*args)` once on a new trace, the leaves of `args[nums]` boxed.

    Returns (trace, output, boxed leaves per argnum, their tree structures).
    `prepare(trace, boxed_args)` may box more before the run (`cr.explain`
    boxes constants); `mode` says which input dtypes are accepted. The trace
    is invalidated when `fun` returns, so a Tracer that escapes the call
    raises JAX's `UnexpectedTracerError` when used.
    """
    trace = Trace(ArrayTracer)
    boxed, tracers, trees = _box_args(fun, args, nums, trace, name, mode)
    if prepare is not None:
        prepare(trace, boxed)
    try:
        out = trace.run(fun, *boxed)
    finally:
        trace.invalidate()
    return trace, out, tracers, trees


def _unbox(x: Any, trace: Trace) -> Any:
    return x.value if isinstance(x, Tracer) and x._trace is trace else x


def gradients(tracers: list[list[Tracer]], trees: list[Any], input_cts: dict) -> tuple:
    """The cotangents of the boxed inputs, as pytrees shaped like the arguments."""
    return _gradients([[_input_entry(t) for t in ts] for ts in tracers], trees, input_cts)


def _gradients(entries: list[list[Any]], trees: list[Any], input_cts: dict) -> tuple:
    return tuple(
        jax.tree_util.tree_unflatten(tree, [_input_ct(e, input_cts) for e in es])
        for es, tree in zip(entries, trees, strict=True)
    )


def _input_entry(t: Any) -> Any:
    """What the cotangent of an input leaf needs: its input node (a boxed
    leaf), or its shape (an integer or boolean leaf, not boxed)."""
    return t.node if isinstance(t, Tracer) else np.shape(t)


def _input_ct(entry: Any, input_cts: dict) -> Any:
    """The cotangent of an input leaf (`_input_entry`), as a `jax.Array` (or a
    Tracer of an outer level), weakly typed if the input is (as JAX's cotangents
    take their primal's type); for an integer or boolean input, JAX's float0
    zeros."""
    if not isinstance(entry, Node):  # (JAX's host array type for it, strongly typed)
        return host.TypedNdArray(np.zeros(entry, jax.dtypes.float0))
    value = entry.ans  # (the input itself)
    ct = input_cts.get(entry)
    if ct is None:  # the output does not depend on this input: its gradient is 0
        ct = host.to_jax(core.zeros_like(value))
    else:
        ct = host.to_jax(rules.convert_element_type(ct, rules.dtype_of(value)))
    return weak_as(ct, value)


# --- vjp ---------------------------------------------------------------------------


def vjp(fun: Callable, *primals: Any, has_aux: bool = False, reduce_axes: Sequence[Any] = ()):
    """Computes `fun(*primals)` and a function that pulls cotangents back through it.

    Same signature and semantics as `jax.vjp`, computed by chainrule's own rules.

    Args:
      fun: function of pytrees of float arrays, written with `jax.numpy`,
        `jax.nn`, `lax` or `chainrule.numpy`.
      *primals: the point at which to differentiate; every leaf is differentiated.
      has_aux: `fun` returns `(output, aux)`; `aux` is returned, not differentiated.
      reduce_axes: only `()`, as in JAX, which deprecated it.

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
    deprecated_reduce_axes(reduce_axes, "vjp")
    primal_out, vjp_fn, aux = vjp_parts(fun, primals, has_aux)
    if has_aux:
        return primal_out, vjp_fn, aux
    return primal_out, vjp_fn


def vjp_parts(fun: Callable, primals: Sequence[Any], has_aux: bool):
    """`vjp`'s work: `(output, vjp_fn, aux)`, where `vjp_fn` is a `Pullback`."""
    nums = tuple(range(len(primals)))
    with host.evaluating():
        # as jax.vjp: integer and boolean primals get float0 zero cotangents
        mode = _InputMode(allow_int=True)
        trace, out, tracers, trees = trace_call(fun, primals, nums, "cr.vjp", mode=mode)
    aux = None
    if has_aux:
        out, aux = _split_aux(out, "cr.vjp")
        aux = jax.tree_util.tree_map(lambda x: _output(x, trace), aux)
    out_leaves, out_tree = jax.tree_util.tree_flatten(out)
    primal_out = jax.tree_util.tree_unflatten(out_tree, [_output(o, trace) for o in out_leaves])
    return primal_out, pullback_of(trace, out_leaves, out_tree, tracers, trees), aux


def pullback_of(trace: Trace, out_leaves, out_tree, tracers, trees) -> Pullback:
    """The `Pullback` from the output leaves of a call `trace_call` ran to its
    boxed inputs (`tracers`, shaped as `trees`)."""
    outs = [o.node if isinstance(o, Tracer) and o._trace is trace else None for o in out_leaves]
    ins = [[_input_entry(t) for t in ts] for ts in tracers]
    types = [_cotangent_type(o) for o in out_leaves]
    return Pullback(outs, out_tree, types, ins, trees)


class Pullback:
    """The function `cr.vjp` returns: output cotangents -> input cotangents,
    one pass over the recorded tape per call (it may be called many times).

    A pytree, as JAX's vjp_fn is: its leaves are the arrays the backward pass
    reads (the nodes' operands and outputs), its structure the tape. So it can
    be returned from `jax.jit`, passed into a jitted function or a
    `lax.scan`, or be a `custom_vjp` residual; its copies hold the arrays
    they are rebuilt with (`core.tape_with`).
    """

    def __init__(self, outs, out_tree, out_types, ins, in_trees, tape=None, template=None):
        self._outs = outs  # per output leaf: its node, or None (not computed from inputs)
        self._out_tree = out_tree
        self._out_types = out_types  # per output leaf: (shape, dtype) of its cotangent
        self._ins = ins  # per argument, per leaf: its input node, or its shape (untraced)
        self._in_trees = in_trees
        self._tape = tape  # (`tape()`, found when first needed: flattening)
        # the Pullback this one was rebuilt from (`_unflatten_pullback`; None: it
        # is its own) is its tree structure, so that the copies a jitted function
        # hands back on every call have one structure (`jax.jit` of a function
        # taking them then compiles once, as `fwd_and_bwd` promises)
        self._template = template

    def tape(self) -> list[Node]:
        """The nodes a backward pass may reach, the inputs' too, in creation order."""
        if self._tape is None:
            roots = [n for n in self._outs if n is not None]
            roots += [n for i in self._ins for n in i if isinstance(n, Node)]
            self._tape = core.tape_of(roots)
        return self._tape

    def __call__(self, cotangent: Any) -> tuple[Any, ...]:
        return self.pull(cotangent)

    def pull(self, cotangent: Any, at_zero: bool = False) -> tuple[Any, ...]:
        """`self(cotangent)`; `at_zero=True` for forward mode's pass at zero
        cotangents (`core.backward`), which `forward._linearize` records."""
        ct_leaves = _check_cotangent(cotangent, self._out_tree, self._out_types)
        seeds = [(n, ct) for n, ct in zip(self._outs, ct_leaves, strict=True) if n is not None]
        # on the caller's current trace (e.g. under jax.jit(vjp_fn)), as JAX's vjp_fn
        with host.evaluating():
            input_cts = core.backward(seeds, release=False, at_zero=at_zero)
            return _gradients(self._ins, self._in_trees, input_cts)

    def __repr__(self) -> str:
        return f"<cr.vjp function of {len(self.tape())} nodes>"


def _flatten_pullback(p: Pullback) -> tuple[list[Any], Pullback]:
    return core.tape_residuals(p.tape()), p._template or p


def _unflatten_pullback(p: Pullback, residuals: Sequence[Any]) -> Pullback:
    copies = core.tape_with(p.tape(), residuals)
    outs = [None if n is None else copies[n] for n in p._outs]
    ins = [[copies[n] if isinstance(n, Node) else n for n in i] for i in p._ins]
    tape = [copies[n] for n in p.tape()]
    return Pullback(outs, p._out_tree, p._out_types, ins, p._in_trees, tape, template=p)


jax.tree_util.register_pytree_node(Pullback, _flatten_pullback, _unflatten_pullback)


def fwd_and_bwd(
    fun: Callable, argnums: int | Sequence[int], has_aux: bool = False, jitted: bool = True
) -> tuple[Callable, Callable]:
    """The forward and backward passes of `fun` as two functions, like `jax.fwd_and_bwd`.

    `fwd(*args)` is `cr.vjp` of `fun` in the arguments `argnums` names (the
    others held fixed): it returns `(output, residuals)`, or `(output,
    residuals, aux)` with `has_aux`. `bwd(residuals, cotangent)` returns the
    cotangents of those arguments: one if `argnums` is an int, else a tuple.
    With `jitted` (the default) both are `jax.jit` functions, and `bwd`
    compiles once for all the residuals `fwd` hands back (they are a
    `cr.vjp` function, a pytree of the arrays the backward pass reads).
    Keyword arguments of `fwd` are passed to `fun`, not differentiated.

    Examples:
      >>> import jax.numpy as jnp, chainrule as cr
      >>> fwd, bwd = cr.fwd_and_bwd(lambda x, w: jnp.sum(x * w), argnums=1)
      >>> out, residuals = fwd(jnp.arange(3.0), jnp.ones(3))
      >>> bwd(residuals, 1.0).tolist()
      [0.0, 1.0, 2.0]
    """
    _check_callable(fun, "cr.fwd_and_bwd")
    nums, single = _normalize_argnums(argnums, "cr.fwd_and_bwd")
    name = f"cr.fwd_and_bwd of {getattr(fun, '__name__', 'function')}"

    def fwd(*args: Any, **kwargs: Any):
        resolved = _resolve_argnums(nums, len(args), name)

        def of_differentiated(*dyn: Any) -> Any:
            full = list(args)
            for i, d in zip(resolved, dyn, strict=True):
                full[i] = d
            return fun(*full, **kwargs)

        return vjp(of_differentiated, *(args[i] for i in resolved), has_aux=has_aux)

    def bwd(residuals: Any, cotangent: Any) -> Any:
        if not isinstance(residuals, Pullback):
            raise TypeError(
                f"{name}: bwd takes the residuals fwd returned (its second result) "
                f"and a cotangent, got {type(residuals).__name__} as residuals."
            )
        cts = residuals(cotangent)
        return cts[0] if single else cts

    if jitted:
        return jax.jit(fwd), jax.jit(bwd)
    return fwd, bwd


def weak_as(x: Any, like: Any) -> Any:
    """`x` (a `jax.Array` or a JAX tracer) weakly typed exactly where `like` is,
    as JAX hands back a derivative: a Python number's gradient stays weakly
    typed, so `params - lr * grad` promotes as under `jax.grad`, and a strong
    input's is strong (even if a weak constant, a Python-number carry, made
    it). A chainrule Tracer (an inner transform's result, inside an outer one:
    `jacfwd(jacrev(f))`) is typed by a recorded conversion, so the outer
    transform sees the weak type JAX's would."""
    weak = getattr(like, "weak_type", None)
    if weak is None:  # a NumPy value (strong), or a Python number (weak; not a bool,
        weak = type(like) in (int, float, complex)  # and np.float64 is not one)
    return rules.weakly_typed(x, weak)


def _output(x: Any, trace: Trace) -> Any:
    """A leaf of the user's function's output or aux, handed back as JAX hands
    it back: a traced value, or a value chainrule computed on the host (a
    `HostArray`, e.g. `stop_gradient(x)`), as a `jax.Array` (copied where the
    function may still hold it); the function's own NumPy values and Python
    numbers untouched (a NumPy int64 stays one, it is not cut to int32)."""
    if isinstance(x, Tracer) and x._trace is trace:
        return host.to_jax(x.value)
    if isinstance(x, host.HOST_TYPES) and type(x) is not host.HostArray:
        return x
    return host.to_jax(x, copy=True)


_PYTHON_KINDS = ((bool, np.bool_), (int, np.int64), (float, np.float64), (complex, np.complex128))


def _cotangent_type(o: Any) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) of an output leaf as its cotangent must have them (dtype
    None for a leaf without one), the dtype as JAX reads a NumPy value."""
    value = raw(o)
    odtype = value.dtype if hasattr(value, "dtype") else None
    if isinstance(value, (np.ndarray, np.generic)):  # handed back as JAX reads it
        odtype = jax.dtypes.canonicalize_dtype(odtype)
    return rules.shape_of(o), odtype


def _check_cotangent(cotangent, out_tree, out_types) -> list[Any]:
    ct_leaves, ct_tree = jax.tree_util.tree_flatten(cotangent)
    if ct_tree != out_tree:
        raise CotangentError(
            f"vjp_fn: the cotangent's structure {ct_tree} does not match the function's "
            f"output structure {out_tree}. Pass one cotangent per output leaf, e.g. "
            "jax.tree_util.tree_map(jnp.ones_like, output)."
        )
    checked = []
    for i, (ct, (oshape, odtype)) in enumerate(zip(ct_leaves, out_types, strict=True)):
        if isinstance(ct, (int, float, complex)) and not isinstance(ct, np.generic):
            # a Python number as JAX types it: a float is float32 without x64
            # and float64 with it (so a float32 output refuses it then, as JAX
            # does); an int is an integer, which JAX refuses too
            kind = next(k for t, k in _PYTHON_KINDS if isinstance(ct, t))
            dtype = jax.dtypes.canonicalize_dtype(kind)
            ct = jnp.asarray(ct, dtype=odtype) if dtype == odtype else np.asarray(ct, dtype)
        elif isinstance(ct, (np.ndarray, np.generic)):
            # as JAX reads a NumPy array: float64 is float32 without jax_enable_x64
            canonical = jax.dtypes.canonicalize_dtype(ct.dtype)
            ct = ct if ct.dtype == canonical else np.asarray(ct, canonical)
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


# --- grad and value_and_grad -----------------------------------------------------------


def value_and_grad(
    fun: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    holomorphic: bool = False,
    allow_int: bool = False,
    reduce_axes: Sequence[Any] = (),
    *,
    taps: bool = False,
    check_finite: bool = False,
):
    """Returns a function computing `fun`'s value and gradient, like `jax.value_and_grad`.

    Args:
      fun: a function returning a real scalar (a loss), written with `jax.numpy`,
        `jax.nn`, `lax` or `chainrule.numpy`. Differentiated arguments are float
        or complex arrays or pytrees of them.
      argnums: which positional argument(s) to differentiate.
      has_aux: `fun` returns `(loss, aux)`; `aux` is passed through.
      holomorphic: `fun` is promised to be holomorphic; its inputs and output
        must then be complex, and the gradient is `f'(z)` (the cotangent of
        the output seeded with 1).
      allow_int: integer and boolean inputs are accepted; their gradient is
        an array of zeros of dtype `jax.dtypes.float0`, as in JAX.
      reduce_axes: only `()`, as in JAX, which deprecated it.
      taps: also return the cotangents of the intermediates marked with
        `cr.tap(x, name)` inside `fun`, as a dict name -> cotangent.
      check_finite: watch the backward pass and raise `NonFiniteGradientError`
        with a provenance report (primitive, line, values, likely cause) at the
        first node whose cotangent becomes NaN or infinite; under `jax.jit` the
        compiled program raises it when it runs.

    Returns:
      A function with `fun`'s signature returning `(value, grad)`, or
      `((value, aux), grad)` with `has_aux`, and `taps` as a third element with
      `taps=True`. `grad` has the structure of the differentiated argument (a
      tuple of them if `argnums` is a tuple).

    For a real loss of complex inputs the gradient follows JAX's convention:
    the conjugate of `df/dx + i df/dy` (so gradient descent steps along
    `conj(grad)`), the same numbers `jax.grad` gives.

    Examples:
      >>> import chainrule as cr
      >>> loss, dw = cr.value_and_grad(lambda w, x, y: (w * x - y) ** 2)(1.0, 1.0, 2.0)
      >>> float(loss), float(dw)
      (1.0, -2.0)
      >>> complex(cr.grad(lambda z: abs(z) ** 2)(3.0 + 4.0j))
      (6-8j)
    """
    _check_callable(fun, "cr.value_and_grad")
    deprecated_reduce_axes(reduce_axes, "grad")
    mode = _InputMode(holomorphic, allow_int)
    return functools.wraps(fun)(
        _value_and_grad(fun, argnums, has_aux, True, mode, taps, check_finite)
    )


def _value_and_grad(
    fun: Callable,
    argnums: Any,
    has_aux: bool,
    want_value: bool,
    mode: Any,
    taps: bool = False,
    check_finite: bool = False,
):
    """`value_and_grad` (the function returned, not yet named after `fun`);
    without `want_value` the value is not handed back as a `jax.Array` (`grad`
    drops it), which saves a host-to-JAX transfer."""
    argnums_t, single = _normalize_argnums(
        argnums, "cr.value_and_grad" if want_value else "cr.grad"
    )

    name = f"cr.grad of {getattr(fun, '__name__', 'function')}"

    def value_and_grad_fun(*args: Any, **kwargs: Any):
        nums = _resolve_argnums(argnums_t, len(args), name)
        call = functools.partial(fun, **kwargs) if kwargs else fun
        sink = debugging.TapSink() if taps else None
        check = debugging.FiniteCheck() if check_finite else None
        with host.evaluating():
            with core.recording(check.record) if check else contextlib.nullcontext():
                trace, out, tracers, trees = trace_call(
                    call, args, nums, name, prepare=_collect_taps(sink) if taps else None, mode=mode
                )
            aux = None
            if has_aux:
                out, aux = _split_aux(out, name)
                aux = jax.tree_util.tree_map(lambda x: _output(x, trace), aux)
            _check_scalar(out, name, mode.holomorphic)
            # the backward pass runs on the trace outside (current again)
            if isinstance(out, Tracer) and out._trace is trace:
                one = np.array(1, raw(out).dtype)
                observe = check.observe if check else None
                input_cts = core.backward([(out.node, one)], release=True, observe=observe)
            else:  # the output does not depend on the differentiated inputs
                input_cts = {}
            if check:
                check.finish()
            grads = gradients(tracers, trees, input_cts)
        value = _output(out, trace) if want_value else None
        if has_aux:
            value = (value, aux)
        grads = grads[0] if single else grads
        if taps:
            return value, grads, sink.result(_tap_ct)
        return value, grads

    return value_and_grad_fun


def _collect_taps(sink: Any) -> Callable[[Trace, list[Any]], None]:
    def prepare(trace: Trace, boxed: list[Any]) -> None:
        trace.taps = sink

    return prepare


def _tap_ct(ct: Any, like: Any) -> Any:
    """A tap's cotangent as a `jax.Array` of the tapped value's dtype (zeros if none came)."""
    if ct is None:
        return host.to_jax(core.zeros_like(like))
    return host.to_jax(rules.convert_element_type(ct, rules.dtype_of(like)))


def grad(
    fun: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    holomorphic: bool = False,
    allow_int: bool = False,
    reduce_axes: Sequence[Any] = (),
    *,
    taps: bool = False,
    check_finite: bool = False,
):
    """Returns a function computing the gradient of `fun`, like `jax.grad`.

    Args:
      fun: a function returning a real scalar (a loss); see `value_and_grad`.
      argnums: which positional argument(s) to differentiate.
      has_aux: `fun` returns `(loss, aux)`; the result is then `(grad, aux)`.
      holomorphic: `fun` is holomorphic (complex inputs and output); see
        `value_and_grad`.
      allow_int: integer and boolean inputs get float0 zero gradients.
      reduce_axes: only `()`, as in JAX, which deprecated it.
      taps, check_finite: as in `value_and_grad`; with `taps=True` the taps dict
        comes last: `(grad, taps)` or `(grad, aux, taps)`.

    Returns:
      A function with `fun`'s signature returning the gradient (the structure
      of the differentiated argument, or a tuple of them).

    Examples:
      >>> import chainrule as cr, jax.numpy as jnp
      >>> float(cr.grad(lambda w, x, y: (w * x - y) ** 2)(1.0, 1.0, 2.0))
      -2.0
      >>> complex(cr.grad(lambda z: z**2, holomorphic=True)(1.0 + 1.0j))
      (2+2j)
    """
    _check_callable(fun, "cr.grad")
    deprecated_reduce_axes(reduce_axes, "grad")
    mode = _InputMode(holomorphic, allow_int)
    value_and_grad_fun = _value_and_grad(fun, argnums, has_aux, False, mode, taps, check_finite)

    @functools.wraps(fun)
    def grad_fun(*args: Any, **kwargs: Any):
        value, g, *tapped = value_and_grad_fun(*args, **kwargs)
        return (g, value[1], *tapped) if has_aux else (g, *tapped) if taps else g

    return grad_fun


# --- checks ------------------------------------------------------------------------


def deprecated_reduce_axes(reduce_axes: Sequence[Any], what: str) -> None:
    """JAX still takes `reduce_axes=()` and refuses any other value."""
    if reduce_axes:
        raise NotImplementedError(f"reduce_axes argument to {what} is deprecated")


_USAGE = {  # how each transform is called, for the error that names it
    "cr.vjp": "cr.vjp(f, *primals)",
    "cr.jvp": "cr.jvp(f, primals, tangents)",
    "cr.linearize": "cr.linearize(f, *primals)",
    "cr.linear_transpose": "cr.linear_transpose(f, *primals)",
}


def _check_callable(fun: Any, name: str) -> None:
    if not callable(fun):
        usage = _USAGE.get(name, f"{name}(loss)(params, ...)")
        raise TypeError(
            f"{name} expects a function as its first argument, got {type(fun).__name__}. "
            f"Usage: {usage}."
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


_REAL_SCALAR_DTYPES = frozenset(
    np.dtype(d) for d in (np.float16, jnp.bfloat16, np.float32, np.float64)
)


def _check_scalar(out: Any, name: str, holomorphic: bool = False) -> None:
    value = raw(out)
    if not holomorphic and isinstance(value, host.HOST_TYPES) and value.ndim == 0:
        if value.dtype in _REAL_SCALAR_DTYPES:  # a real scalar: the common case, at once
            return
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        # a Python number: a constant loss (zero gradient) if JAX would take it
        if isinstance(out, complex if holomorphic else float):
            return
        if isinstance(out, int):  # (bool too) an integer has no gradient, as in JAX
            raise NonScalarOutputError(
                f"{name} requires a real floating-point output; the function returned the "
                f"Python {type(out).__name__} {out!r}. Gradients of integer or boolean "
                f"outputs are not defined; return a float, e.g. {float(out)!r}, or compute "
                "the loss in floating point."
            )
        if isinstance(out, (float, complex)):
            dtype = np.dtype(type(out))  # (then checked below, as an array's)
        else:
            raise NonScalarOutputError(
                f"{name} requires the function to return a real scalar (e.g. a loss), but "
                f"it returned a {type(out).__name__}. With several outputs use cr.vjp; to "
                "return extra values use has_aux=True."
            )
    if shape is not None and tuple(shape) != ():
        raise NonScalarOutputError(
            f"{name} requires a scalar output; the function returned shape {tuple(shape)}. "
            "Reduce it (e.g. .mean() or .sum()) or use cr.vjp for non-scalar outputs."
        )
    is_complex = jnp.issubdtype(dtype, jnp.complexfloating)
    if holomorphic and not is_complex:
        raise NonScalarOutputError(
            f"{name} with holomorphic=True requires a complex output, but the function "
            f"returned dtype {dtype.name}. Drop holomorphic=True for a real loss, or "
            "return a complex value."
        )
    if is_complex and not holomorphic:
        raise NonScalarOutputError(
            f"{name} requires a real-valued output, but the function returned dtype "
            f"{dtype.name}. For a holomorphic function pass holomorphic=True; for a "
            "non-holomorphic function of complex outputs use cr.vjp directly, or return "
            "a real loss such as jnp.sum(jnp.abs(z) ** 2)."
        )
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise NonScalarOutputError(
            f"{name} requires a real floating-point output; the function returned dtype "
            f"{dtype.name}. Gradients of integer or boolean outputs are not defined; "
            "compute the loss in floating point."
        )
