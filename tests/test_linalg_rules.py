"""Matrix decompositions and solves (`rules/decompositions.py`) against `jax.vjp`.

Every primitive is checked with the oracle (`tests/oracle.py`): values,
first-order cotangents and second-order gradients, eagerly, under `jit` and
under `vmap`, on float64 (tolerances 1e-9, which the well-conditioned test
matrices allow: random matrices + n I, SPD ones A A^T + n I) and on float32
(tolerances that grow with the test matrix's condition number). Each
parameter JAX emits is varied; every case has a batch dimension of its own
(besides the oracle's vmap). Degenerate inputs (repeated eigenvalues and
singular values, singular and indefinite matrices) must give `jax.vjp`'s
numbers with its infinities and NaNs in the same places.

The `jnp.linalg` and `jax.scipy.linalg` functions a user calls are checked
the same way, each asserting that it emits the primitive it is meant to test.
"""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from jax import lax
from jax.lax import linalg as lax_linalg

import chainrule as cr
from tests.oracle import check_against_jax, emitted

F64 = dict(rtol=1e-9, atol=1e-9)
EAGER_JIT = ("eager", "jit")


def _random(seed: int, *shape: int, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _general(seed: int, *shape: int, dtype=np.float64) -> np.ndarray:
    """Random (..., n, n) matrices + n I: condition numbers of a few units."""
    n = shape[-1]
    return (_random(seed, *shape) + n * np.eye(n)).astype(dtype)


def _spd(seed: int, *shape: int, dtype=np.float64) -> np.ndarray:
    """Symmetric positive definite A A^T + n I."""
    a = _random(seed, *shape)
    return (a @ np.swapaxes(a, -1, -2) + shape[-1] * np.eye(shape[-1])).astype(dtype)


def _f32_tolerance(*matrices: np.ndarray) -> dict[str, float]:
    """float32 tolerance from the inputs' conditioning: second-order terms carry
    the condition number squared times float32's epsilon (with a margin of 100)."""
    kappa = max(float(np.max(np.linalg.cond(np.asarray(m, np.complex128)))) for m in matrices)
    tol = 100 * np.finfo(np.float32).eps * kappa**2
    return dict(rtol=tol, atol=tol)


FULL = pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)])


def _check_group(fun, *args, full: bool) -> None:
    """A function covering many variants at once: first order under jit in the
    default run (one compilation); every mode and second order when slow."""
    if full:
        check_against_jax(fun, *args, **F64)
    else:
        check_against_jax(fun, *args, modes=("jit",), second_order=False, **F64)


def _assert_emits(name: str, fun, *args) -> None:
    assert name in emitted(fun, *args), f"{fun} does not emit {name}"


# --- cholesky ------------------------------------------------------------------------------


def test_cholesky_batched_first_and_second_order():
    a = _spd(0, 2, 4, 4)
    fun = lambda a: lax_linalg.cholesky(a, symmetrize_input=False)  # noqa: E731
    _assert_emits("cholesky", fun, a)
    check_against_jax(fun, a, **F64)


def test_jnp_cholesky_float32():
    a = _spd(1, 3, 3, dtype=np.float32)
    check_against_jax(jnp.linalg.cholesky, a, modes=("jit",), **_f32_tolerance(a))


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**16), n=st.integers(1, 5))
def test_cholesky_property(seed, n):
    a = _spd(seed, n, n)
    check_against_jax(jnp.linalg.cholesky, a, modes=("jit",), **F64)


# --- triangular_solve -------------------------------------------------------------------------

FLAGS = list(itertools.product([True, False], repeat=4))  # left, lower, transpose_a, unit


