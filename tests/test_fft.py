"""FFT: `lax.fft` with every `fft_type` over 1, 2 and 3 dimensions, the `jnp.fft`
functions built on it, a spectral loss via `rfft`, all against `jax.vjp`/`jax.grad`,
and float64 central differences for the real-to-complex pair (RFFT, IRFFT), whose
transposes are the ones worth checking independently of JAX.

The default run checks every case eagerly (first and second order in float64 and
complex128, first order in float32 and complex64) and all of them together under
`jit` and `vmap`; `-m slow` checks each in every mode at both orders.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import chainrule as cr
from tests.oracle import check_against_jax, emitted

FFT, IFFT, RFFT, IRFFT = lax.FftType.FFT, lax.FftType.IFFT, lax.FftType.RFFT, lax.FftType.IRFFT

# fft_lengths per dimension count: even and odd last lengths (RFFT and IRFFT keep
# n//2 + 1 frequencies, and the Nyquist one exists for even n only)
LENGTHS = [(6,), (7,), (3, 5), (2, 3, 4)]
TYPES = {"FFT": FFT, "IFFT": IFFT, "RFFT": RFFT, "IRFFT": IRFFT}


def _operand(fft_type, lengths, precision, rng, batch=(2,)):
    """An operand of `lax.fft(., fft_type, lengths)`: real for RFFT, complex otherwise,
    with the n//2 + 1 frequencies of the last dimension for IRFFT."""
    shape = batch + lengths
    if fft_type == IRFFT:
        shape = shape[:-1] + (lengths[-1] // 2 + 1,)
    real = rng.standard_normal(shape)
    if fft_type == RFFT:
        return jnp.asarray(real, jnp.float64 if precision == 64 else jnp.float32)
    z = real + 1j * rng.standard_normal(shape)
    return jnp.asarray(z, jnp.complex128 if precision == 64 else jnp.complex64)


CASES = [(t, n) for t in TYPES for n in LENGTHS]
IDS = [f"{t}-{'x'.join(map(str, n))}" for t, n in CASES]
CASES_32 = [(t, n) for t, n in CASES if n in ((7,), (2, 3, 4))]  # the rest: -m slow
IDS_32 = [f"{t}-{'x'.join(map(str, n))}" for t, n in CASES_32]


def _fun(type_name, lengths):
    return lambda x: lax.fft(x, TYPES[type_name], lengths)


@pytest.mark.parametrize("type_name, lengths", CASES, ids=IDS)
def test_fft_float64_eager_both_orders(type_name, lengths):
    x = _operand(TYPES[type_name], lengths, 64, np.random.default_rng(len(lengths)))
    fun = _fun(type_name, lengths)
    assert "fft" in emitted(fun, x)
    check_against_jax(fun, x, modes=("eager",))


@pytest.mark.parametrize("type_name, lengths", CASES_32, ids=IDS_32)
def test_fft_float32_eager(type_name, lengths):
    x = _operand(TYPES[type_name], lengths, 32, np.random.default_rng(len(lengths) + 10))
    check_against_jax(_fun(type_name, lengths), x, modes=("eager",), second_order=False)


def test_every_fft_at_once_under_jit_and_vmap():
    rng = np.random.default_rng(1)
    operands = [_operand(TYPES[t], n, 64, rng) for t, n in CASES]
    funs = [_fun(t, n) for t, n in CASES]

    def everything(*xs):
        return [f(x) for f, x in zip(funs, xs, strict=True)]

    check_against_jax(everything, *operands, modes=("jit", "vmap"), second_order=False)


@pytest.mark.slow
@pytest.mark.parametrize("precision", [64, 32])
@pytest.mark.parametrize("type_name, lengths", CASES, ids=IDS)
def test_fft_every_mode_and_order(type_name, lengths, precision):
    x = _operand(TYPES[type_name], lengths, precision, np.random.default_rng(7))
    check_against_jax(_fun(type_name, lengths), x)


# --- jnp.fft ---------------------------------------------------------------------------

_R = np.random.default_rng(2)
_X = jnp.asarray(_R.standard_normal((3, 4, 6)))
_Z = jnp.asarray(_R.standard_normal((3, 4, 6)) + 1j * _R.standard_normal((3, 4, 6)))
_H = jnp.asarray(_R.standard_normal((3, 4, 4)) + 1j * _R.standard_normal((3, 4, 4)))

JNP_FFT = {
    "fft": (jnp.fft.fft, _Z),
    "fft of a real signal": (jnp.fft.fft, _X),
    "ifft": (jnp.fft.ifft, _Z),
    "fft n=8 (padded)": (lambda z: jnp.fft.fft(z, n=8), _Z),
    "fft n=4 (cropped)": (lambda z: jnp.fft.fft(z, n=4, axis=1), _Z),
    "fft2": (jnp.fft.fft2, _Z),
    "ifft2": (jnp.fft.ifft2, _Z),
    "fftn": (jnp.fft.fftn, _Z),
    "ifftn": (jnp.fft.ifftn, _Z),
    "rfft": (jnp.fft.rfft, _X),
    "rfft n=5": (lambda x: jnp.fft.rfft(x, n=5), _X),
    "rfft2": (jnp.fft.rfft2, _X),
    "rfftn": (jnp.fft.rfftn, _X),
    "irfft": (jnp.fft.irfft, _H),
    "irfft n=7": (lambda z: jnp.fft.irfft(z, n=7), _H),
    "irfft2": (jnp.fft.irfft2, _H),
    "irfftn s=(3,4,6)": (lambda z: jnp.fft.irfftn(z, s=(3, 4, 6)), _H),
    "hfft": (jnp.fft.hfft, _H),
    "ihfft": (jnp.fft.ihfft, _X),
    "fftshift(fft2)": (lambda z: jnp.fft.fftshift(jnp.fft.fft2(z)), _Z),
    "ifftshift(rfft)": (lambda x: jnp.fft.ifftshift(jnp.fft.rfft(x), axes=1), _X),
    "norm=ortho": (lambda x: jnp.fft.rfftn(x, norm="ortho"), _X),
    "norm=forward": (lambda z: jnp.fft.ifft2(z, norm="forward"), _Z),
    "axes=(0, 2)": (lambda z: jnp.fft.fftn(z, axes=(0, 2)), _Z),
}


# checked one by one eagerly by default (the others together under jit, and one by
# one with -m slow)
EAGER = ["fft of a real signal", "ifft2", "rfft n=5", "irfft n=7", "hfft", "fftshift(fft2)"]


@pytest.mark.parametrize("name", EAGER)
def test_jnp_fft_eager(name):
    fun, x = JNP_FFT[name]
    assert "fft" in emitted(fun, x)
    check_against_jax(fun, x, modes=("eager",), second_order=False)


def test_jnp_fft_at_once_under_jit():
    names = [n for n in sorted(JNP_FFT) if n not in EAGER][::2]  # the others: -m slow

    def everything(x, z, h):
        args = {id(_X): x, id(_Z): z, id(_H): h}
        return [JNP_FFT[n][0](args[id(JNP_FFT[n][1])]) for n in names]

    check_against_jax(everything, _X, _Z, _H, modes=("jit",), second_order=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(JNP_FFT))
def test_jnp_fft_every_mode(name):
    fun, x = JNP_FFT[name]
    check_against_jax(fun, x)


# --- finite differences for the real <-> complex transforms ---------------------------


def _central_difference(loss, x, direction, eps=1e-6):
    return (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)


def _directional(grad, direction):
    """The directional derivative of a real loss from its gradient in JAX's convention
    (grad = dL/dx - i dL/dy for a complex input): Re(sum(grad * d)) is then
    sum(dL/dx d_x + dL/dy d_y), the derivative along d = d_x + i d_y."""
    return float(jnp.real(jnp.sum(grad * direction)))


@pytest.mark.parametrize("n", [6, 7])
def test_rfft_and_irfft_against_finite_differences(n):
    rng = np.random.default_rng(n)
    weights = jnp.asarray(rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1))
    out_weights = jnp.asarray(rng.standard_normal(n))

    def rfft_loss(x):
        return jnp.sum(jnp.real(jnp.fft.rfft(x) * weights))

    def irfft_loss(z):
        return jnp.sum(jnp.fft.irfft(z, n=n) * out_weights)

    x = jnp.asarray(rng.standard_normal(n))
    z = jnp.asarray(rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1))
    for loss, point in ((rfft_loss, x), (irfft_loss, z)):
        for _ in range(3):
            d = rng.standard_normal(point.shape)
            if jnp.iscomplexobj(point):
                d = d + 1j * rng.standard_normal(point.shape)
            d = jnp.asarray(d, point.dtype)
            got = _directional(cr.grad(loss)(point), d)
            np.testing.assert_allclose(
                got, float(_central_difference(loss, point, d)), rtol=1e-7, atol=1e-8
            )


