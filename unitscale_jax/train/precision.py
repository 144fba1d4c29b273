"""``--precision``: the number-format policy a run trains with.

Each entry maps a name to the model's compute dtype and the ``unitscale_jax.precision``
policy the modules route their matmuls through (``TransformerConfig.dtype`` /
``precision``). Parameters and optimizer state stay float32 in every mode (mixed
precision). New modes (``fp16``, ``fp8-sim``, ``fp8``; their loss-scaling needs for SP) are
added here, in ``PRECISIONS``, and nowhere else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from unitscale_jax.train.errors import UsageError


@dataclasses.dataclass(frozen=True)
class PrecisionSetup:
    """What a ``--precision`` name sets on the model.

    Attributes:
      dtype: compute dtype of activations (``TransformerConfig.dtype``).
      policy: a ``unitscale_jax.precision.PrecisionPolicy`` or None (plain compute dtype).
    """

    dtype: str
    policy: Any = None


def _fp32() -> PrecisionSetup:
    return PrecisionSetup("float32", None)


def _bf16() -> PrecisionSetup:
    from unitscale_jax.precision import get_policy
    return PrecisionSetup("bfloat16", get_policy("bf16"))


PRECISIONS: dict[str, Callable[[], PrecisionSetup]] = {"fp32": _fp32, "bf16": _bf16}


def precision_setup(name: str) -> PrecisionSetup:
    """The ``PrecisionSetup`` of ``--precision name``.

    Raises:
      UsageError: unknown name.
    """
    if name not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}; got {name!r}.")
    return PRECISIONS[name]()


def policy_name(setup: PrecisionSetup) -> Optional[str]:
    return None if setup.policy is None else getattr(setup.policy, "name", str(setup.policy))