def _every_triangular_solve(
    a, b_left6, b_left2, b_right6, b_right2, *, conjugate_a=False, both=True
):
    """Every flag combination on one batch of 4x4 matrices, as one function (one
    compilation). B has 6 or 2 columns (rows for right-side solves), so both
    orders of JAX's JVP are exercised: every shape for every combination with
    `both`, else one shape per combination, alternating so that each flag
    value meets both shapes on both sides."""
    out = []
    for left, lower, transpose_a, unit in FLAGS:
        bs = (b_left6, b_left2) if left else (b_right6, b_right2)
        if not both:
            bs = bs[lower ^ transpose_a ^ unit : (lower ^ transpose_a ^ unit) + 1]
        for b in bs:
            out.append(
                lax_linalg.triangular_solve(
                    a,
                    b,
                    left_side=left,
                    lower=lower,
                    transpose_a=transpose_a,
                    conjugate_a=conjugate_a,
                    unit_diagonal=unit,
                )
            )
    return out


def _triangular_operands(seed: int, dtype=np.float64):
    a = _general(seed, 2, 4, 4, dtype=dtype)
    b_left = (_random(seed + 1, 2, 4, 6, dtype=dtype), _random(seed + 2, 2, 4, 2, dtype=dtype))
    b_right = (_random(seed + 3, 2, 6, 4, dtype=dtype), _random(seed + 4, 2, 2, 4, dtype=dtype))
    return (a, *b_left, *b_right)


@FULL
def test_triangular_solve_every_flag(full):
    args = _triangular_operands(0)
    fun = lambda *args: _every_triangular_solve(*args, both=full)  # noqa: E731
    _assert_emits("triangular_solve", fun, *args)
    _check_group(fun, *args, full=full)


def test_triangular_solve_conjugate_a():
    """conjugate_a on real matrices: honoured (a no-op for real values)."""
    args = _triangular_operands(5)
    fun = lambda *args: _every_triangular_solve(*args, conjugate_a=True, both=False)  # noqa: E731
    check_against_jax(fun, *args, modes=("jit",), second_order=False, **F64)


def test_triangular_solve_eager_vmap_float32():
    a, _, b, _, _ = _triangular_operands(3)
    fun = lambda a, b: lax_linalg.triangular_solve(a, b, left_side=True, lower=True)  # noqa: E731
    check_against_jax(fun, a, b, **F64)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    check_against_jax(fun, a32, b32, modes=("jit",), **_f32_tolerance(np.tril(a)))


def test_solve_triangular_scipy():
    a, b = _general(8, 4, 4), _random(9, 4)
    fun = lambda a, b: jsl.solve_triangular(a, b, lower=False, trans="T")  # noqa: E731
    _assert_emits("triangular_solve", fun, a, b)
    check_against_jax(fun, a, b, modes=("jit",), **F64)


# --- lu ------------------------------------------------------------------------------------


@FULL
def test_lu_square_tall_wide_batched(full):
    shapes = [(2, 4, 4), (2, 5, 3), (2, 3, 5)]
    args = [_random(10 + i, *shape) for i, shape in enumerate(shapes)]
    fun = lambda *a: [lax_linalg.lu(x)[0] for x in a]  # noqa: E731
    _assert_emits("lu", fun, *args)
    _check_group(fun, *args, full=full)
    check_against_jax(lambda a: lax_linalg.lu(a)[0], args[0], modes=("eager",), **F64)


def test_lu_vmap_and_pivots_to_permutation():
    a = _general(11, 4, 4)
    lu_solve = lambda a, b: jsl.lu_solve(jsl.lu_factor(a), b)  # noqa: E731
    _assert_emits("lu_pivots_to_permutation", lu_solve, a, a[:, 0])
    check_against_jax(jsl.lu, a, modes=("vmap",), **F64)
    # the integer outputs pass through untouched, as in JAX
    got = cr.vjp(lambda a: lax_linalg.lu(a), a)[0]
    want = lax_linalg.lu(a)
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(g, w)


def test_lu_float32():
    a = _general(12, 4, 4, dtype=np.float32)
    check_against_jax(lambda a: lax_linalg.lu(a)[0], a, modes=("jit",), **_f32_tolerance(a))


# --- qr ------------------------------------------------------------------------------------


