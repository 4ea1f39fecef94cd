"""Forward mode and Jacobians from the reverse-mode rules: `jvp`, `linearize`,
`linear_transpose`, `jacrev`, `jacfwd`, `hessian`, with JAX's signatures.

There is no second rule table. A VJP is linear in its cotangent:

    pullback(u) = J^T u,

and chainrule's backward pass is itself recorded by chainrule's rules (they
are written in traced ops), so the reverse-mode derivative of `pullback` is
available too. Its VJP with cotangent `t` is `(J^T)^T t = J t`: the JVP. So

    _, pullback = vjp(f, x)            # one forward pass, recorded
    _, pushforward = vjp(pullback, u0) # the backward pass, recorded (u0 = 0)
    pushforward(t) == J t              # the backward pass of the backward pass

and every primitive with a VJP rule (including those the coverage work
adds) gets a JVP with nothing more to maintain. Because `pullback` is linear,
the point `u0` does not matter; zeros are used. Under `jax.jit` the values of
the recorded backward pass are never used, and JAX's DCE drops them before
XLA sees the program; eagerly they are one NumPy backward pass at zero.

The Jacobians follow JAX: `jacrev` maps the pullback over the standard basis
of the output with `jax.vmap`, `jacfwd` maps the pushforward over the basis
of the input, `hessian` is `jacfwd(jacrev(f))`. Each call is a fresh trace
(a new level), so nesting them, with each other or with `cr.grad`, never
confuses perturbations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chainrule.engine import core, linearity, transforms
from chainrule.errors import ForwardModeError, NotLinearError

_tree_flatten = jax.tree_util.tree_flatten
_tree_unflatten = jax.tree_util.tree_unflatten
_float0 = jax.dtypes.float0


def _dtype(x: Any) -> np.dtype:
    """The dtype JAX gives `x`: Python scalars and NumPy values canonicalized, as
    `jnp.asarray` does (float64 is float32 without `jax_enable_x64`)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return jax.dtypes.canonicalize_dtype(np.result_type(x))
    if isinstance(x, (np.ndarray, np.generic)):
        return jax.dtypes.canonicalize_dtype(dtype)
    if jnp.issubdtype(dtype, jax.dtypes.extended):
        return dtype  # (a typed PRNG key's: held fixed, like an integer's)
    return np.dtype(dtype)


def _is_inexact(x: Any) -> bool:
    """Differentiated (float or complex; chainrule's vjp says clearly what it
    does not support), as opposed to held fixed with a float0 tangent."""
    return jnp.issubdtype(_dtype(x), jnp.inexact)


def _tangent_dtype(x: Any) -> np.dtype:
    """JAX's tangent dtype of a primal: its own if inexact, else float0."""
    dtype = _dtype(x)
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else np.dtype(_float0)


def _zeros_like(x: Any) -> Any:
    """`core.zeros_like`, also for Python scalars."""
    return core.zeros_like(x) if hasattr(x, "dtype") else np.zeros(np.shape(x), _dtype(x))


def _zero_tangent(x: Any) -> Any:
    """The tangent of a value that does not depend on the inputs."""
    if _is_inexact(x):
        return transforms.host.to_jax(_zeros_like(x))
    return np.zeros(np.shape(x), _float0)


def _merge(mask: Sequence[bool], chosen: Sequence[Any], items: Sequence[Any], fill=None) -> list:
    """`items` with those where `mask` holds replaced, in order, by `chosen`
    (and the others by `fill(item)` if given)."""
    it = iter(chosen)
    return [
        next(it) if m else x if fill is None else fill(x) for m, x in zip(mask, items, strict=True)
    ]


# --- linearize and jvp --------------------------------------------------------------------


