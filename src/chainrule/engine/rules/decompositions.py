"""Matrix decompositions and solves: `cholesky`, `triangular_solve`, `lu`,
`qr`, `eigh`, `svd`, `eig` (eigenvalues), `tridiagonal_solve` and
`custom_linear_solve` (what `jnp.linalg.solve`, `inv`, `det`, `slogdet`,
`pinv`, `lstsq`, `norm(ord=2)` and `jax.scipy.linalg` are built from).

Each rule is the transpose of the JVP that JAX's `jax/_src/lax/linalg.py`
documents for the primitive, taken by hand and written with `jax.numpy` and
`lax.linalg` calls, so that on traced values it is recorded through the same
table (second order) and its degenerate cases (repeated eigenvalues or
singular values, singular matrices) give JAX's infinities and NaNs in the
same places. Every matrix argument may carry leading batch dimensions.

Notation in the comments: `A` the input, `G` (or `x_bar`) a cotangent,
`T(X)` the transpose of the last two axes (no conjugation: a VJP is the
transpose of the linear map, as in JAX).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax._src import core as jcore  # eval_jaxpr (JAX 0.10, pinned)
from jax._src.lax import linalg as jax_linalg  # the primitives
from jax._src.lax.control_flow import solves as jax_solves

from chainrule.engine import core
from chainrule.engine.core import Node, Primitive, raw, zeros_like
from chainrule.engine.rules.forward_only import register_forward_only, transposed_jvp
from chainrule.engine.rules.registry import dtype_of, primitive, shape_of
from chainrule.errors import NoVJPRuleError

_HIGHEST = lax.Precision.HIGHEST


def _mm(a: Any, b: Any) -> Any:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _T(x: Any) -> Any:
    return jnp.swapaxes(x, -1, -2)


def _H(x: Any) -> Any:
    """The conjugate transpose of the last two axes (`_T` for a real matrix)."""
    return _conj(_T(x))


def _is_complex(x: Any) -> bool:
    return jnp.issubdtype(dtype_of(x), jnp.complexfloating)


def _conj(x: Any) -> Any:
    return jnp.conj(x) if _is_complex(x) else x


def _diag(x: Any) -> Any:
    """The diagonal of the last two axes."""
    return jnp.diagonal(x, axis1=-2, axis2=-1)


def _eye(n: int, like: Any, k: int = 0) -> Any:
    """The n x n identity (ones from the k-th diagonal block on) in `like`'s
    dtype and rank (leading axes of size 1), so no operation promotes ranks."""
    eye = jnp.pad(jnp.eye(n - k, dtype=dtype_of(like)), [(k, 0), (k, 0)])
    return jnp.reshape(eye, (1,) * (len(shape_of(like)) - 2) + (n, n))


def _eye_like(x: Any) -> Any:
    """The identity of `x`'s last dimension, `x`'s dtype and rank."""
    return _eye(shape_of(x)[-1], x)


def _diag_matrix(v: Any) -> Any:
    """A (..., n, n) matrix with `v` (..., n) on its diagonal."""
    return _eye(shape_of(v)[-1], v[..., None]) * v[..., None, :]


def _tri_solve(a: Any, b: Any, **flags: bool) -> Any:
    return jax_linalg.triangular_solve(a, b, **flags)


class _Decomposition(Primitive):
    """A primitive whose rule treats its operands and outputs at once:
    `rule(g, node)` gets the outputs' cotangents (a tuple for several results,
    `None` for an output that got none) and returns one cotangent per operand
    (`None` where an operand is not differentiable)."""

    def __init__(self, name, impl, params=(), *, rule: Callable, **kwargs):
        super().__init__(name, impl, params, **kwargs)
        self.rule = rule

    def vjp(self, g: Any, node: Node) -> list[Any]:
        cts = self.rule(g, node)
        out = []
        for i in node.argnums:
            if cts[i] is None:
                raise NoVJPRuleError(self.name, detail=f"it has no rule for argument {i}")
            out.append(cts[i])
        return out


def _register(jax_prim: Any, params: Sequence[str], rule: Callable | None, **kwargs) -> Primitive:
    """Enters JAX's linear-algebra primitive `jax_prim` in the table, its
    implementation JAX's own bind, its rule `rule(g, node)`."""
    impl = lambda *args, **p: jax_prim.bind(*args, **p)  # noqa: E731
    if rule is None:
        return primitive(jax_prim.name, impl, params, differentiable=False, **kwargs)
    return primitive(jax_prim.name, impl, params, cls=_Decomposition, rule=rule, **kwargs)