@FULL
def test_qr_tall_wide_square_complete_pivoted(full):
    args = [_random(15, 2, 5, 3), _random(16, 2, 3, 5), _random(17, 2, 4, 4)]

    def fun(tall, wide, square):
        return [
            jnp.linalg.qr(tall),
            jnp.linalg.qr(wide),
            jnp.linalg.qr(square),
            jnp.linalg.qr(tall, mode="complete"),
            jsl.qr(tall[0], pivoting=True)[:2],
            jsl.qr(wide[0], pivoting=True)[:2],
        ]

    _assert_emits("qr", fun, *args)
    _check_group(fun, *args, full=full)


def test_qr_all_modes_and_float32():
    a = _random(16, 5, 3)
    check_against_jax(jnp.linalg.qr, a, **F64)
    a32 = a.astype(np.float32)
    check_against_jax(jnp.linalg.qr, a32, modes=("jit",), **_f32_tolerance(a32))


def _complex(seed: int, *shape: int, dtype=np.complex128) -> np.ndarray:
    return (_random(seed, *shape) + 1j * _random(seed + 100, *shape)).astype(dtype)


SHAPES = {"tall": (2, 5, 3), "wide": (2, 3, 5), "square": (2, 4, 4)}


@FULL
def test_qr_of_complex_matrices(full):
    """Q^H for T(Q), and the i Im(diag) correction of JAX's dO: tall, wide and
    square, every mode and flag (complete, pivoted, r only), both orders,
    complex128 (first order under jit in the default run); complex64 under jit."""
    args = [_complex(40 + i, *shape) for i, shape in enumerate(SHAPES.values())]

    def fun(*mats):
        out = []
        for a in mats:
            out += [jnp.linalg.qr(a), jnp.linalg.qr(a, mode="r"), jsl.qr(a[0], pivoting=True)[:2]]
        return out, jnp.linalg.qr(mats[0], mode="complete")

    _assert_emits("qr", fun, *args)
    _check_group(fun, *args, full=full)
    a64 = args[0].astype(np.complex64)
    check_against_jax(jnp.linalg.qr, a64, modes=("jit",), **_f32_tolerance(a64))


@FULL
def test_svd_of_complex_matrices(full):
    """The transposed JVP with U^H, V^H and the (S - S^H)/2 diag(1/s) term that
    is zero for real matrices: tall, wide and square, random cotangents on s,
    U and Vt (both read the same primal outputs, so the solver's phases are
    the same for both), both orders, every mode (first order under jit in
    the default run); complex64 under jit."""
    args = [_complex(50 + i, *shape) for i, shape in enumerate(SHAPES.values())]

    def fun(*mats):
        return [
            (
                jnp.linalg.svd(a, full_matrices=False),
                jnp.linalg.svd(a, compute_uv=False),
                jnp.linalg.pinv(a),
                jnp.linalg.norm(a, "nuc", axis=(-2, -1)),
            )
            for a in mats
        ]

    _assert_emits("svd", fun, *args)
    _check_group(fun, *args, full=full)
    a64 = args[0].astype(np.complex64)
    s = np.linalg.svd(args[0], compute_uv=False)
    tol = 100 * np.finfo(np.float32).eps * (s[..., 0] / np.min(np.diff(-s, axis=-1))).max() ** 2
    fun = lambda a: jnp.linalg.svd(a, full_matrices=False)  # noqa: E731
    check_against_jax(fun, a64, modes=("jit",), rtol=tol, atol=tol)


def test_householder_product_is_refused_as_by_jax():
    """JAX has no derivative for householder_product; chainrule says so clearly."""
    a, taus = _random(18, 4, 3), _random(19, 3)
    fun = lambda a: jnp.sum(lax_linalg.householder_product(a, taus))  # noqa: E731
    with pytest.raises(NotImplementedError, match="householder_product"):
        cr.grad(fun)(a)


# --- eigh ----------------------------------------------------------------------------------


def test_eigh_batched():
    a = _spd(20, 2, 4, 4)
    _assert_emits("eigh", jnp.linalg.eigh, a)
    check_against_jax(jnp.linalg.eigh, a, **F64)


