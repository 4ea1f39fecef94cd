"""Test configuration: float64 available everywhere, strict JAX, repo root importable."""

import os
import sys

import jax

# Tests compare in float64 (rtol 1e-12) and in float32 with explicit dtypes.
jax.config.update("jax_enable_x64", True)
# Matmuls at full precision on every backend, so oracles agree to tolerance.
jax.config.update("jax_default_matmul_precision", "highest")

# `compare/` and `benchmarks/` are top-level folders, not installed packages.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