def _output_cotangents(g: Any, outs: Sequence[Any]) -> list[Any]:
    """Cotangents of a multiple-results node, `None` where none arrived."""
    return list(g) if isinstance(g, tuple) else [g] + [None] * (len(outs) - 1)


# --- cholesky ------------------------------------------------------------------------
# JVP (Murray 2016): dL = L phi(L^-1 dA L^-H), phi = lower triangle with the
# diagonal halved. Transposed: A_bar = L^-T phi(T(L) L_bar) conj(L)^-1, with
# the two triangular solves JAX's transposes of its own solves give.


def _phi(x: Any) -> Any:
    return jnp.tril(x) / (1 + _eye_like(x))


def _cholesky_rule(g: Any, node: Node) -> list[Any]:
    (a,), l_bar = node.primals, g
    lower = jnp.tril(node.ans)  # the factor's upper triangle is left unspecified
    inner = _phi(_mm(_T(lower), l_bar))
    inner = _tri_solve(lower, inner, left_side=True, lower=True, transpose_a=True)
    a_bar = _tri_solve(lower, inner, left_side=False, lower=True, conjugate_a=True)
    return [a_bar.astype(dtype_of(a))]


cholesky_p = _register(jax_linalg.cholesky_p, (), _cholesky_rule)


# --- triangular_solve ----------------------------------------------------------------
# X = op(A)^-1 B (left side) or B op(A)^-1 (right side), op(A) = A, T(A),
# conj(A) or A^H, only A's `lower` triangle read (its diagonal taken as ones
# with unit_diagonal). Linear in B: B_bar = the solve with op transposed.
# In A: dX = -op(A)^-1 op(dA) X (left) or -X op(dA) op(A)^-1 (right).


def _triangular_solve_rule(g: Any, node: Node) -> list[Any]:
    a, b = node.primals
    x = node.ans
    flags = dict(node.params)
    left, lower = flags["left_side"], flags["lower"]
    transposed = dict(flags, transpose_a=not flags["transpose_a"])
    m, n = shape_of(b)[-2:]
    b_bar = a_bar = None
    if 1 in node.argnums or (left and m > n) or (not left and m < n):
        b_bar = _tri_solve(a, g, **transposed)
    if 0 in node.argnums:
        # the cotangent of op(dA), in the order JAX's JVP multiplies (cheaper side first)
        if left:
            op_bar = _mm(b_bar, _T(x)) if m > n else _tri_solve(a, _mm(g, _T(x)), **transposed)
        else:
            op_bar = _mm(_T(x), b_bar) if m < n else _tri_solve(a, _mm(_T(x), g), **transposed)
        op_bar = -op_bar
        op_bar = _conj(op_bar) if flags["conjugate_a"] else op_bar
        op_bar = _T(op_bar) if flags["transpose_a"] else op_bar
        k = 1 if flags["unit_diagonal"] else 0
        a_bar = jnp.tril(op_bar, -k) if lower else jnp.triu(op_bar, k)
    return [a_bar, b_bar]


triangular_solve_p = _register(
    jax_linalg.triangular_solve_p,
    ("left_side", "lower", "transpose_a", "conjugate_a", "unit_diagonal"),
    _triangular_solve_rule,
)


# --- lu ------------------------------------------------------------------------------
# P A = L U, packed in one (m, n) matrix. JVP (de Hoog, Anderssen and Lukas):
# with M = L^-1 P dA U^-1, d(packed) = L tril(M, -1) + triu(M) U. Transposed:
# M_bar = tril(T(L) G, -1) + triu(G T(U)), then the two solves transposed, then
# P's rows put back.