def test_eigvalsh_and_lower_false():
    a = _spd(21, 4, 4)
    fun = lambda a: (jnp.linalg.eigvalsh(a), jnp.linalg.eigh(a, UPLO="U"))  # noqa: E731
    assert "lower=False" in str(jax.make_jaxpr(fun)(a))
    check_against_jax(fun, a, modes=("jit",), **F64)


def test_eigh_of_a_complex_hermitian_matrix(dtype=np.complex128):
    """The rule with V^H for T(V): its transpose has conj(V) where the real one
    has V. Random cotangents on both outputs at first order; at second order
    functions that do not depend on the eigenvectors' phases (which the
    solver picks: derivatives along them are not defined), eagerly, under jit
    and vmap."""
    rng = np.random.default_rng(23)
    m = rng.normal(size=(3, 3)) + 1j * rng.normal(size=(3, 3))
    a = jnp.asarray(m + np.conj(np.swapaxes(m, -1, -2)), dtype)
    kw = F64
    check_against_jax(jnp.linalg.eigh, a, second_order=False, **kw)
    check_against_jax(
        lambda a: jnp.linalg.eigh(a, symmetrize_input=False)[1],
        a,
        second_order=False,
        modes=("eager",),
        **kw,
    )

    def phase_free(a):
        w, v = jnp.linalg.eigh(a)
        overlap = jnp.abs(jnp.einsum("...i,...i->...", v[..., :, 1], jnp.conj(v[..., :, 2])))
        return w**2, jnp.abs(v[..., 0, :]) ** 2 * w, overlap

    check_against_jax(phase_free, a, **kw)


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("lower", [True, False])
def test_eigh_of_a_matrix_that_is_not_symmetric(lower, dtype):
    """`eigh(a, symmetrize_input=False)` reads one triangle of `a`; JAX's JVP
    decomposes (A + A^H) / 2 instead, so under `jax.grad` the value and the
    derivative are those of the symmetrized matrix. chainrule's rule used the
    triangle's eigenvectors: gradients off by O(1) for a matrix that is not
    symmetric. Now the recorded eigh symmetrizes as JAX's JVP does (the
    primitive's `traced_impl`): values, gradients (second order for real
    matrices), `jax.jvp`'s tangents, eagerly, under jit and vmap."""
    rng = np.random.default_rng(25)
    a = rng.normal(size=(2, 4, 4))
    if dtype == np.complex128:
        a = a + 1j * rng.normal(size=(2, 4, 4))
    a = jnp.asarray(a, dtype)

    def f(a):
        return lax_linalg.eigh(a, lower=lower, symmetrize_input=False)

    real = dtype == np.float64
    check_against_jax(f, a, second_order=real, **F64)

    def loss(a):
        v, w = f(a)
        return jnp.sum(w * jnp.arange(4.0)) + jnp.sum(jnp.abs(v[..., 0, :]) ** 2 * w)

    for want, got in zip(jax.value_and_grad(loss)(a), cr.value_and_grad(loss)(a), strict=True):
        np.testing.assert_allclose(got, want, **F64)
    t = jnp.asarray(rng.normal(size=(2, 4, 4)), dtype)
    for want, got in zip(jax.jvp(f, (a,), (t,)), cr.jvp(f, (a,), (t,)), strict=True):
        jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, **F64), got, want)


def test_complex_eigh_under_strict_dtype_promotion():
    """The backward pass mixes real and complex values (eigh's real eigenvalue
    gaps times its complex eigenvectors) as JAX's own rules do: a user's
    jax_numpy_dtype_promotion='strict' is for their code, and jax.grad
    differentiates it (chainrule raised TypePromotionError). From JAX's
    eigh_test.testEighGrad, which runs under strict promotion."""
    rng = np.random.default_rng(24)
    m = rng.normal(size=(3, 3)) + 1j * rng.normal(size=(3, 3))
    a = jnp.asarray(m + np.conj(np.swapaxes(m, -1, -2)), np.complex128)

    def loss(a):  # free of the eigenvectors' phases
        w, v = jnp.linalg.eigh(a)
        return jnp.sum(w**3) + jnp.sum(jnp.abs(v[..., 0, :]) ** 2 * w)

    def second(t):  # real direction t, so second order is a real function
        return jnp.sum(jnp.abs(grad(loss)(a + t * a.T)) ** 2)

    batch = jnp.stack([a, 2 * a])
    with jax.numpy_dtype_promotion("strict"):
        for grad in (jax.grad, cr.grad):
            got = (
                grad(loss)(a),
                jax.jit(grad(loss))(a),
                jax.vmap(grad(loss))(batch),
                grad(second)(0.5),
                jax.jit(grad(second))(0.5),
            )
            if grad is jax.grad:
                want = got
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, **F64)