def _linearize(fun: Callable, primals: tuple, has_aux: bool):
    """(output, pushforward of flat tangent leaves -> output tangent tree, aux).

    Inexact leaves of `primals` are differentiated; the others (integers,
    booleans) are held fixed, as JAX does with their float0 tangents.
    """
    leaves, tree = _tree_flatten(primals)
    floats = [_is_inexact(x) for x in leaves]

    def on_floats(*xs):
        return fun(*_tree_unflatten(tree, _merge(floats, xs, leaves)))

    float_leaves = [x for x, f in zip(leaves, floats, strict=True) if f]
    out, pull, aux = transforms.vjp_parts(on_floats, float_leaves, has_aux)
    aux = [aux] if has_aux else []
    out_leaves, out_tree = _tree_flatten(out)
    out_floats = [_is_inexact(o) for o in out_leaves]

    def pullback_flat(*us):  # linear in us: J^T u, recorded at us = 0 only
        cts = _merge(out_floats, us, out_leaves, _zero_tangent)
        return pull.pull(_tree_unflatten(out_tree, cts), at_zero=True)

    zeros = [_zeros_like(o) for o, f in zip(out_leaves, out_floats, strict=True) if f]
    try:
        _, pushforward_flat = transforms.vjp(pullback_flat, *zeros)
    except ForwardModeError as refused:  # (a custom_vjp function: JAX's linearize
        # hands back its value, and refuses when the linear map is applied)
        pushforward_flat = _Refused(str(refused))
    out_likes = [_like(o) for o in out_leaves]
    return out, _Pushforward(pushforward_flat, floats, out_floats, out_likes, out_tree), aux


class _Refused:
    """The linear map of a function forward mode cannot go through: raises
    `ForwardModeError` when applied (a pytree without leaves)."""

    def __init__(self, message: str):
        self.message = message

    def __call__(self, tangents: Any) -> Any:
        raise ForwardModeError(self.message)


jax.tree_util.register_pytree_node(_Refused, lambda r: ((), r.message), lambda m, _: _Refused(m))


def _like(x: Any) -> jax.ShapeDtypeStruct:
    """Shape, dtype (as JAX reads it) and weak type of a value, without the value."""
    weak = getattr(x, "weak_type", None)
    if weak is None:  # (a Python number is weakly typed, a NumPy value is not)
        weak = type(x) in (int, float, complex)
    return jax.ShapeDtypeStruct(np.shape(x), _dtype(x), weak_type=weak)


class _Pushforward:
    """`_linearize`'s linear map from flat tangent leaves to the output tangent
    tree: the transposed pullback (`flat`, a `transforms.Pullback`) and the
    outputs' types. A pytree whose leaves are `flat`'s, so the function
    `cr.linearize` returns can leave `jit` as JAX's does."""

    def __init__(self, flat, floats, out_floats, out_likes, out_tree):
        self.flat = flat
        self.floats = floats  # which input leaves are differentiated
        self.out_floats = out_floats  # which output leaves are
        self.out_likes = out_likes  # (`_like` of each output leaf)
        self.out_tree = out_tree

    def __call__(self, tangent_leaves: Sequence[Any]) -> Any:
        float_ts = tuple(t for t, f in zip(tangent_leaves, self.floats, strict=True) if f)
        out_ts = _merge(self.out_floats, self.flat(float_ts), self.out_likes, _zero_tangent)
        # a tangent is weakly typed where its output is, as JAX's are
        out_ts = [transforms.weak_as(t, o) for t, o in zip(out_ts, self.out_likes, strict=True)]
        return _tree_unflatten(self.out_tree, out_ts)


jax.tree_util.register_pytree_node(
    _Pushforward,
    lambda p: ((p.flat,), p),
    lambda p, children: _Pushforward(children[0], p.floats, p.out_floats, p.out_likes, p.out_tree),
)


def _check_tangents(primals: Any, tangents: Any, structure_error, aval_error) -> list[Any]:
    """The tangent leaves, after JAX's checks: same tree, tangent dtypes, shapes."""
    p_leaves, p_tree = _tree_flatten(primals)
    t_leaves, t_tree = _tree_flatten(tangents)
    if p_tree != t_tree:
        raise TypeError(structure_error(p_tree, t_tree))
    for p, t in zip(p_leaves, t_leaves, strict=True):
        want, got = _tangent_dtype(p), _dtype(t)
        if want != got or np.shape(p) != np.shape(t):
            raise aval_error(p, t, want, got)
    # a NumPy tangent as JAX reads it (float64 is float32 without x64)
    return [
        np.asarray(t, _dtype(t)) if isinstance(t, (np.ndarray, np.generic)) else t for t in t_leaves
    ]


