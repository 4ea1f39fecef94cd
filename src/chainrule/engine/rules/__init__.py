"""The primitive table, one module per family of primitives.

Each entry mirrors one `jax.lax` primitive and has an implementation (a
public `jax.lax` call on untraced values), optionally a NumPy version for
concrete host values, and its VJP makers, written right below it, one per
argument, in the form `(ans, *primals, **params) -> (g -> cotangent)`.

The rules are written with the traced ops of these modules (`mul`, `neg`,
`reduce_sum`, ...), never with `jax.numpy`, so a backward pass run on Tracers
is itself recorded and can be differentiated again (higher order).

The families import one way: `registry` <- `shape` <- `elementwise` <-
`indexing`, `reductions`, `linalg`, `special` <- `calls` <- `loops` (scan,
while); `opening` (a body's custom_vjp calls as `fwd`, for the transform
outside) <- `calls`, `loops`, `remat`; `sorting` (sort, top_k);
`convolution` (convolutions, on `shape`) <-
`windows` (pooling: windowed reductions, on `indexing` too);
`decompositions` (matrix factorizations and solves); `fft` (Fourier
transforms, on `shape`, `elementwise` and `indexing`); `calls` <- `sparse`
(`jax.experimental.sparse`'s primitives, through JAX's implementations of
them); `calls` <- `effects`
(random numbers, bits, placement, printing and callbacks) <- `remat`
(`jax.checkpoint`), `collectives` (`jax.shard_map` and its collectives);
`calls` <- `foreign` (other libraries' primitives, by the rules they
register with JAX; it adds nothing to the table). A
new rule goes into the module of its family; `PRIMITIVES` (in `registry`) is
the whole table, and `python -m chainrule.engine.rules` prints it by family.
"""

from chainrule.engine.rules.calls import *  # noqa: F403
from chainrule.engine.rules.collectives import *  # noqa: F403
from chainrule.engine.rules.convolution import *  # noqa: F403
from chainrule.engine.rules.decompositions import *  # noqa: F403
from chainrule.engine.rules.effects import *  # noqa: F403
from chainrule.engine.rules.elementwise import *  # noqa: F403
from chainrule.engine.rules.fft import *  # noqa: F403
from chainrule.engine.rules.foreign import *  # noqa: F403
from chainrule.engine.rules.indexing import *  # noqa: F403
from chainrule.engine.rules.linalg import *  # noqa: F403
from chainrule.engine.rules.loops import *  # noqa: F403
from chainrule.engine.rules.reductions import *  # noqa: F403
from chainrule.engine.rules.registry import *  # noqa: F403
from chainrule.engine.rules.remat import *  # noqa: F403
from chainrule.engine.rules.shape import *  # noqa: F403
from chainrule.engine.rules.sorting import *  # noqa: F403
from chainrule.engine.rules.sparse import *  # noqa: F403
from chainrule.engine.rules.special import *  # noqa: F403
from chainrule.engine.rules.windows import *  # noqa: F403