def test_eigh_float32():
    a = _spd(22, 4, 4, dtype=np.float32)
    w = np.linalg.eigvalsh(a.astype(np.float64))
    gap = np.min(np.diff(w))  # eigenvector derivatives scale with 1 / the eigengap
    tol = 100 * np.finfo(np.float32).eps * (np.max(np.abs(w)) / gap) ** 2
    check_against_jax(jnp.linalg.eigh, a, modes=("jit",), rtol=tol, atol=tol)


# --- svd -----------------------------------------------------------------------------------


@FULL
def test_svd_every_shape_and_flag(full):
    args = [_random(23, 2, 5, 3), _random(24, 2, 3, 5), _random(25, 2, 4, 4)]

    def fun(tall, wide, square):
        thin = [jnp.linalg.svd(a, full_matrices=False) for a in (tall, wide, square)]
        values = [jnp.linalg.svd(a, compute_uv=False) for a in (tall, wide)]
        return thin, values, jnp.linalg.svd(square, full_matrices=True)

    _assert_emits("svd", fun, *args)
    assert "compute_uv=False" in str(jax.make_jaxpr(fun)(*args))
    _check_group(fun, *args, full=full)


def test_svd_all_modes():
    check_against_jax(jnp.linalg.svd, _random(26, 3, 3), **F64)


def test_svd_full_matrices_non_square_is_refused_as_by_jax():
    a = _random(26, 5, 3)
    fun = lambda a: jnp.sum(jnp.linalg.svd(a, full_matrices=True)[0])  # noqa: E731
    with pytest.raises(NotImplementedError):
        jax.grad(fun)(a)
    with pytest.raises(NotImplementedError, match="full_matrices"):
        cr.grad(fun)(a)


def test_svd_float32():
    a = _random(27, 5, 3, dtype=np.float32)
    s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    tol = 100 * np.finfo(np.float32).eps * (s[0] / min(np.min(np.diff(-s)), s[-1])) ** 2
    fun = lambda a: jnp.linalg.svd(a, full_matrices=False)  # noqa: E731
    check_against_jax(fun, a, modes=("jit",), rtol=tol, atol=tol)


@FULL
def test_functions_built_on_svd(full):
    def fun(a):
        return (
            jnp.linalg.norm(a, 2),
            jnp.linalg.norm(a, "nuc"),
            jnp.linalg.pinv(a),
            jnp.linalg.lstsq(a, a[..., 0] + 1.0)[0],
        )

    a = _random(28, 5, 3)
    _assert_emits("svd", fun, a)
    _check_group(fun, a, full=full)


# --- eig -----------------------------------------------------------------------------------


def test_eigvals_first_order():
    """JAX differentiates eig's eigenvalues (complex) at first order only
    (unless eigenvector derivatives are enabled: below)."""
    a = _general(29, 4, 4)
    _assert_emits("eig", jnp.linalg.eigvals, a)
    check_against_jax(jnp.linalg.eigvals, a, second_order=False, **F64)


def test_eig_eigenvectors_are_refused_as_by_jax_unless_asked_for():
    a = _general(30, 3, 3)
    fun = lambda a: jnp.sum(jnp.abs(jnp.linalg.eig(a)[1]))  # noqa: E731
    with pytest.raises(NotImplementedError):
        jax.grad(fun)(a)
    with pytest.raises(NotImplementedError, match="enable_eigvec_derivs=True"):
        cr.grad(fun)(a)