def _lu_factors(packed: Any) -> tuple[Any, Any]:
    """L (m, m), unit lower, and U (n, n), upper, from the packed (m, n) factor,
    the square blocks a wide or tall factor lacks filled with the identity."""
    m, n = shape_of(packed)[-2:]
    k = min(m, n)
    batch = [(0, 0)] * (len(shape_of(packed)) - 2)
    low = jnp.pad(jnp.tril(packed[..., :, :k], -1), [*batch, (0, 0), (0, m - k)])
    low = low + _eye(m, packed)
    up = jnp.pad(jnp.triu(packed[..., :k, :]), [*batch, (0, n - k), (0, 0)])
    up = up + _eye(n, packed, k)
    return low, up


def _inverse_permutation(perm: Any) -> Any:
    """The inverse of integer permutations along the last axis (never traced)."""
    perm = raw(perm)
    n = shape_of(perm)[-1]
    ids = jnp.broadcast_to(jnp.arange(n, dtype=perm.dtype), shape_of(perm))
    return jnp.put_along_axis(jnp.zeros_like(perm), perm, ids, axis=-1, inplace=False)


def _lu_rule(g: Any, node: Node) -> list[Any]:
    (a,), (packed, _, perm) = node.primals, node.ans
    g_packed = g[0] if isinstance(g, tuple) else g
    if g_packed is None:  # only the integer outputs were used
        return [zeros_like(a)]
    low, up = _lu_factors(packed)
    m_bar = jnp.tril(_mm(_T(low), g_packed), -1) + jnp.triu(_mm(g_packed, _T(up)))
    la_bar = _tri_solve(up, m_bar, left_side=False, lower=False, transpose_a=True)
    pa_bar = _tri_solve(
        low, la_bar, left_side=True, lower=True, transpose_a=True, unit_diagonal=True
    )
    inverse = _inverse_permutation(perm)
    return [jnp.take_along_axis(pa_bar, inverse[..., :, None], axis=-2)]


lu_p = _register(jax_linalg.lu_p, (), _lu_rule, multiple_results=True)
lu_pivots_to_permutation_p = _register(
    jax_linalg.lu_pivots_to_permutation_p, ("permutation_size",), None
)


# --- qr ------------------------------------------------------------------------------
# Thin QR (m >= n), JVP (Townsend): with C = T(Q) dA R^-1 and
# dO = tril(C, -1) - T(tril(C, -1)), dQ = Q (dO - C) + dA R^-1 and
# dR = (C - dO) R. A wide matrix [A1 A2] = Q [R1 R2] is the square QR of A1
# and R2 = T(Q) A2. The full Q of a tall matrix extends dQ (Roberts and
# Roberts, arXiv:2409.13374, eqs. 32-33).


def _thin_qr_vjp(q: Any, r: Any, q_bar: Any, r_bar: Any) -> Any:
    """The cotangent of A for the thin QR A = Q R (m >= n), real or complex.

    With Y = dA R^-1 and C = Q^H Y, JAX's JVP is dO = L - L^H + i Im(diag C)
    (L the strict lower triangle of C), dQ = Q (dO - C) + Y, dR = (C - dO) R;
    each step transposed (conj's transpose is conj, Re's a real part's).
    """
    c_direct = _mm(r_bar, _T(r)) - _mm(_T(q), q_bar)  # C's cotangent, C used directly
    o_bar = -c_direct  # the cotangent of dO
    c_bar = c_direct + jnp.tril(o_bar - _H(o_bar), -1)
    if _is_complex(q):  # dO's diagonal is i Im(diag C): its transpose keeps i Im
        c_bar = c_bar + _diag_matrix(_diag(o_bar) - jnp.real(_diag(o_bar)).astype(dtype_of(q)))
    dx_rinv_bar = q_bar + _mm(_conj(q), c_bar)
    return _tri_solve(r, dx_rinv_bar, left_side=False, lower=False, transpose_a=True)