def _jvp_structure_error(p_tree, t_tree) -> str:
    return (
        "primal and tangent arguments to cr.jvp must have the same tree structure; "
        f"primals have tree structure {p_tree} whereas tangents have tree structure "
        f"{t_tree}. Pass one tangent per primal leaf, e.g. "
        "jax.tree_util.tree_map(jnp.ones_like, primals)."
    )


def _jvp_aval_error(p, t, want, got) -> Exception:
    if want != got:
        return TypeError(
            "primal and tangent arguments to cr.jvp do not match; dtypes must be equal, "
            "or in case of int/bool primal dtype the tangent dtype must be float0. Got "
            f"primal dtype {_dtype(p)} and so expected tangent dtype {want}, but got "
            f"tangent dtype {got} instead. Cast the tangent, e.g. t.astype({want.name!r})."
        )
    return ValueError(
        "cr.jvp called with different primal and tangent shapes; Got primal shape "
        f"{np.shape(p)} and tangent shape as {np.shape(t)}. A tangent must have its "
        "primal's shape."
    )


def jvp(fun: Callable, primals: Sequence[Any], tangents: Sequence[Any], has_aux: bool = False):
    """Computes `fun(*primals)` and the Jacobian-vector product `J @ tangents`.

    Same signature and semantics as `jax.jvp`, computed by chainrule's reverse
    rules (the JVP is the transpose of the VJP; see this module's docstring).

    Args:
      fun: function of pytrees of arrays, written with `jax.numpy`, `jax.nn`,
        `lax` or `chainrule.numpy`.
      primals: tuple or list of arguments at which to differentiate.
      tangents: tuple or list with `primals`' tree structure, shapes and
        dtypes (float0 for integer or boolean primals).
      has_aux: `fun` returns `(output, aux)`; `aux` is returned, not differentiated.

    Returns:
      `(primals_out, tangents_out)`, or `(primals_out, tangents_out, aux)`.

    Examples:
      >>> import jax.numpy as jnp, chainrule as cr
      >>> y, y_dot = cr.jvp(jnp.sin, (0.0,), (2.0,))
      >>> float(y), float(y_dot)
      (0.0, 2.0)
    """
    transforms._check_callable(fun, "cr.jvp")
    if not isinstance(primals, (tuple, list)) or not isinstance(tangents, (tuple, list)):
        raise TypeError(
            "primal and tangent arguments to cr.jvp must be tuples or lists; found "
            f"{type(primals).__name__} and {type(tangents).__name__}. "
            "Example: cr.jvp(f, (x,), (t,))."
        )
    t_leaves = _check_tangents(primals, tangents, _jvp_structure_error, _jvp_aval_error)
    out, pushforward, aux = _linearize(fun, tuple(primals), has_aux)
    return (out, pushforward(t_leaves), *aux)


def _linearized_aval_error(p, t, want, got) -> Exception:
    return ValueError(
        "linearized function called on tangent values inconsistent with the original "
        f"primal values: got a tangent of shape {np.shape(t)} and dtype {got} for a "
        f"primal of shape {np.shape(p)}, but expected dtype {want} and the primal's shape."
    )


def linearize(fun: Callable, *primals: Any, has_aux: bool = False):
    """`fun(*primals)` and its linear approximation `f_jvp(*tangents) = J @ tangents`.

    Same signature and semantics as `jax.linearize`. The forward pass and
    its backward pass run once, here; each call of `f_jvp` is one pass over
    the recorded backward pass.

    Args:
      fun: the function to linearize.
      *primals: the point; every leaf of float dtype is differentiated.
      has_aux: `fun` returns `(output, aux)`.

    Returns:
      `(primals_out, f_jvp)` or `(primals_out, f_jvp, aux)`. `f_jvp` takes one
      tangent per primal (same structures, shapes and dtypes).

    Examples:
      >>> import jax.numpy as jnp, chainrule as cr
      >>> y, f_jvp = cr.linearize(lambda x: x**3, 2.0)
      >>> float(y), float(f_jvp(1.0))
      (8.0, 12.0)
    """
    transforms._check_callable(fun, "cr.linearize")
    out, pushforward, aux = _linearize(fun, primals, has_aux)
    likes = jax.tree_util.tree_map(_like, primals)

    def structure_error(p_tree, t_tree) -> str:
        return (
            f"f_jvp from cr.linearize expected tangents with tree structure {p_tree}, got "
            f"{t_tree}. Pass one tangent per primal, positionally: f_jvp(*tangents)."
        )

    def f_jvp(pushforward: _Pushforward, *tangents: Any) -> Any:
        t_leaves = _check_tangents(likes, tangents, structure_error, _linearized_aval_error)
        return pushforward(t_leaves)

    # (a pytree, as JAX's f_jvp: the arrays of its tape are its leaves)
    return (out, jax.tree_util.Partial(f_jvp, pushforward), *aux)