@pytest.mark.parametrize("left, right", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_eig_eigenvectors_when_asked_for(left, right, dtype):
    """With `enable_eigvec_derivs=True` JAX differentiates eigenvectors (left,
    right, both: LAPACK's normalisation) and eigenvalues at second order;
    chainrule transposes the same JVP with its own reverse pass: both orders,
    eagerly, under jit and vmap, real and complex matrices."""
    a = _general(31, 2, 4, 4).astype(dtype)
    if dtype == np.complex128:
        a = a + 1j * _random(32, 2, 4, 4)

    def fun(a):
        return lax_linalg.eig(
            a,
            compute_left_eigenvectors=left,
            compute_right_eigenvectors=right,
            enable_eigvec_derivs=True,
        )

    check_against_jax(fun, a, rtol=1e-8, atol=1e-8)


# --- tridiagonal_solve ---------------------------------------------------------------------


def test_tridiagonal_solve_batched():
    dl, d, du = _random(31, 2, 5), 4.0 + _random(32, 2, 5), _random(33, 2, 5)
    b = _random(34, 2, 5, 3)
    fun = lax_linalg.tridiagonal_solve
    _assert_emits("tridiagonal_solve", fun, dl, d, du, b)
    check_against_jax(fun, dl, d, du, b, **F64)


def test_tridiagonal_solve_float32():
    diags = [_random(35, 5), 4.0 + _random(36, 5), _random(37, 5)]
    dl, d, du = (x.astype(np.float32) for x in diags)
    b = _random(38, 5, 2, dtype=np.float32)
    dense = np.diag(d) + np.diag(dl[1:], -1) + np.diag(du[:-1], 1)
    fun = lax_linalg.tridiagonal_solve
    check_against_jax(fun, dl, d, du, b, modes=("jit",), **_f32_tolerance(dense))


# --- custom_linear_solve and the solvers built on it ----------------------------------------


def _user_solve(a, b):
    """A custom_linear_solve whose matvec closes over the differentiated `a`."""
    return lax.custom_linear_solve(
        lambda x: a @ x,
        b,
        solve=lambda _, b: jnp.linalg.solve(a, b),
        transpose_solve=lambda _, b: jnp.linalg.solve(a.T, b),
    )


def test_custom_linear_solve():
    a, b = _general(39, 4, 4), _random(40, 4)
    _assert_emits("custom_linear_solve", _user_solve, a, b)
    check_against_jax(_user_solve, a, b, **F64)


def test_custom_linear_solve_without_transpose_solve_is_refused():
    a, b = _general(41, 3, 3), _random(42, 3)

    def fun(a, b):
        x = lax.custom_linear_solve(lambda x: a @ x, b, solve=lambda _, b: jnp.linalg.solve(a, b))
        return jnp.sum(x)

    with pytest.raises(TypeError):
        jax.grad(fun)(a, b)
    with pytest.raises(NotImplementedError, match="transpose_solve"):
        cr.grad(fun)(a, b)


def test_custom_linear_solve_without_transpose_solve_in_forward_mode():
    """Forward mode needs no transpose_solve (dx = A^-1 (db - dA x)), in JAX or
    here: jvp eagerly and under jit and vmap, jacfwd, jacfwd of jacfwd."""
    a, b = _general(43, 3, 3), _random(44, 3)
    ta, tb = _random(45, 3, 3), _random(46, 3)

    def fun(a, b):
        solve = lambda _, b: lax.stop_gradient(jnp.linalg.solve(a, b))  # noqa: E731
        return jnp.sum(lax.custom_linear_solve(lambda x: a @ x, b, solve=solve) ** 2)

    want = jax.jvp(fun, (a, b), (ta, tb))
    for got in (
        cr.jvp(fun, (a, b), (ta, tb)),
        jax.jit(lambda a, b: cr.jvp(fun, (a, b), (ta, tb)))(a, b),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    tbs = np.stack([tb, 2 * tb])
    batched = jax.vmap(lambda t: cr.jvp(fun, (a, b), (ta, t))[1])(tbs)
    np.testing.assert_allclose(batched, jax.vmap(lambda t: jax.jvp(fun, (a, b), (ta, t))[1])(tbs))
    for got, want in zip(cr.jacfwd(fun, (0, 1))(a, b), jax.jacfwd(fun, (0, 1))(a, b), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(
        cr.jacfwd(cr.jacfwd(fun))(a, b), jax.jacfwd(jax.jacfwd(fun))(a, b), rtol=1e-10
    )


@FULL
def test_jnp_linalg_functions(full):
    def fun(a, b, spd, a5, a3):
        return (
            jnp.linalg.solve(a, b),
            jnp.linalg.inv(a),
            jnp.linalg.slogdet(a5)[1],
            jnp.linalg.det(a3),  # 3x3: a closed form (larger ones need cumprod, not ours)
            jnp.linalg.matrix_power(a, 3),
            jsl.cho_solve(jsl.cho_factor(spd), b),
            jsl.lu_solve(jsl.lu_factor(a), b),
        )

    args = (
        _general(43, 2, 4, 4),
        _random(44, 2, 4, 2),
        _spd(45, 2, 4, 4),
        _general(46, 5, 5),
        _general(47, 3, 3),
    )
    _check_group(fun, *args, full=full)


def test_solve_all_modes_float32():
    a, b = _general(51, 4, 4, dtype=np.float32), _random(52, 4, dtype=np.float32)
    check_against_jax(jnp.linalg.solve, a, b, **_f32_tolerance(a))


def test_rules_promote_no_ranks():
    """The rules' batched formulas pass JAX's strict rank-promotion mode."""
    a = _spd(53, 2, 3, 3)

    def fun(a):
        svd = jnp.linalg.svd(a, full_matrices=False)
        return jnp.linalg.cholesky(a), jnp.linalg.eigh(a), lax_linalg.lu(a)[0], svd

    with jax.numpy_rank_promotion("raise"):
        check_against_jax(fun, a, modes=("jit",), **F64)


# --- degenerate inputs: JAX's numbers, infinities and NaNs in the same places ----------------


def _same_as_jax_vjp(fun, *args, second_order: bool = True) -> None:
    """chainrule's output and cotangents (a ones cotangent) equal jax.vjp's,
    NaN for NaN and inf for inf; with second_order the same for the gradient of
    the cotangents' sum."""
    args = tuple(jnp.asarray(a) for a in args)
    want_out, want_vjp = jax.vjp(fun, *args)
    got_out, got_vjp = cr.vjp(fun, *args)
    ct = jax.tree_util.tree_map(jnp.ones_like, want_out)
    pairs = [(got_out, want_out), (got_vjp(ct), want_vjp(ct))]
    if second_order:

        def total(vjp):
            return lambda *a: sum(jnp.sum(c) for c in vjp(fun, *a)[1](ct))

        pairs.append((cr.grad(total(cr.vjp))(*args), jax.grad(total(jax.vjp))(*args)))
    for got, want in pairs:
        leaves = jax.tree_util.tree_leaves
        for g, w in zip(leaves(got), leaves(want), strict=True):
            g, w = np.asarray(g), np.asarray(w)
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
            np.testing.assert_array_equal(np.isinf(g), np.isinf(w))
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9, equal_nan=True)


def _repeated_eigenvalues() -> np.ndarray:
    q, _ = np.linalg.qr(_random(60, 4, 4))
    return q @ np.diag([1.0, 2.0, 2.0, 3.0]) @ q.T


def test_degenerate_eigh_repeated_eigenvalues():
    a = _repeated_eigenvalues()
    _same_as_jax_vjp(jnp.linalg.eigh, a, second_order=False)
    _same_as_jax_vjp(jnp.linalg.eigvalsh, a)  # eigenvalues alone stay finite
    out, vjp_fn = cr.vjp(jnp.linalg.eigh, a)
    (got,) = vjp_fn(jax.tree_util.tree_map(jnp.ones_like, out))
    assert np.max(np.abs(got)) > 1e10, "eigenvalues equal to rounding: 1 / their gap, not zeroed"


def test_degenerate_eigh_identity():
    _same_as_jax_vjp(jnp.linalg.eigh, np.eye(3), second_order=False)
    out, vjp_fn = cr.vjp(jnp.linalg.eigh, np.eye(3))
    (got,) = vjp_fn(jax.tree_util.tree_map(jnp.ones_like, out))
    assert not np.all(np.isfinite(got)), "exactly repeated eigenvalues: JAX's inf/NaN, no zeros"


def test_degenerate_svd_rank_deficient():
    a = _random(61, 4, 2) @ _random(62, 2, 3)  # rank 2, one zero singular value
    _same_as_jax_vjp(lambda a: jnp.linalg.svd(a, full_matrices=False), a, second_order=False)
    _same_as_jax_vjp(lambda a: jnp.linalg.svd(a, compute_uv=False), a, second_order=False)
    _same_as_jax_vjp(jnp.linalg.pinv, np.diag([1.0, 1.0, 0.0]), second_order=False)


def test_degenerate_norm2_repeated_singular_value():
    _same_as_jax_vjp(lambda a: jnp.linalg.norm(a, 2), np.eye(3))
    _same_as_jax_vjp(lambda a: jnp.linalg.norm(a, "nuc"), np.eye(3))


def test_degenerate_cholesky_indefinite():
    a = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    _same_as_jax_vjp(jnp.linalg.cholesky, a)
    assert np.all(np.isnan(cr.grad(lambda a: jnp.sum(jnp.linalg.cholesky(a)))(a)))


def test_degenerate_singular_solves():
    singular = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]])
    b = np.array([1.0, 2.0, 3.0])
    _same_as_jax_vjp(jnp.linalg.solve, singular, b, second_order=False)
    _same_as_jax_vjp(jnp.linalg.inv, singular, second_order=False)
    _same_as_jax_vjp(lambda a: lax_linalg.lu(a)[0], singular)
    zero_pivot = np.triu(_general(63, 3, 3))
    zero_pivot[1, 1] = 0.0
    fun = lambda a, b: jsl.solve_triangular(a, b, lower=False)  # noqa: E731
    _same_as_jax_vjp(fun, zero_pivot, b, second_order=False)