def _qr_rule(g: Any, node: Node) -> list[Any]:
    (a,) = node.primals
    q, r, *pivots = node.ans
    q_bar, r_bar, *_ = _output_cotangents(g, node.ans)
    q_bar = zeros_like(q) if q_bar is None else q_bar
    r_bar = zeros_like(r) if r_bar is None else r_bar
    m, n = shape_of(a)[-2:]
    if m < n:
        # R2 = Q^H A2, so dR2 = dQ^H A2 + Q^H dA2: A2 gets conj(Q) R2_bar, and Q
        # gets conj(A2) R2_bar^H on top of its own
        a2, r2_bar = a[..., :, m:], r_bar[..., :, m:]
        q_bar = q_bar + _mm(_conj(a2), _H(r2_bar))
        a1_bar = _thin_qr_vjp(q, r[..., :, :m], q_bar, r_bar[..., :, :m])
        a_bar = jnp.concatenate([a1_bar, _mm(_conj(q), r2_bar)], axis=-1)
    elif node.params["full_matrices"] and m > n:
        q_bar_mn = _full_q_to_thin(q, q_bar, n)
        a_bar = _thin_qr_vjp(q[..., :, :n], r[..., :n, :n], q_bar_mn, r_bar[..., :n, :n])
    else:
        a_bar = _thin_qr_vjp(q, r, q_bar, r_bar)
    if node.params["pivoting"]:  # the JVP read dA's columns in pivot order
        inverse = _inverse_permutation(pivots[0])
        a_bar = jnp.take_along_axis(a_bar, inverse[..., None, :], axis=-1)
    return [a_bar]


def _full_q_to_thin(q: Any, q_bar: Any, n: int) -> Any:
    """The cotangent of the thin Q's first n columns, given the full Q's.

    The extra columns vary as dQ_mp = dQ_mn Z^H - (Q_mn + Q_mp Z) (dQ_pn - Z dQ_nn)^H
    with Z = Q_pn (Q_nn - I)^-1; this is its transpose.
    """
    q_mn, q_mp = q[..., :, :n], q[..., :, n:]
    q_nn, q_pn = q_mn[..., :n, :], q_mn[..., n:, :]
    z = _H(jnp.linalg.solve(_H(q_nn - _eye_like(q_nn)), _H(q_pn)))
    bar_mn, bar_mp = q_bar[..., :, :n], q_bar[..., :, n:]
    # the cotangent of D = dQ_pn - Z dQ_nn, which enters as D^H
    d_bar = -_mm(_H(bar_mp), _conj(q_mn + _mm(q_mp, z)))
    top = -_mm(_T(z), d_bar)
    return bar_mn + _mm(bar_mp, _conj(z)) + jnp.concatenate([top, d_bar], axis=-2)


qr_p = _register(
    jax_linalg.qr_p, ("full_matrices", "pivoting", "use_magma"), _qr_rule, multiple_results=True
)


# --- eigh ----------------------------------------------------------------------------
# A = V diag(w) V^H. JVP with M = V^H dA V: dw = Re(diag(M)), dV = V (F * M),
# F_ij = 1 / (w_j - w_i) off the diagonal (infinite for repeated eigenvalues,
# as in JAX), 0 on it. Transposed (a transpose, not an adjoint: V^H's
# transpose is conj(V), Re's a real cotangent as it is):
# A_bar = conj(V) (F * T(V) V_bar + diag(w_bar)) T(V); conj(V) = V when real.


def _eigh_rule(g: Any, node: Node) -> list[Any]:
    (a,), (v, w) = node.primals, node.ans
    n = shape_of(a)[-1]
    subset = node.params["subset_by_index"]
    if subset is not None and tuple(subset) != (0, n):
        raise NoVJPRuleError(
            "eigh", detail=f"subset_by_index={subset}: the derivative of a partial "
            "eigendecomposition is not defined (JAX's neither); use the full one",
        )  # fmt: skip
    if isinstance(a, core.Tracer):
        # differentiated again: JAX's JVP computes V and w from (A + A^H) / 2
        # (see `traced_impl` below), so their own derivative symmetrizes dA
        v, w = jax_linalg.eigh_p.bind(jax_linalg.symmetrize(a), **node.params)
    v_bar, w_bar = _output_cotangents(g, node.ans)
    inner = 0
    if v_bar is not None:
        eye = _eye_like(v)
        f = 1 / (eye + w[..., None, :] - w[..., :, None]) - eye
        inner = f * _mm(_T(v), v_bar)
    if w_bar is not None:
        inner = inner + _diag_matrix(w_bar)
    return [_mm(_conj(v), _mm(inner, _T(v)))]


