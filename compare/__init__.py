"""chainrule's cross-framework comparison suite: every tutorial number, proved against PyTorch.

Run `python -m compare` from the repository root (see `compare/README.md`).
This is a verification suite, not a library: importing it enables JAX's
float64 and pins matmul precision to "highest", as the comparisons require.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")
