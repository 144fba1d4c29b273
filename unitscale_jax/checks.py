"""``unitscale_jax.checks``: the chex invariants of the optimizer transforms, by their short name.

They live with the optimizer (``unitscale_jax.optim.checks``); this module only re-exports
them, so ``from unitscale_jax import checks`` keeps working.
"""

from unitscale_jax.optim.checks import *  # noqa: F401,F403
from unitscale_jax.optim.checks import __all__  # noqa: F401