eigh_p = _register(
    jax_linalg.eigh_p,
    ("lower", "sort_eigenvalues", "subset_by_index", "algorithm"),
    _eigh_rule,
    multiple_results=True,
)
# JAX's JVP of eigh decomposes the operand symmetrized, (A + A^H) / 2, where the
# primitive reads one triangle: the same matrix for the symmetrized operand of
# `jnp.linalg.eigh`, another for `symmetrize_input=False` on a matrix that is not
# symmetric, whose differentiated value and derivative are then those of the
# symmetrized one, under `jax.grad` and here.
eigh_p.traced_impl = lambda _, a, **p: jax_linalg.eigh_p.bind(jax_linalg.symmetrize(a), **p)


# --- svd -----------------------------------------------------------------------------
# A = U diag(s) Vt (thin). JVP with S = T(U) dA V: ds = diag(S),
# dU = U (F * (S s_j + T(S s_j)) + (S - T(S)) / 2 * diag(1/s)), dV = V (F * (s_i S + T(s_i S))),
# F_ij = 1 / (s_j^2 - s_i^2) off the diagonal; for a tall (wide) A, dU (dV)
# also gets the part of dA V (T(dA) U) outside U's (V's) span, over s.


def _svd_rule(g: Any, node: Node) -> list[Any]:
    (a,) = node.primals
    params = node.params
    m, n = shape_of(a)[-2:]
    if params["subset_by_index"] is not None and tuple(params["subset_by_index"]) != (0, min(m, n)):
        raise NoVJPRuleError("svd", detail="subset_by_index: a partial SVD is not differentiable")
    if params["compute_uv"] and params["full_matrices"] and m != n:
        raise NoVJPRuleError(
            "svd", detail="full_matrices=True for a non-square matrix (JAX has no rule either); "
            "use full_matrices=False",
        )  # fmt: skip
    cts = _output_cotangents(g, node.ans)
    s_bar = cts[0]
    if params["compute_uv"]:
        s, u, vt = node.ans
        u_bar, vt_bar = cts[1], cts[2]
    else:
        (s,) = node.ans
        s, u, vt = jax_linalg.svd_p.bind(
            a,
            full_matrices=False,
            compute_uv=True,
            subset_by_index=params["subset_by_index"],
            algorithm=params["algorithm"],
        )
        u_bar = vt_bar = None
    s_j = s[..., None, :]
    s_i = s[..., :, None]
    dtype = dtype_of(a)
    # S = U^H dA V enters every output; its cotangent is gathered in big_s_bar,
    # and A gets conj(U) big_s_bar conj(Vt) (U^H's transpose is conj(U))
    big_s_bar = 0 if s_bar is None else _diag_matrix(s_bar.astype(dtype))  # ds = Re diag(S)
    if u_bar is None and vt_bar is None:
        return [_mm(_conj(u), _mm(big_s_bar, _conj(vt)))]
    eye = _eye_like(u[..., :1, :])
    f = 1 / ((s_j + s_i) * (s_j - s_i) + eye) - eye
    zero = (s == 0).astype(s.dtype)
    s_inv = 1 / (s + zero) - zero
    if u_bar is not None:  # dU = U (F * (S s_j + (S s_j)^H) + (S - S^H) / 2 * diag(1/s))
        inner = _mm(_T(u), u_bar)
        p_bar = f * inner
        big_s_bar = big_s_bar + s_j * (p_bar + _H(p_bar))
        y = 0.5 * inner * _diag_matrix(s_inv)
        big_s_bar = big_s_bar + y - _H(y)
    if vt_bar is not None:  # Vt's tangent is dV^H, dV = V (F * (s_i S + (s_i S)^H))
        v_bar = _H(vt_bar)
        q_bar = f * _mm(_conj(vt), v_bar)
        big_s_bar = big_s_bar + s_i * (q_bar + _H(q_bar))
    a_bar = _mm(_conj(u), _mm(big_s_bar, _conj(vt)))
    if m > n and u_bar is not None:  # dU's part dA V outside U's span, over s
        r_bar = u_bar / s_j
        a_bar = a_bar + _mm(r_bar - _mm(_conj(u), _mm(_T(u), r_bar)), _conj(vt))
    if n > m and vt_bar is not None:  # dV's part dA^H U outside V's span, over s
        r_bar = v_bar / s_j
        a_bar = a_bar + _mm(_conj(u), _H(r_bar - _mm(_T(vt), _mm(_conj(vt), r_bar))))
    return [a_bar]


