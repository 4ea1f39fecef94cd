"""Windowed reductions: `reduce_window_sum`, `reduce_window_max`,
`reduce_window_min`, the generic `reduce_window`, and the two primitives
their derivatives are made of, `select_and_scatter_add` and
`select_and_gather_add` (average and max pooling, at any order).

A window slides over the operand dilated by `base_dilation` and padded by
`padding` (padding holds the reduction's identity), with `window_strides`
between windows and `window_dilation` between a window's taps: a windowed
sum is a convolution with a kernel of ones, and its cotangent is the same
transposed convolution as a convolution's input cotangent.

The max (min) of a window passes its cotangent to one element of the window,
the first maximum (minimum) XLA's selection finds; that is JAX's convention
for pooling (unlike `reduce_max`, whose ties share the cotangent).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax import lax
from jax._src import core as jcore  # eval_jaxpr (JAX 0.10, pinned)
from jax._src.lax import windowed_reductions as jax_windows

from chainrule.engine import core
from chainrule.engine.core import Primitive, zeros_like
from chainrule.engine.rules.convolution import input_cotangent_padding
from chainrule.engine.rules.forward_only import register_forward_only, transposed_jvp
from chainrule.engine.rules.indexing import pad, slice_
from chainrule.engine.rules.registry import const, defvjp, primitive, shape_of
from chainrule.errors import NoVJPRuleError

_WINDOW_PARAMS = (
    "window_dimensions",
    "window_strides",
    "padding",
    "base_dilation",
    "window_dilation",
)

reduce_window_sum_p = primitive(
    "reduce_window_sum", jax_windows.reduce_window_sum_p.bind, _WINDOW_PARAMS
)
reduce_window_max_p = primitive(
    "reduce_window_max", jax_windows.reduce_window_max_p.bind, _WINDOW_PARAMS
)
reduce_window_min_p = primitive(
    "reduce_window_min", jax_windows.reduce_window_min_p.bind, _WINDOW_PARAMS
)


def _reduce_window_sum_vjp(
    ans, x, window_dimensions, window_strides, padding, base_dilation, window_dilation
):
    """Every element gets the sum of `g` over the windows it was in: `g`
    spread by the strides, padded so each window's last tap sees it, and
    summed over (dilated) windows read `base_dilation` apart."""
    ones = (1,) * len(window_dimensions)

    def vjp(g):
        pads = input_cotangent_padding(
            shape_of(x),
            window_dimensions,
            window_strides,
            shape_of(g),
            padding,
            base_dilation,
            window_dilation,
        )
        spread = pad(
            g,
            const(g, 0),
            [(lo, hi, s - 1) for (lo, hi), s in zip(pads, window_strides, strict=True)],
        )
        return reduce_window_sum_p.bind(
            spread,
            window_dimensions=tuple(window_dimensions),
            window_strides=tuple(base_dilation),
            padding=((0, 0),) * len(ones),
            base_dilation=ones,
            window_dilation=tuple(window_dilation),
        )

    return vjp


defvjp(reduce_window_sum_p, _reduce_window_sum_vjp)

# --- max and min: the cotangent goes to the selected element ----------------------

select_and_scatter_add_p = primitive(
    "select_and_scatter_add",
    jax_windows.select_and_scatter_add_p.bind,
    ("select_prim", "window_dimensions", "window_strides", "padding"),
)
select_and_gather_add_p = primitive(
    "select_and_gather_add",
    jax_windows.select_and_gather_add_p.bind,
    ("select_prim", *_WINDOW_PARAMS),
)


def _scatter_to_selected(
    g, operand, select_prim, window_dimensions, window_strides, padding, base_dilation,
    window_dilation, name,
):  # fmt: skip
    """Adds each window's cotangent to the element `select_prim` picks in it
    (the VJP of taking, per window, the value at the selected element)."""
    if any(d != 1 for d in window_dilation):
        if core.backward_at_zero():  # forward mode: the selection's JVP, as JAX's
            window = dict(
                select_prim=select_prim,
                window_dimensions=tuple(window_dimensions),
                window_strides=tuple(window_strides),
                padding=tuple(map(tuple, padding)),
                base_dilation=tuple(base_dilation),
                window_dilation=tuple(window_dilation),
            )

            def jvp(primals, tangents):  # linear in the tangent of `operand`
                return [select_and_gather_add_p.bind(tangents[0], primals[0], **window)]

            return transposed_jvp([g], [operand], [0], jvp)[0]
        raise NoVJPRuleError(
            name,
            detail=f"window_dilation={tuple(window_dilation)} selects through holes, which "
            "XLA's select_and_scatter cannot (JAX's own VJP refuses it too); pool without "
            "window dilation, or dilate the input instead",
        )
    # XLA's select_and_scatter takes neither base dilation nor negative padding:
    # dilate the operand explicitly (the holes hold the identity, so they are
    # never selected) and crop what negative padding skips, then undo both.
    # (JAX's rule fails on negative padding; this is the same function.)
    crop = [(min(lo, 0), min(hi, 0)) for lo, hi in padding]
    reshaped = any(d != 1 for d in base_dilation) or any(lo or hi for lo, hi in crop)
    if reshaped:
        identity = -np.inf if select_prim is lax.ge_p else np.inf
        config = [(lo, hi, d - 1) for (lo, hi), d in zip(crop, base_dilation, strict=True)]
        operand = pad(operand, const(operand, identity), config)
        padding = [(max(lo, 0), max(hi, 0)) for lo, hi in padding]
    out = select_and_scatter_add_p.bind(
        g,
        operand,
        select_prim=select_prim,
        window_dimensions=tuple(window_dimensions),
        window_strides=tuple(window_strides),
        padding=tuple(map(tuple, padding)),
    )
    if reshaped:
        out = pad(out, const(out, 0), [(-lo, -hi, 0) for lo, hi in crop])
        out = slice_(out, (0,) * len(base_dilation), shape_of(out), base_dilation)
    return out


def _chooser_vjp(select_prim, name):
    def maker(ans, x, **window):
        return lambda g: _scatter_to_selected(g, x, select_prim, **window, name=name)

    return maker


defvjp(reduce_window_max_p, _chooser_vjp(lax.ge_p, "reduce_window_max"))
defvjp(reduce_window_min_p, _chooser_vjp(lax.le_p, "reduce_window_min"))


def _dilated(params: dict) -> bool:
    """A window with holes: its selection has a JVP but no VJP (`_scatter_to_selected`)."""
    return any(d != 1 for d in params["window_dilation"])


for _name in ("reduce_window_max", "reduce_window_min", "select_and_gather_add"):
    register_forward_only(_name, _dilated)


# select_and_gather_add(t, x) takes `t` at the element of each window of `x`
# that is selected; select_and_scatter_add(s, x) adds `s` there. For a fixed
# `x` each is linear in its first operand, and each is the other's transpose.
# The selection is piecewise constant in `x`: its cotangent is zero (as in
# JAX), a structural zero here.
def _gather_tangents_vjp(ans, t, x, select_prim, **window):
    return lambda g: _scatter_to_selected(g, x, select_prim, **window, name="select_and_gather_add")


def _scatter_source_vjp(ans, source, x, select_prim, window_dimensions, window_strides, padding):
    ones = (1,) * len(window_dimensions)
    return lambda g: select_and_gather_add_p.bind(
        g,
        x,
        select_prim=select_prim,
        window_dimensions=window_dimensions,
        window_strides=window_strides,
        padding=padding,
        base_dilation=ones,
        window_dilation=ones,
    )


def _selection_vjp(ans, first, x, **params):
    return lambda g: None


defvjp(select_and_gather_add_p, _gather_tangents_vjp, _selection_vjp)
defvjp(select_and_scatter_add_p, _scatter_source_vjp, _selection_vjp)


# --- the generic reduce_window (a reduction given as a jaxpr) ---------------------


class _ReduceWindow(Primitive):
    """`lax.reduce_window` with a computation or initial values that JAX did
    not recognise as a sum, max or min (e.g. a traced initial value): it
    evaluates, and refuses to differentiate in reverse mode, as `jax.vjp`
    does; forward mode goes through it as `jax.jvp` does (`_reduce_window_jvp`)."""

    def vjp(self, g, node):
        if core.backward_at_zero():
            n = len(node.primals) // 2
            if any(i >= n for i in node.argnums):
                raise TypeError("reduce_window jvp does not support non-zero init_value_tangent.")
            params = node.params
            jvp = lambda primals, tangents: _reduce_window_jvp(primals, tangents, params)  # noqa: E731
            cts = list(g) if isinstance(g, tuple) else [g]
            return transposed_jvp(cts, node.primals, node.argnums, jvp)
        raise NoVJPRuleError(
            self.name,
            detail="a reduce_window with a general reduction (or a traced initial value) has "
            "no reverse-mode rule, in JAX either. Use lax.reduce_window with a constant "
            "initial value and lax.add, lax.max or lax.min (JAX then emits "
            "reduce_window_sum, _max or _min, which chainrule differentiates)",
        )


def _reduce_window_jvp(primals, tangents, params) -> list[Any]:
    """The tangents of a generic reduce_window: the same windows reduce
    (value, tangent) pairs, the pair reduction the JVP of the computation
    (`core.jvp_flat`, chainrule's rules); initial values have zero tangents."""
    n = len(primals) // 2
    operands, inits = primals[:n], primals[n:]
    ts = [zeros_like(o) if t is None else t for o, t in zip(operands, tangents[:n], strict=True)]
    jaxpr, consts = params["jaxpr"], params["consts"]

    def pair(x, y):
        def computation(*ab):
            return jcore.eval_jaxpr(jaxpr, consts, *ab)

        values, out_ts = core.jvp_flat(computation, [*x[:n], *y[:n]], [*x[n:], *y[n:]])
        return (*values, *out_ts)

    out = lax.reduce_window(
        (*operands, *ts),
        (*inits, *map(zeros_like, inits)),
        pair,
        params["window_dimensions"],
        params["window_strides"],
        params["padding"],
        params["base_dilation"],
        params["window_dilation"],
    )
    return list(out[n:])


reduce_window_p = primitive(
    "reduce_window",
    lambda *args, **params: jax_windows.reduce_window_p.bind(*args, **params),
    ("jaxpr", "consts", *_WINDOW_PARAMS),
    cls=_ReduceWindow,
    multiple_results=True,
)
register_forward_only("reduce_window")