# --- linear_transpose ------------------------------------------------------------------------


def linear_transpose(fun: Callable, *primals: Any, reduce_axes: Sequence[Any] = ()) -> Callable:
    """The transpose of a linear function, like `jax.linear_transpose`.

    `fun` is run once, at `primals` (arrays, or `jax.ShapeDtypeStruct`s, read
    as zeros), and its recorded tape is checked to be linear in the inputs;
    the transpose is then its VJP (for a linear map, the same at every point).

    Args:
      fun: a function linear in its (floating-point) arguments.
      *primals: arrays or `jax.ShapeDtypeStruct`s giving the arguments' shapes
        and dtypes.
      reduce_axes: only `()`, as in JAX, which deprecated it.

    Returns:
      `fun_t(cotangent)`, returning a tuple with one cotangent per primal.

    Raises:
      NotLinearError: (a `NotImplementedError`, as JAX raises for a primitive
        without a transpose rule) when `fun` applies a nonlinear operation to
        its inputs, such as `sin(x)` or `x * x`, or one whose result has no
        derivative (`x > 0`, `jnp.sign(x)`, `stop_gradient(x)`, a cast to an
        integer), even where the result is then used as a constant.
      TypeError: for non-float inputs or outputs.

    Examples:
      >>> import chainrule as cr
      >>> f_t = cr.linear_transpose(lambda x, y: 0.5 * x - 0.5 * y, 1.0, 1.0)
      >>> [float(c) for c in f_t(1.0)]
      [0.5, -0.5]
    """
    transforms._check_callable(fun, "cr.linear_transpose")
    transforms.deprecated_reduce_axes(reduce_axes, "transpose")
    leaves, tree = _tree_flatten(primals)
    points = [np.zeros(x.shape, x.dtype) if _abstract(x) else x for x in leaves]
    _check_linear_dtypes(leaves, "input")
    args = _tree_unflatten(tree, points)

    def watch(trace: core.Trace, boxed: list[Any]) -> None:
        trace.untraced_uses = {}
        # a linear map's trace: a library's primitive on its values is transposed
        # by the rule the library registered, as JAX's backward pass does
        trace.linear = True

    with transforms.host.evaluating():
        trace, out, tracers, trees = transforms.trace_call(
            fun, args, tuple(range(len(primals))), "cr.linear_transpose", prepare=watch
        )
    out_leaves, out_tree = _tree_flatten(out)
    _check_linear_dtypes(out_leaves, "output")
    untraced = linearity.untraced_use(out_leaves, trace)
    if untraced is not None:
        raise NotLinearError(
            f"cr.linear_transpose: {getattr(fun, '__name__', 'the function')} is not linear "
            f"in its inputs: it applies '{untraced}' to values computed from "
            "them, which gives a result with no derivative (a comparison, a rounding, "
            "stop_gradient, a cast to an integer). What depends on the inputs through it "
            "cannot be transposed; for a nonlinear function use cr.vjp at a point."
        )
    node = linearity.nonlinear_node(out_leaves, trace)
    if node is not None:
        raise NotLinearError(
            f"cr.linear_transpose: {getattr(fun, '__name__', 'the function')} is not linear "
            f"in its inputs: it applies '{node.prim.name}' to values computed from them "
            f"(its operand(s) {list(node.argnums)}). Only linear functions (sums, scalings by "
            "constants, matrix products with constant matrices, reshapes, indexing) can be "
            "transposed; for a nonlinear function use cr.vjp at a point."
        )

    out_likes = [_like(o) for o in out_leaves]

    def fun_transpose(pullback: transforms.Pullback, cotangent: Any) -> tuple[Any, ...]:
        ct_leaves, ct_tree = _tree_flatten(cotangent)
        if ct_tree != out_tree:
            raise TypeError(
                f"cotangent tree does not match function output, expected {out_tree} but "
                f"got {ct_tree}. Pass one cotangent per output leaf."
            )
        for o, ct in zip(out_likes, ct_leaves, strict=True):
            if o.shape != np.shape(ct) or o.dtype != _dtype(ct):
                raise TypeError(
                    "cotangent type does not match function output: expected shape "
                    f"{o.shape} and dtype {o.dtype}, got shape {np.shape(ct)} and "
                    f"dtype {_dtype(ct)}."
                )
        return pullback(cotangent)

    # (a pytree, as JAX's: the arrays of the recorded tape are its leaves)
    pullback = transforms.pullback_of(trace, out_leaves, out_tree, tracers, trees)
    return jax.tree_util.Partial(fun_transpose, pullback)