svd_p = _register(
    jax_linalg.svd_p,
    ("full_matrices", "compute_uv", "subset_by_index", "algorithm"),
    _svd_rule,
    multiple_results=True,
)


# --- eig ------------------------------------------------------------------------------------
# A V = V diag(w): dw = diag(V^-1 dA V) (complex w for real A). Transposed:
# A_bar = T(V^-1) diag(w_bar) T(V), its real part for a real A. Eigenvectors
# are differentiated only when asked to (`enable_eigvec_derivs=True`, as JAX
# requires): their JVP (nondegenerate perturbation theory, LAPACK's
# normalisation of each vector: unit norm, real largest component) is linear
# in dA, and its transpose is taken by chainrule's own reverse pass over it
# (`_eig_vectors_vjp`).


def _eig_rule(g: Any, node: Node) -> list[Any]:
    (a,) = node.primals
    params = node.params
    if params["compute_left_eigenvectors"] or params["compute_right_eigenvectors"]:
        return _eig_vectors_vjp(g, node)
    w_bar = g[0] if isinstance(g, tuple) else g
    _, v = jax_linalg.eig_p.bind(
        a,
        compute_left_eigenvectors=False,
        compute_right_eigenvectors=True,
        enable_eigvec_derivs=params["enable_eigvec_derivs"],
        implementation=params["implementation"],
    )
    a_bar = jnp.linalg.solve(_T(v), _mm(_diag_matrix(w_bar.astype(dtype_of(v))), _T(v)))
    return [a_bar if _is_complex(a) else jnp.real(a_bar).astype(dtype_of(a))]


def _eig_vector_tangents(w: Any, v: Any, da: Any) -> tuple[Any, Any]:
    """(dw, dv) for A v_j = w_j v_j at tangent dA, each v_j normalised by LAPACK
    to unit norm with its largest-magnitude component real (as JAX's JVP)."""
    eye = _eye_like(v)
    f = 1 / (eye + w[..., None, :] - w[..., :, None]) - eye
    p = _mm(jnp.linalg.solve(v, da), v)
    u = _mm(v, f * p)
    k = jnp.argmax(jnp.abs(v), axis=-2)
    mask = (jnp.arange(shape_of(v)[-2])[:, None] == k[..., None, :]).astype(dtype_of(v))
    c = lax.complex(
        -jnp.real(jnp.sum(jnp.conj(v) * u, axis=-2)),
        -jnp.imag(jnp.sum(mask * u, axis=-2)) / jnp.real(jnp.sum(mask * v, axis=-2)),
    )
    return _diag(p), u + v * c[..., None, :]


