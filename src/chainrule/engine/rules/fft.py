"""Fast Fourier transforms: `fft` with every `fft_type` over 1 to 3 dimensions.

`lax.fft` transforms the last `len(fft_lengths)` dimensions of its operand:

* FFT and IFFT map complex to complex. The discrete Fourier matrix is
  symmetric, and JAX pairs a cotangent with a tangent without conjugating
  (see `shape.real`), so each is its own transpose: the VJP of FFT is the FFT
  of the cotangent, that of IFFT its IFFT.
* RFFT maps n real numbers to the n//2 + 1 non-negative frequencies of their
  FFT: the full FFT of the input (as complex), cut to those frequencies. Its
  transpose reverses the steps: zero-pad the cotangent back to n frequencies,
  take the FFT, keep the real part.
* IRFFT maps n//2 + 1 frequencies (the others are their conjugates) to n real
  numbers. Its transpose is the RFFT of the cotangent divided by the number
  of points, with the frequencies that stand for two (all but the zero one and,
  for even n, the last) counted twice, then conjugated: JAX's convention.

Each VJP is an `fft` again (with pad, real, conj, mul), so it differentiates
to any order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from jax import lax

from chainrule.engine.rules.elementwise import mul
from chainrule.engine.rules.indexing import pad
from chainrule.engine.rules.registry import defvjp, dtype_of, primitive, shape_of
from chainrule.engine.rules.shape import conj, convert_element_type, real

FFT, IFFT, RFFT, IRFFT = lax.FftType.FFT, lax.FftType.IFFT, lax.FftType.RFFT, lax.FftType.IRFFT

fft_p = primitive(
    "fft",
    lambda x, fft_type, fft_lengths: lax.fft(x, fft_type, fft_lengths),
    ("fft_type", "fft_lengths"),
)


def _fft(x: Any, fft_type: lax.FftType, fft_lengths: tuple[int, ...]) -> Any:
    return fft_p.bind(x, fft_type=fft_type, fft_lengths=tuple(fft_lengths))


def _rfft_transpose(g: Any, x: Any, fft_lengths: tuple[int, ...]) -> Any:
    """Pad the frequencies back to n (zeros), FFT, real part."""
    missing = fft_lengths[-1] - shape_of(g)[-1]
    config = [(0, 0, 0)] * (len(shape_of(g)) - 1) + [(0, missing, 0)]
    full = pad(g, np.zeros((), dtype_of(g)), config)
    return convert_element_type(real(_fft(full, FFT, fft_lengths)), dtype_of(x))


def _irfft_weights(spectrum: Any, fft_lengths: tuple[int, ...]) -> Any:
    """1/N, doubled for the frequencies that stand for a conjugate pair, broadcast
    along the last dimension of `spectrum` (a constant: only m numbers are
    baked into a compiled program)."""
    m = fft_lengths[-1] // 2 + 1
    weights = np.full(m, 2.0)
    weights[0] = 1.0
    if fft_lengths[-1] % 2 == 0:
        weights[-1] = 1.0
    weights = (weights / math.prod(fft_lengths)).astype(dtype_of(spectrum))
    ndim = len(shape_of(spectrum))
    return lax.broadcast_in_dim(weights, shape_of(spectrum), (ndim - 1,))


def _irfft_transpose(g: Any, fft_lengths: tuple[int, ...]) -> Any:
    """RFFT of the cotangent, weighted (`_irfft_weights`), conjugated."""
    spectrum = _fft(g, RFFT, fft_lengths)
    return conj(mul(spectrum, _irfft_weights(spectrum, fft_lengths)))


def _fft_vjp(ans, x, fft_type, fft_lengths):
    if fft_type == RFFT:
        return lambda g: _rfft_transpose(g, x, fft_lengths)
    if fft_type == IRFFT:
        return lambda g: _irfft_transpose(g, fft_lengths)
    return lambda g: _fft(g, fft_type, fft_lengths)  # FFT and IFFT: their own transposes


defvjp(fft_p, _fft_vjp)
