"""Interop with other frameworks: share weights with PyTorch and compare a training step.

Importing this package never imports torch; functions that must run PyTorch
import it on first use and raise `TorchNotInstalledError` (with the install
command) when it is missing.

Parameters are a **flat dict keyed by torch names** (`module.state_dict()`'s
keys) with torch layouts (`Linear.weight` is `(out, in)`).

Examples:
  >>> import numpy as np
  >>> from chainrule.interop import compare_arrays
  >>> compare_arrays("grad", "0.bias", np.float32([1, 2]), np.float32([1, 2])).ok
  True
"""

from chainrule.interop._report import (
    TOLERANCES,
    Comparison,
    StepReport,
    compare_arrays,
    tolerance_for,
    ulp_distance,
)
from chainrule.interop.torch import (
    TORCH_PIN,
    StateDictMismatchError,
    TorchNotInstalledError,
    check_names_and_shapes,
    compare_step,
    import_torch,
    pytree_to_state_dict,
    state_dict_to_pytree,
)

__all__ = [
    "TOLERANCES",
    "TORCH_PIN",
    "Comparison",
    "StateDictMismatchError",
    "StepReport",
    "TorchNotInstalledError",
    "check_names_and_shapes",
    "compare_arrays",
    "compare_step",
    "import_torch",
    "pytree_to_state_dict",
    "state_dict_to_pytree",
    "tolerance_for",
    "ulp_distance",
]