def _eig_vectors_vjp(g: Any, node: Node) -> list[Any]:
    (a,) = node.primals
    params = node.params
    if not params["enable_eigvec_derivs"]:
        raise NoVJPRuleError(
            "eig",
            detail="derivatives of non-symmetric eigenvectors are only valid under "
            "assumptions on the input that cannot be checked; pass "
            "enable_eigvec_derivs=True to jax.lax.linalg.eig to opt in (as JAX asks), "
            "differentiate the eigenvalues only (jnp.linalg.eigvals), or use eigh for "
            "symmetric matrices",
        )
    left, right = params["compute_left_eigenvectors"], params["compute_right_eigenvectors"]
    w, vl = node.ans[0], node.ans[1] if left else None
    if right:
        vr = node.ans[-1]
    else:  # the right eigenvectors enter the tangents of the others
        flags = dict(params, compute_left_eigenvectors=False, compute_right_eigenvectors=True)
        vr = jax_linalg.eig_p.bind(a, **flags)[1]

    def tangent_map(da: Any) -> list[Any]:  # linear in dA: its VJP is its transpose
        da = da.astype(dtype_of(vr))
        dw, dvr = _eig_vector_tangents(w, vr, da)
        out = [dw]
        if left:
            out.append(_eig_vector_tangents(jnp.conj(w), vl, _H(da))[1])
        if right:
            out.append(dvr)
        return out

    cts = _output_cotangents(g, node.ans)
    (a_bar,) = core.vjp_flat(tangent_map, [zeros_like(a)], cts)
    return [a_bar]


eig_p = _register(
    jax_linalg.eig_p,
    (
        "compute_left_eigenvectors",
        "compute_right_eigenvectors",
        "enable_eigvec_derivs",
        "implementation",
    ),
    _eig_rule,
    multiple_results=True,
)


# --- tridiagonal_solve -------------------------------------------------------------------
# X = T^-1 B for the tridiagonal T with sub-, main and super-diagonals dl, d, du
# (dl[0] and du[-1] unused). Linear in B: B_bar = T(T)^-1 G, the solve with
# the off-diagonals swapped. In the diagonals: dX = -T^-1 (dT X), so with
# Y = B_bar: d_bar = -sum(Y X), dl_bar[i] = -sum(Y[i] X[i-1]), du_bar[i] = -sum(Y[i] X[i+1]).


def _tridiagonal_solve_rule(g: Any, node: Node) -> list[Any]:
    dl, d, du, b = node.primals
    x = node.ans
    zero = jnp.zeros_like(d[..., :1])
    dl_t = jnp.concatenate([zero, du[..., :-1]], axis=-1)
    du_t = jnp.concatenate([dl[..., 1:], zero], axis=-1)
    y = jax_linalg.tridiagonal_solve_p.bind(dl_t, d, du_t, g, **node.params)
    minus_y = -y
    dl_bar = jnp.concatenate([zero, jnp.sum(minus_y[..., 1:, :] * x[..., :-1, :], -1)], -1)
    d_bar = jnp.sum(minus_y * x, -1)
    du_bar = jnp.concatenate([jnp.sum(minus_y[..., :-1, :] * x[..., 1:, :], -1), zero], -1)
    return [dl_bar, d_bar, du_bar, y]


tridiagonal_solve_p = _register(
    jax_linalg.tridiagonal_solve_p, ("perturb_singular",), _tridiagonal_solve_rule
)


# --- custom_linear_solve -----------------------------------------------------------------
# x = A^-1 b, A given by `matvec` (with its own operands), the solve by `solve`.
# b_bar = A^-T x_bar, by `transpose_solve` (the same primitive on the
# transposed jaxprs); matvec's operands get the VJP of p -> matvec(p, x) at
# -b_bar. As in JAX, the operands of the solvers themselves get zeros (the
# solve is taken to be exact), and aux outputs of `solve` carry no gradient.


def _linear_solve_impl(*args: Any, const_lengths: Any, jaxprs: Any) -> list[Any]:
    prim = jax_solves.linear_solve_p
    return prim.bind(*args, const_lengths=const_lengths, jaxprs=jaxprs)