def test_degenerate_qr_rank_deficient():
    a = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])  # R[1, 1] = 0
    _same_as_jax_vjp(jnp.linalg.qr, a, second_order=False)


def test_det_above_three_by_three_and_expm_through_the_other_families():
    """`det` (n > 3) goes through cumprod, `expm` through scan: rules of other families."""
    a = jax.random.normal(jax.random.PRNGKey(0), (5, 5)) + 5 * jnp.eye(5)
    for f in (jnp.linalg.det, lambda a: jnp.sum(jax.scipy.linalg.expm(a * 0.1))):
        np.testing.assert_allclose(cr.grad(f)(a), jax.grad(f)(a), rtol=1e-9)


@pytest.mark.parametrize(
    "operands, preferred",
    [(np.float64, np.float32), (np.float32, np.float64), (np.float32, np.float32)],
)
def test_dot_general_with_a_preferred_element_type_on_the_host_is_xlas(operands, preferred):
    """A narrower result type (float64 operands, float32 result) is XLA's
    product rounded once: the operands are not rounded first. A wider one
    converts the operands. Eagerly (on the host), under jit, and the VJP."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 7)), operands)
    y = jnp.asarray(rng.normal(size=(7, 3)), operands)

    def f(x, y):
        return lax.dot_general(x, y, (((1,), (0,)), ((), ())), preferred_element_type=preferred)

    want, want_vjp = jax.vjp(f, x, y)
    ct = jnp.asarray(rng.normal(size=want.shape), want.dtype)
    for got in (cr.vjp(f, x, y)[0], jax.jit(lambda x, y: cr.vjp(f, x, y)[0])(x, y)):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=2e-7 if preferred == np.float32 else 1e-14)
    got_cts = cr.vjp(f, x, y)[1](ct)
    for g, w in zip(got_cts, want_vjp(ct), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-6)
