"""chainrule's `conv_general_dilated` rule against `jax.vjp` (tests/oracle.py).

Every layout (1-, 2-, 3-D; channels first and last; mixed), strides, SAME,
VALID and explicit (negative too) padding, input and kernel dilation, feature
and batch groups, `preferred_element_type` and `precision`, at first and
second order, float64 (1e-12) and float32, eagerly, under `jit` and `vmap`;
the public wrappers (`lax.conv`, `lax.conv_transpose`, `jnp.convolve`,
`jnp.correlate`), a finite-difference check of the grouped rules, and a
ResNet-style block against `jax.grad`.
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from jax import lax

import chainrule as cr
from tests.oracle import check_against_jax, emitted

CONV = "conv_general_dilated"


def normal(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def conv(**kw):
    return lambda x, w: lax.conv_general_dilated(x, w, **kw)


def check_conv(fun, x, w, **kw):
    assert CONV in emitted(fun, x, w)
    check_against_jax(fun, x, w, **kw)


# --- layouts -----------------------------------------------------------------------

# name: (dimension numbers, input shape, kernel shape); 3 input and 4 output features
LAYOUTS = {
    "1-D NCH/OIH": (("NCH", "OIH", "NCH"), (2, 3, 9), (4, 3, 3)),
    "1-D NHC/HIO": (("NHC", "HIO", "NHC"), (2, 9, 3), (3, 3, 4)),
    "2-D NCHW/OIHW": (("NCHW", "OIHW", "NCHW"), (2, 3, 7, 6), (4, 3, 3, 2)),
    "2-D NHWC/HWIO": (("NHWC", "HWIO", "NHWC"), (2, 7, 6, 3), (3, 2, 3, 4)),
    "2-D NHWC/OIHW->NCHW": (("NHWC", "OIHW", "NCHW"), (2, 7, 6, 3), (4, 3, 3, 2)),
    "2-D CHWN/IOHW->HWNC": (("CHWN", "IOHW", "HWNC"), (3, 7, 6, 2), (3, 4, 3, 2)),
    "3-D NCDHW/OIDHW": (("NCDHW", "OIDHW", "NCDHW"), (1, 3, 5, 4, 5), (4, 3, 2, 2, 3)),
    "3-D NDHWC/DHWIO": (("NDHWC", "DHWIO", "NDHWC"), (1, 5, 4, 5, 3), (2, 2, 3, 3, 4)),
}


SLOW = pytest.mark.slow  # the default run keeps one case of each kind; the sweep runs all
FAST_LAYOUTS = ("1-D NHC/HIO", "2-D NCHW/OIHW", "2-D CHWN/IOHW->HWNC", "3-D NDHWC/DHWIO")


@pytest.mark.parametrize(
    "layout", [pytest.param(k, marks=() if k in FAST_LAYOUTS else SLOW) for k in LAYOUTS]
)
def test_layouts_with_strides_padding_and_dilations(layout):
    """Each layout with a stride, explicit padding and both dilations."""
    dn, xshape, wshape = LAYOUTS[layout]
    n = len(xshape) - 2
    fun = conv(
        window_strides=(2,) + (1,) * (n - 1),
        padding=((1, 1),) * (n - 1) + ((0, 2),),
        lhs_dilation=(1,) * (n - 1) + (2,),
        rhs_dilation=(1,) * (n - 1) + (2,) if n > 1 else (1,),
        dimension_numbers=dn,
    )
    check_conv(fun, normal(xshape), normal(wshape, seed=1), modes=("eager",))


@pytest.mark.parametrize("layout", ["2-D NHWC/HWIO", pytest.param("2-D NCHW/OIHW", marks=SLOW)])
def test_float32_eager_jit_vmap(layout):
    dn, xshape, wshape = LAYOUTS[layout]
    fun = conv(window_strides=(1, 2), padding="VALID", dimension_numbers=dn)
    check_conv(fun, normal(xshape, np.float32), normal(wshape, np.float32, 1))


def test_float64_eager_jit_vmap_every_parameter():
    fun = conv(
        window_strides=(2, 1),
        padding=((1, 2), (-1, 1)),
        lhs_dilation=(1, 2),
        rhs_dilation=(2, 1),
        feature_group_count=2,
    )
    check_conv(fun, normal((2, 4, 7, 6)), normal((6, 2, 3, 2), seed=1))


# --- groups --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "groups, xshape, wshape",
    [
        pytest.param(dict(feature_group_count=3), (2, 3, 6, 5), (3, 1, 3, 3), marks=SLOW),
        (dict(feature_group_count=3), (2, 3, 6, 5), (6, 1, 3, 2)),  # depthwise, multiplier 2
        (dict(feature_group_count=2), (2, 4, 6, 5), (6, 2, 2, 3)),  # grouped
        (dict(batch_group_count=2), (4, 3, 6, 5), (4, 3, 3, 2)),
        pytest.param(dict(batch_group_count=3), (3, 2, 6, 5), (6, 2, 2, 2), marks=SLOW),
    ],
)
def test_feature_and_batch_groups(groups, xshape, wshape):
    fun = conv(window_strides=(1, 2), padding="SAME", rhs_dilation=(2, 1), **groups)
    check_conv(fun, normal(xshape), normal(wshape, seed=1), modes=("eager",))


@pytest.mark.parametrize(
    "groups, xshape, wshape, modes",
    [
        (dict(feature_group_count=2), (2, 5, 6, 4), (3, 3, 2, 6), ("jit",)),
        pytest.param(dict(batch_group_count=2), (4, 5, 6, 3), (3, 2, 3, 4), ("eager",), marks=SLOW),
    ],
)
def test_groups_in_channels_last_layout(groups, xshape, wshape, modes):
    dn = ("NHWC", "HWIO", "NHWC")
    fun = conv(window_strides=(1, 1), padding="SAME", dimension_numbers=dn, **groups)
    check_conv(fun, normal(xshape), normal(wshape, seed=1), modes=modes)


@pytest.mark.parametrize(
    "groups, xshape, wshape",
    [
        (dict(feature_group_count=2), (2, 4, 6, 5), (6, 2, 2, 3)),
        (dict(batch_group_count=2), (4, 3, 6, 5), (4, 3, 3, 2)),
    ],
)
def test_groups_against_finite_differences(groups, xshape, wshape):
    """The grouped rules against central differences (not only against JAX's rule)."""
    fun = conv(window_strides=(2, 1), padding=((1, 0), (0, 2)), lhs_dilation=(1, 2), **groups)
    x, w = normal(xshape), normal(wshape, seed=1)
    ct = normal(np.shape(fun(x, w)), seed=2)
    dx, dw = normal(xshape, seed=3), normal(wshape, seed=4)
    gx, gw = cr.grad(lambda x, w: jnp.vdot(fun(x, w), ct), argnums=(0, 1))(x, w)
    eps = 1e-6
    plus, minus = (
        jnp.vdot(fun(x + eps * dx, w + eps * dw), ct),
        jnp.vdot(fun(x - eps * dx, w - eps * dw), ct),
    )
    np.testing.assert_allclose(
        jnp.vdot(gx, dx) + jnp.vdot(gw, dw), (plus - minus) / (2 * eps), rtol=1e-7
    )


# --- element types and precision -------------------------------------------------------


def test_preferred_element_type_widens_float32_to_float64():
    fun = conv(window_strides=(1, 1), padding="SAME", preferred_element_type=jnp.float64)
    x, w = normal((2, 3, 5, 4), np.float32), normal((4, 3, 3, 3), np.float32, 1)
    assert fun(x, w).dtype == jnp.float64
    check_conv(fun, x, w, rtol=1e-6, atol=1e-6)


def test_preferred_element_type_bfloat16_to_float32():
    fun = conv(window_strides=(2, 1), padding="VALID", preferred_element_type=jnp.float32)
    x, w = normal((2, 3, 6, 4), jnp.bfloat16), normal((4, 3, 2, 3), jnp.bfloat16, 1)
    assert fun(x, w).dtype == jnp.float32
    check_conv(fun, x, w, rtol=2e-2, atol=2e-2, second_order=False, modes=("eager", "jit"))


@pytest.mark.parametrize(
    "precision",
    [lax.Precision.HIGHEST, pytest.param((lax.Precision.HIGH, lax.Precision.HIGHEST), marks=SLOW)],
)
def test_precision_is_honoured(precision):
    fun = conv(window_strides=(1, 1), padding="SAME", precision=precision)
    check_conv(fun, normal((2, 3, 5, 4)), normal((4, 3, 3, 3), seed=1), modes=("eager",))


# --- the public wrappers --------------------------------------------------------------


@pytest.mark.parametrize(
    "fun",
    [
        pytest.param(lambda x, w: lax.conv(x, w, (2, 1), "SAME"), id="lax.conv"),
        pytest.param(
            lambda x, w: lax.conv_with_general_padding(
                x, w, (1, 1), ((2, 0), (1, 1)), (2, 1), None
            ),
            id="lax.conv_with_general_padding",
            marks=SLOW,
        ),
        pytest.param(
            lambda x, w: lax.conv_transpose(
                x, w, (2, 2), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
            ),
            id="lax.conv_transpose SAME",
        ),
        pytest.param(
            lambda x, w: lax.conv_transpose(
                x,
                w,
                (2, 1),
                "VALID",
                rhs_dilation=(1, 2),
                dimension_numbers=("NCHW", "IOHW", "NCHW"),
                transpose_kernel=True,
            ),
            id="lax.conv_transpose transpose_kernel",
        ),
    ],
)
def test_lax_wrappers(fun):
    x, w = normal((2, 3, 6, 5)), normal((3, 3, 3, 2), seed=1)
    check_conv(fun, x, w, modes=("eager",))


@pytest.mark.parametrize(
    "which, mode",
    [
        ("convolve", "full"),
        ("correlate", "same"),
        *(pytest.param(w, m, marks=SLOW) for w, m in [("convolve", "same"), ("convolve", "valid")]),
        *(
            pytest.param(w, m, marks=SLOW)
            for w, m in [("correlate", "full"), ("correlate", "valid")]
        ),
    ],
)
def test_jnp_convolve_and_correlate(which, mode):
    fun = lambda a, v: getattr(jnp, which)(a, v, mode=mode)  # noqa: E731
    check_conv(fun, normal((9,)), normal((4,), seed=1), modes=("eager",))


# --- properties over the parameters ---------------------------------------------------


def _out_size(n, k, s, lo, hi, ld, rd):
    nd, kd = (n - 1) * ld + 1, (k - 1) * rd + 1
    return (nd + lo + hi - kd) // s + 1 if nd + lo + hi >= kd else 0


@st.composite
def conv_cases(draw):
    """A 2-D NCHW convolution with drawn sizes, strides, padding, dilations and groups."""
    groups = draw(st.sampled_from([(1, 1), (2, 1), (1, 2)]))  # (feature, batch)
    fg, bg = groups
    batch = bg * draw(st.integers(1, 2))
    cin = fg * draw(st.integers(1, 2))
    cout = fg * bg * draw(st.integers(1, 2))
    spatial, kernel, strides, pads, lhs_dilation, rhs_dilation = [], [], [], [], [], []
    for _ in range(2):
        n, k = draw(st.integers(2, 6)), draw(st.integers(1, 3))
        s, ld, rd = (draw(st.integers(1, 2)) for _ in range(3))
        lo, hi = draw(st.integers(-1, 2)), draw(st.integers(-1, 2))
        assume(_out_size(n, k, s, lo, hi, ld, rd) > 0)
        for values, v in zip(
            (spatial, kernel, strides, pads, lhs_dilation, rhs_dilation),
            (n, k, s, (lo, hi), ld, rd),
            strict=True,
        ):
            values.append(v)
    # (string padding is refused with input dilation: that is lax.conv_transpose's job)
    named = ["SAME", "VALID"] if max(lhs_dilation) == 1 else []
    padding = draw(st.sampled_from([tuple(pads), *named]))
    params = dict(
        window_strides=tuple(strides),
        padding=padding,
        lhs_dilation=tuple(lhs_dilation),
        rhs_dilation=tuple(rhs_dilation),
    )
    seed = draw(st.integers(0, 2**16))
    x = normal((batch, cin, *spatial), seed=seed)
    w = normal((cout, cin // fg, *kernel), seed=seed + 1)
    return conv(feature_group_count=fg, batch_group_count=bg, **params), x, w


def _conv_property(modes, examples):
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(conv_cases())
    def prop(case):
        fun, x, w = case
        assume(0 not in np.shape(jax.eval_shape(fun, x, w)))
        check_conv(fun, x, w, modes=modes)

    return prop


def test_property_first_and_second_order():
    _conv_property(("eager",), 3)()


@pytest.mark.slow
def test_property_sweep_eager_jit_vmap():
    _conv_property(("eager", "jit", "vmap"), 60)()


# --- a ResNet-style block --------------------------------------------------------------


def _resnet_block(params, x):
    """conv -> batch statistics -> relu -> conv -> residual add -> average pool -> head."""
    w1, w2, gamma, beta, head = params
    same = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = lax.conv_general_dilated(x, w1, **same)
    mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    h = jax.nn.relu((h - mean) * lax.rsqrt(var + 1e-5) * gamma + beta)
    h = lax.conv_general_dilated(h, w2, **same) + x
    pooled = lax.reduce_window(h, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
    logits = pooled.mean((1, 2)) @ head
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0] ** 2)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_resnet_block_gives_jax_grads_eager_and_jit(dtype, rtol):
    params = (
        normal((3, 3, 4, 4), dtype, 1) * 0.3,
        normal((3, 3, 4, 4), dtype, 2) * 0.3,
        1.0 + 0.1 * normal((4,), dtype, 3),
        0.1 * normal((4,), dtype, 4),
        normal((4, 3), dtype, 5),
    )
    x = normal((2, 6, 6, 4), dtype, 6)
    assert {CONV, "reduce_window_sum"} <= emitted(_resnet_block, params, x)
    want = jax.grad(_resnet_block)(params, x)
    for grad in (cr.grad(_resnet_block), jax.jit(cr.grad(_resnet_block))):
        got = grad(params, x)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol)