class _LinearSolve(Primitive):
    def vjp(self, g: Any, node: Node) -> list[Any]:
        lengths, jaxprs = node.params["const_lengths"], node.params["jaxprs"]
        if jaxprs.transpose_solve is None:
            if core.backward_at_zero():  # forward mode needs no transpose_solve, as in JAX
                jvp = partial(_linear_solve_jvp, node.params, len(node.primals))
                cts = _output_cotangents(g, node.ans)
                return transposed_jvp(cts, node.primals, node.argnums, jvp, residuals=node.ans)
            raise NoVJPRuleError(
                "custom_linear_solve",
                detail="it has no transpose_solve; pass transpose_solve (or symmetric=True) "
                "to lax.custom_linear_solve for reverse-mode differentiation",
            )
        n_consts = sum(lengths)
        operands = node.primals[:n_consts]
        groups = _split(operands, lengths)
        n_b = len(node.primals) - n_consts
        x = node.ans[:n_b]
        x_bar = [
            zeros_like(o) if ct is None else ct
            for ct, o in zip(_output_cotangents(g, node.ans)[:n_b], x, strict=True)
        ]
        transposed = jaxprs.transpose()
        b_bar = jax_solves.linear_solve_p.bind(
            *[c for group in groups.transpose() for c in group],
            *x_bar,
            const_lengths=lengths.transpose(),
            jaxprs=transposed,
        )[:n_b]
        cts: list[Any] = [zeros_like(c) for c in operands] + list(b_bar)
        wanted = [i for i in node.argnums if i < lengths.matvec]
        if wanted:
            matvec = jaxprs.matvec

            def apply_matvec(*diff: Any) -> list[Any]:
                full = list(groups.matvec)
                for i, p in zip(wanted, diff, strict=True):
                    full[i] = p
                return jcore.eval_jaxpr(matvec.jaxpr, matvec.consts, *full, *x)

            minus_b = [-bb for bb in b_bar]
            params_bar = core.vjp_flat(apply_matvec, [operands[i] for i in wanted], minus_b)
            for i, ct in zip(wanted, params_bar, strict=True):
                cts[i] = ct
        return [cts[i] for i in node.argnums]


def _linear_solve_jvp(params, n, values: Sequence[Any], tangents: Sequence[Any]) -> list[Any]:
    """JAX's JVP of a linear solve: dx = A^-1 (db - dA x), dA x the tangent of
    matvec's operands at x (`core.jvp_flat`), by the same solve; the solvers'
    operands get none (the solve is taken to be exact), nor do aux outputs.
    (A `forward_only.Jvp`: `values` are the solve's `n` operands, then its outputs.)"""
    lengths, jaxprs = params["const_lengths"], params["jaxprs"]
    n_consts = sum(lengths)
    primals, ans, tangents = values[:n], values[n:], tangents[:n]
    operands, b = primals[:n_consts], primals[n_consts:]
    x = ans[: len(b)]
    rhs = [zeros_like(v) if t is None else t for v, t in zip(b, tangents[n_consts:], strict=True)]
    wanted = [i for i in range(lengths.matvec) if tangents[i] is not None]
    if wanted:
        matvec, groups = jaxprs.matvec, _split(operands, lengths)

        def apply_matvec(*diff: Any) -> list[Any]:
            full = list(groups.matvec)
            for i, p in zip(wanted, diff, strict=True):
                full[i] = p
            return jcore.eval_jaxpr(matvec.jaxpr, matvec.consts, *full, *x)

        _, moved = core.jvp_flat(
            apply_matvec, [operands[i] for i in wanted], [tangents[i] for i in wanted]
        )
        rhs = [r - m for r, m in zip(rhs, moved, strict=True)]
    dx = jax_solves.linear_solve_p.bind(*operands, *rhs, const_lengths=lengths, jaxprs=jaxprs)
    return list(dx[: len(b)]) + [zeros_like(o) for o in ans[len(b) :]]


def _split(operands: Sequence[Any], lengths: Any) -> Any:
    out, start = [], 0
    for k in lengths:
        out.append(list(operands[start : start + k]))
        start += k
    return type(lengths)(*out)


linear_solve_p = primitive(
    "custom_linear_solve",
    _linear_solve_impl,
    ("const_lengths", "jaxprs"),
    cls=_LinearSolve,
    multiple_results=True,
)
register_forward_only(
    "custom_linear_solve", lambda params: params["jaxprs"].transpose_solve is None
)