def _abstract(x: Any) -> bool:
    """A leaf giving only a shape and a dtype (`jax.ShapeDtypeStruct`, or any
    object with both, as JAX reads them), not a value."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return True
    return (
        hasattr(x, "shape")
        and hasattr(x, "dtype")
        and not isinstance(x, (jax.Array, np.ndarray, np.generic, jax.core.Tracer))
    )


def _check_linear_dtypes(leaves: Sequence[Any], what: str) -> None:
    for x in leaves:
        if not jnp.issubdtype(_dtype(x), jnp.inexact):
            raise TypeError(
                f"cr.linear_transpose supports [float or complex] -> [float or complex] "
                f"functions only, but an {what} has dtype {_dtype(x)}. Cast it to a "
                "floating-point or complex dtype."
            )


# --- Jacobians -------------------------------------------------------------------------------


def _std_basis(tree: Any) -> Any:
    """The standard basis of the space of `tree`: `tree`'s structure, each
    leaf with a leading axis of the total size (rows of one identity matrix).
    Eagerly a NumPy identity; under a JAX transformation `jnp.eye`, so no
    large constant is baked into a compiled program."""
    leaves, _ = _tree_flatten(tree)
    n = sum(int(np.size(x)) for x in leaves)
    dtype = jnp.result_type(*leaves) if leaves else jnp.result_type(float)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return _unravel(tree, 1, jnp.eye(n, dtype=dtype))
    return _unravel(tree, 1, np.eye(n, dtype=dtype))


def _unravel(tree: Any, axis: int, arr: Any, dtype: Any = None, weak_as: Any = None) -> Any:
    """Splits `arr` along `axis` into `tree`'s leaves, that axis becoming each
    leaf's shape; cast to `dtype` (or to each leaf's own dtype), weakly typed
    if `weak_as` is given and is. A concrete CPU array is split with NumPy (no
    dispatch per piece) and handed back as `jax.Array`s."""
    leaves, treedef = _tree_flatten(tree)
    axis %= arr.ndim
    on_host = arr if isinstance(arr, np.ndarray) else transforms.host.to_host(arr)
    xp = jnp if on_host is None else np
    arr = arr if on_host is None else on_host
    bounds = np.cumsum([int(np.size(x)) for x in leaves])[:-1]
    parts = xp.split(arr, bounds, axis) if leaves else []
    out = []
    for part, x in zip(parts, leaves, strict=True):
        part = part.reshape(arr.shape[:axis] + np.shape(x) + arr.shape[axis + 1 :])
        want = _dtype(x) if dtype is None else np.dtype(dtype)
        if part.dtype == jax.dtypes.float0:  # an integer input's: zeros, as in JAX
            part = xp.zeros(part.shape, want)
        part = part if part.dtype == want else part.astype(want)
        part = part if on_host is None else transforms.host.to_jax(part)
        out.append(part if weak_as is None else transforms.weak_as(part, weak_as))
    return _tree_unflatten(treedef, out)


def _split_argnums(fun: Callable, argnums: Any, name: str, python_int_single: bool = False):
    """`argnums` checked. Returns (whether it is a single int, `dynamic`), where
    `dynamic(args, kwargs)` gives `fun` of the differentiated arguments only and
    those arguments. (`python_int_single`: see `transforms._normalize_argnums`.)"""
    nums, single = transforms._normalize_argnums(argnums, name, python_int_single)

    def dynamic(args: tuple, kwargs: dict):
        resolved = transforms._resolve_argnums(nums, len(args), name)

        def partial_fun(*dyn):
            full = list(args)
            for i, x in zip(resolved, dyn, strict=True):
                full[i] = x
            return fun(*full, **kwargs)

        return partial_fun, tuple(args[i] for i in resolved)

    return single, dynamic


def _check_inputs(name: str, dyn: Any, holomorphic: bool, allow_int: bool, forward: bool) -> None:
    """JAX's input checks of jacrev/jacfwd (same error types and conditions):
    reverse mode also takes complex inputs (a real function of them, as
    `jax.jacrev(jnp.abs)`), forward mode only with `holomorphic`."""
    for x in jax.tree_util.tree_leaves(dyn):
        dtype = _dtype(x)
        if holomorphic:
            if not jnp.issubdtype(dtype, jnp.complexfloating):
                raise TypeError(
                    f"{name} with holomorphic=True requires inputs with complex dtype, "
                    f"but got {dtype.name}."
                )
            continue
        if jnp.issubdtype(dtype, jnp.floating if forward else jnp.inexact):
            continue
        if allow_int and (jnp.issubdtype(dtype, jnp.integer) or dtype == np.bool_):
            continue
        kinds = "real-valued inputs (input dtype that is a sub-dtype of np.floating)"
        if not forward:
            kinds = "real- or complex-valued inputs (input dtype that is a sub-dtype of np.inexact)"
        raise TypeError(
            f"{name} requires {kinds}, but got {dtype.name}. For holomorphic "
            "differentiation, pass holomorphic=True; for integer inputs allow_int=True; or "
            "convert it, e.g. jnp.asarray(x, jnp.float32), or leave it out of argnums."
        )


def _check_outputs(name: str, y: Any, holomorphic: bool, forward: bool) -> None:
    """JAX's output checks: reverse mode needs real outputs (complex with
    `holomorphic`); forward mode takes any output without `holomorphic` (real
    tangents map to complex outputs; an integer output's block is zeros)."""
    for x in jax.tree_util.tree_leaves(y):
        dtype = _dtype(x)
        if forward and not holomorphic:
            continue
        if holomorphic and not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"{name} with holomorphic=True requires outputs with complex dtype, "
                f"but got {dtype.name}."
            )
        if not holomorphic and not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} requires real-valued outputs (output dtype that is a sub-dtype of "
                f"np.floating), but got {dtype.name}. For holomorphic differentiation, pass "
                "holomorphic=True; else compute the output in floating point, or return "
                "other values as aux (has_aux=True)."
            )