# --- a spectral loss ---------------------------------------------------------------------


def _spectral_loss(signal, low_pass, target):
    """Log-power spectrum distance plus a low-pass reconstruction error (rfft, irfft)."""
    spectrum = jnp.fft.rfft(signal, axis=-1)
    power = jnp.log1p(jnp.abs(spectrum) ** 2)
    target_power = jnp.log1p(jnp.abs(jnp.fft.rfft(target, axis=-1)) ** 2)
    smoothed = jnp.fft.irfft(spectrum * low_pass, n=signal.shape[-1], axis=-1)
    return jnp.mean((power - target_power) ** 2) + jnp.mean((smoothed - target) ** 2)


@pytest.mark.parametrize("dtype", [jnp.float64, pytest.param(jnp.float32, marks=pytest.mark.slow)])
def test_spectral_loss_gives_jax_grad(dtype):
    rng = np.random.default_rng(3)
    signal = jnp.asarray(rng.standard_normal((4, 32)), dtype)
    target = jnp.asarray(np.sin(np.linspace(0, 6 * np.pi, 32)) * np.ones((4, 1)), dtype)
    low_pass = jnp.asarray(np.exp(-np.arange(17) / 4.0), dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == jnp.float64 else dict(rtol=1e-4, atol=1e-6)
    want = jax.grad(_spectral_loss, argnums=(0, 1))(signal, low_pass, target)
    for got in (
        cr.grad(_spectral_loss, argnums=(0, 1))(signal, low_pass, target),
        jax.jit(cr.grad(_spectral_loss, argnums=(0, 1)))(signal, low_pass, target),
    ):
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype == dtype
            np.testing.assert_allclose(g, w, **tol)


def test_image_spectral_loss_second_order():
    """A 2-D spectral penalty (rfft2 of an image): its Hessian-vector product as jax's."""
    rng = np.random.default_rng(4)
    image = jnp.asarray(rng.standard_normal((6, 8)))
    v = jnp.asarray(rng.standard_normal((6, 8)))
    freq = jnp.asarray(np.hypot(*np.meshgrid(np.arange(6), np.arange(5), indexing="ij")))

    def loss(img):
        return jnp.sum(freq * jnp.abs(jnp.fft.rfft2(img)) ** 2) / img.size

    def hvp(grad):
        return lambda img: grad(lambda i: jnp.vdot(grad(loss)(i), v))(img)

    want = hvp(jax.grad)(image)
    np.testing.assert_allclose(hvp(cr.grad)(image), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jax.jit(hvp(cr.grad))(image), want, rtol=1e-12, atol=1e-12)
