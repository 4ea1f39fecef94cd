"""Issue 15's Gaussian-process example: the marginal log-likelihood through
`cholesky`, `triangular_solve` and the log-determinant gives `jax.grad`'s
gradients eagerly and under `jit`, and the README's fit with optax under
`jit` runs and lands where the same fit with `jax.grad` lands.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import chainrule as cr
from tests.oracle import emitted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_example() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Example: Gaussian-process regression", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def example() -> dict:
    """The README's block, run as written (300 jitted optax steps with cr)."""
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md (GP example)", "exec"), namespace)
    return namespace


def _problem(example, dtype):
    params = {
        k: jnp.asarray(v, dtype)
        for k, v in {"log_length": 0.5, "log_amplitude": 0.0, "log_noise": -1.0}.items()
    }
    return params, example["x"].astype(dtype), example["y"].astype(dtype)


def test_the_likelihood_emits_the_linear_algebra(example):
    params, x, y = _problem(example, jnp.float64)
    names = emitted(example["neg_log_marginal_likelihood"], params, x, y)
    assert {"cholesky", "triangular_solve", "log"} <= names


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-10), (jnp.float32, 2e-4)])
def test_gradients_are_jax_grads_eager_and_jit(example, dtype, tol):
    nll = example["neg_log_marginal_likelihood"]
    params, x, y = _problem(example, dtype)
    want = jax.grad(nll)(params, x, y)
    for got in (cr.grad(nll)(params, x, y), jax.jit(cr.grad(nll))(params, x, y)):
        for k in want:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=k)


def test_second_order_matches_jax(example):
    """The Hessian-vector product through the likelihood (rules of rules)."""
    nll = example["neg_log_marginal_likelihood"]
    params, x, y = _problem(example, jnp.float64)

    def hvp(grad):
        return grad(lambda p: sum(jnp.sum(g) for g in grad(nll)(p, x, y).values()))(params)

    got, want = hvp(cr.grad), hvp(jax.grad)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-9, err_msg=k)


def test_readme_fit_runs_and_matches_a_jax_grad_fit(example):
    nll, x, y = example["neg_log_marginal_likelihood"], example["x"], example["y"]
    params, _, _ = _problem(example, x.dtype)
    start = nll(params, x, y)
    optimizer = optax.adam(0.05)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(nll)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    for _ in range(300):
        params, opt_state, _ = step(params, opt_state)
    fitted = example["params"]
    assert nll(fitted, x, y) < start - 1.0, "the fit did not lower the negative log-likelihood"
    for k in params:
        np.testing.assert_allclose(fitted[k], params[k], rtol=1e-8, atol=1e-8, err_msg=k)