def jacrev(
    fun: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    holomorphic: bool = False,
    allow_int: bool = False,
) -> Callable:
    """The Jacobian of `fun`, row by row (one pullback per output element), like `jax.jacrev`.

    Args:
      fun: function of pytrees of float arrays returning a pytree of float arrays.
      argnums: which positional argument(s) to differentiate.
      has_aux: `fun` returns `(output, aux)`; the result is then `(jacobian, aux)`.
      holomorphic: `fun` is holomorphic: complex inputs and outputs, as in JAX.
      allow_int: integer and boolean inputs are accepted; their Jacobian
        blocks are zeros of the input's dtype, as JAX returns them.

    Returns:
      A function with `fun`'s signature returning the Jacobian: for an output
      leaf of shape `(o...)` and an input leaf of shape `(i...)`, an array of
      shape `(o..., i...)`, arranged as a pytree of the output's structure
      whose leaves are pytrees of the input's structure (JAX's layout).

    Examples:
      >>> import jax.numpy as jnp, chainrule as cr
      >>> cr.jacrev(lambda x: x**2)(jnp.array([1.0, 2.0])).tolist()
      [[2.0, 0.0], [0.0, 4.0]]
    """
    transforms._check_callable(fun, "cr.jacrev")
    single, dynamic = _split_argnums(fun, argnums, "cr.jacrev", python_int_single=True)

    @functools.wraps(fun)
    def jacfun(*args: Any, **kwargs: Any):
        partial_fun, dyn = dynamic(args, kwargs)
        _check_inputs("cr.jacrev", dyn, holomorphic, allow_int, forward=False)
        y, pullback, *aux = transforms.vjp(partial_fun, *dyn, has_aux=has_aux)
        _check_outputs("cr.jacrev", y, holomorphic, forward=False)
        jac = jax.vmap(pullback)(_std_basis(y))
        example = dyn[0] if single else dyn
        jac = jac[0] if single else jac
        # (a block is weakly typed where its input is, as JAX's cotangents are)
        jac_tree = jax.tree_util.tree_map(
            lambda x, j: _unravel(y, 0, j, _dtype(x), weak_as=x), example, jac
        )
        jac_tree = jax.tree_util.tree_transpose(
            jax.tree_util.tree_structure(example), jax.tree_util.tree_structure(y), jac_tree
        )
        return (jac_tree, *aux) if has_aux else jac_tree

    return jacfun


