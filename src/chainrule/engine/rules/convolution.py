"""Convolutions: `conv_general_dilated` (every `lax.conv*`, `jnp.convolve`).

Both cotangents of a convolution are convolutions again, so a backward pass
compiles to the same kind of program as `jax.grad`'s and is differentiated
again by this same rule (second order).

Notation, per spatial dimension: an input of size `n` is dilated by `ld`
(`lhs_dilation`, transposed convolutions) to `(n-1)*ld+1`, padded by
`(lo, hi)`, and a kernel of size `k` dilated by `rd` (`rhs_dilation`, atrous)
to `(k-1)*rd+1` slides over it with stride `s`, giving `o` outputs:

    out[b, f, y] = sum_{c, j} in_dilated_padded[b, c, y*s + j*rd] * kernel[f, c, j]

* The input's cotangent spreads `g` back through the same windows: `g`
  dilated by `s`, convolved with the kernel flipped in space and with its two
  feature dimensions exchanged, read with stride `ld` (which drops the
  dilation holes).
* The kernel's cotangent correlates the input with `g`: the input's features
  play the batch, the batch is contracted, and `g`'s positions (`o` of them,
  `s` apart) are the window.

Feature groups (`feature_group_count`, depthwise and grouped convolutions)
and batch groups (`batch_group_count`, which the kernel cotangent of a
grouped convolution is) exchange roles between the two cotangents; see the
comments in the rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax import lax

from chainrule.engine.rules.registry import defvjp, dtype_of, primitive, shape_of, zeros_like
from chainrule.engine.rules.shape import convert_element_type, reshape, rev_p, transpose

_CONV_PARAMS = (
    "window_strides",
    "padding",
    "lhs_dilation",
    "rhs_dilation",
    "dimension_numbers",
    "feature_group_count",
    "batch_group_count",
    "precision",
    "preferred_element_type",
)

conv_general_dilated_p = primitive(
    "conv_general_dilated",
    lambda lhs, rhs, **p: lax.conv_general_dilated(lhs, rhs, **p),
    _CONV_PARAMS,
)


def conv_general_dilated(lhs: Any, rhs: Any, **params: Any) -> Any:
    """Binds chainrule's convolution with the parameters of `lax`'s primitive."""
    params["dimension_numbers"] = lax.ConvDimensionNumbers(*params["dimension_numbers"])
    return conv_general_dilated_p.bind(lhs, rhs, **params)


def dilated(size: int, dilation: int) -> int:
    """The size of `size` elements with `dilation - 1` holes between neighbours."""
    return 0 if size == 0 else (size - 1) * dilation + 1


def input_cotangent_padding(
    in_sizes: Sequence[int],
    window_sizes: Sequence[int],
    strides: Sequence[int],
    out_sizes: Sequence[int],
    padding: Sequence[tuple[int, int]],
    in_dilation: Sequence[int],
    window_dilation: Sequence[int],
) -> list[tuple[int, int]]:
    """The padding of the stride-dilated `g` whose windows give back the input.

    A window of (dilated) size `kd` that first covered padded position 0 must
    see g's first element at its last tap: `kd - 1 - lo` before; after, enough
    that the stride-1 result covers the dilated input, `nd` positions.
    Either may be negative (the forward pass skipped input at that end).
    Shared with the windowed reductions, whose windows are convolutions with
    a kernel of ones.
    """
    pads = []
    for n, k, s, o, (lo, _), ld, rd in zip(
        in_sizes,
        window_sizes,
        strides,
        out_sizes,
        padding,
        in_dilation,
        window_dilation,
        strict=True,
    ):
        kd, nd, od = dilated(k, rd), dilated(n, ld), dilated(o, s)
        before = kd - 1 - lo
        pads.append((before, nd + kd - 1 - od - before))
    return pads


def _kernel_cotangent_padding(in_sizes, window_sizes, strides, out_sizes, padding, ld, rd):
    """The input's padding for the kernel cotangent: the same `lo`; after it,
    enough that `g`'s dilated extent slides over exactly the kernel's `kd` taps."""
    pads = []
    for n, k, s, o, (lo, _), ld_, rd_ in zip(
        in_sizes, window_sizes, strides, out_sizes, padding, ld, rd, strict=True
    ):
        kd, nd, od = dilated(k, rd_), dilated(n, ld_), dilated(o, s)
        pads.append((lo, od + kd - 1 - nd - lo))
    return pads


def _move_groups(x: Any, src: int, dst: int, groups: int) -> Any:
    """Splits dimension `src` into (`groups`, rest) and folds the groups into
    dimension `dst` as its major part: size (n_src/groups), (groups*n_dst)."""
    shape = list(shape_of(x))
    split = [*shape[:src], groups, shape[src] // groups, *shape[src + 1 :]]
    x = reshape(x, split)
    # positions after the split: the groups at `src`, dimension `dst` shifted past it
    at = dst + 1 if dst >= src else dst
    perm = [d for d in range(len(split)) if d != src]
    perm.insert(perm.index(at), src)
    x = transpose(x, perm)
    merged = list(shape)
    merged[src] //= groups
    merged[dst] *= groups
    return reshape(x, merged)


def _spatial(spec: Sequence[int]) -> tuple[int, ...]:
    return tuple(spec[2:])


def _swap_leading(spec: Sequence[int]) -> tuple[int, ...]:
    return (spec[1], spec[0], *spec[2:])


def _taken(shape: Sequence[int], dims: Sequence[int]) -> list[int]:
    return [shape[d] for d in dims]


def _window_sizes(g, lhs, rhs, p):
    """Per spatial dimension: input, kernel and output sizes, strides, padding, dilations."""
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    return (
        _taken(shape_of(lhs), _spatial(lhs_spec)),
        _taken(shape_of(rhs), _spatial(rhs_spec)),
        p["window_strides"],
        _taken(shape_of(g), _spatial(out_spec)),
        p["padding"],
        p["lhs_dilation"],
        p["rhs_dilation"],
    )


def _lhs_cotangent(g, lhs, rhs, **p):
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    feature_groups, batch_groups = p["feature_group_count"], p["batch_group_count"]
    kernel = rhs
    groups = max(feature_groups, batch_groups)
    if groups > 1:
        # The kernel's output features are grouped (by feature or batch group);
        # going backwards they become its input features, so the groups move
        # there: (G*o, c) -> (o, G*c), a grouped convolution over g's features.
        kernel = _move_groups(kernel, rhs_spec[0], rhs_spec[1], groups)
    pads = input_cotangent_padding(*_window_sizes(g, lhs, rhs, p))
    kernel = rev_p.bind(kernel, dimensions=_spatial(rhs_spec))
    kernel = convert_element_type(kernel, dtype_of(g))
    out = conv_general_dilated(
        g,
        kernel,
        window_strides=tuple(p["lhs_dilation"]),
        padding=tuple(pads),
        lhs_dilation=tuple(p["window_strides"]),
        rhs_dilation=tuple(p["rhs_dilation"]),
        dimension_numbers=(out_spec, _swap_leading(rhs_spec), lhs_spec),
        feature_group_count=groups,
        batch_group_count=1,
        precision=p["precision"],
        preferred_element_type=p["preferred_element_type"],
    )
    out = convert_element_type(out, dtype_of(lhs))
    if batch_groups > 1:
        # Each batch group produced its own copy of the input features: they
        # are the input's batch groups, major in its batch dimension.
        out = _move_groups(out, lhs_spec[1], lhs_spec[0], batch_groups)
    return out


def _rhs_cotangent(g, lhs, rhs, **p):
    if 0 in shape_of(g):  # no output: a degenerate kernel-sized convolution otherwise
        return zeros_like(rhs)
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    # Forward feature groups pair input-feature group i with output-feature
    # group i; here the input features are the batch, so they are batch
    # groups (and forward batch groups become feature groups, contracted).
    pads = _kernel_cotangent_padding(*_window_sizes(g, lhs, rhs, p))
    out = conv_general_dilated(
        convert_element_type(lhs, dtype_of(g)),
        g,
        window_strides=tuple(p["rhs_dilation"]),
        padding=tuple(pads),
        lhs_dilation=tuple(p["lhs_dilation"]),
        rhs_dilation=tuple(p["window_strides"]),
        dimension_numbers=(
            _swap_leading(lhs_spec),
            _swap_leading(out_spec),
            _swap_leading(rhs_spec),
        ),
        feature_group_count=p["batch_group_count"],
        batch_group_count=p["feature_group_count"],
        precision=p["precision"],
        preferred_element_type=p["preferred_element_type"],
    )
    return convert_element_type(out, dtype_of(rhs))


defvjp(
    conv_general_dilated_p,
    lambda ans, lhs, rhs, **p: lambda g: _lhs_cotangent(g, lhs, rhs, **p),
    lambda ans, lhs, rhs, **p: lambda g: _rhs_cotangent(g, lhs, rhs, **p),
)