def jacfwd(
    fun: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    holomorphic: bool = False,
    allow_int: bool = False,
) -> Callable:
    """The Jacobian of `fun`, column by column (one JVP per input element), like `jax.jacfwd`.

    The function and its backward pass run once (`linearize`); the JVPs of
    the basis vectors are one `jax.vmap` over the recorded backward pass.
    Arguments and result layout as `jacrev`.

    Examples:
      >>> import jax.numpy as jnp, chainrule as cr
      >>> cr.jacfwd(lambda x: x**2)(jnp.array([1.0, 2.0])).tolist()
      [[2.0, 0.0], [0.0, 4.0]]
    """
    transforms._check_callable(fun, "cr.jacfwd")
    single, dynamic = _split_argnums(fun, argnums, "cr.jacfwd")

    @functools.wraps(fun)
    def jacfun(*args: Any, **kwargs: Any):
        partial_fun, dyn = dynamic(args, kwargs)
        _check_inputs("cr.jacfwd", dyn, holomorphic, allow_int, forward=True)
        y, pushforward, aux = _linearize(partial_fun, dyn, has_aux)
        _check_outputs("cr.jacfwd", y, holomorphic, forward=True)
        basis_leaves = jax.tree_util.tree_leaves(_std_basis(dyn))
        jac = jax.vmap(pushforward, out_axes=-1)(basis_leaves)
        example = dyn[0] if single else dyn
        jac_tree = jax.tree_util.tree_map(
            lambda x, j: _unravel(example, -1, j, _dtype(x), weak_as=x), y, jac
        )
        return (jac_tree, *aux) if has_aux else jac_tree

    return jacfun


# JAX's alias of jacrev (`jax.jacobian`), so code calling it swaps to chainrule unchanged.
jacobian = jacrev


def hessian(
    fun: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    holomorphic: bool = False,
) -> Callable:
    """The Hessian of `fun`: `jacfwd(jacrev(fun))`, as `jax.hessian`.

    For an output leaf of shape `(o...)` and input leaves of shapes `(i...)`
    and `(j...)`, the block has shape `(o..., i..., j...)`, in a pytree of
    the output's structure of pytrees of pytrees of the input's.

    Examples:
      >>> import jax.numpy as jnp, chainrule as cr
      >>> cr.hessian(lambda x: x[0] ** 3 - 2 * x[0] * x[1])(jnp.array([1.0, 2.0])).tolist()
      [[6.0, -2.0], [-2.0, 0.0]]
    """
    transforms._check_callable(fun, "cr.hessian")
    inner = jacrev(fun, argnums, has_aux=has_aux, holomorphic=holomorphic)
    return jacfwd(inner, argnums, has_aux=has_aux, holomorphic=holomorphic)
