"""Low-precision number formats for unit-scaled training (``unitscale_jax.precision``).

- ``formats``: ``FloatFormat`` and the named formats ``E4M3`` (OCP ``float8_e4m3fn``),
  ``E5M2`` (OCP ``float8_e5m2``), ``E4M3_FNUZ``, ``E5M2_FNUZ``, ``FP16``, ``BF16``, ``FP32``.
- ``simulate(x, fmt, rounding=..., rng=...)``: bit-exact rounding to a format (saturating).
- ``quantise_fwd`` / ``quantise_bwd`` / ``quantise``: the format on the value or the gradient.
- ``fp8_dot``: real float8 matmul with static per-tensor scales, float8 backward matmuls too.
- ``PrecisionPolicy`` / ``get_policy``: what the modules call at their matmuls.
- ``format_stats``: underflow / saturation fractions of a tensor for a format.
"""

from unitscale_jax.precision.formats import (
    BF16,
    E4M3,
    E4M3_FNUZ,
    E5M2,
    E5M2_FNUZ,
    FORMATS,
    FP16,
    FP32,
    FloatFormat,
    get_format,
)
from unitscale_jax.precision.fp8 import cast_scaled, fp8_dot
from unitscale_jax.precision.policy import (
    ATTENTION_ROLES,
    MATMUL_ROLES,
    PRESETS,
    ROLES,
    UMUP_LARGE_RUN_OVERRIDES,
    Override,
    PrecisionPolicy,
    get_policy,
)
from unitscale_jax.precision.quantise import quantise, quantise_bwd, quantise_fwd
from unitscale_jax.precision.simulate import ROUNDINGS, simulate
from unitscale_jax.precision.stats import (
    FormatStats,
    format_stats,
    saturation_fraction,
    tree_format_stats,
    underflow_fraction,
)

__all__ = [
    "ATTENTION_ROLES", "BF16", "E4M3", "E4M3_FNUZ", "E5M2", "E5M2_FNUZ", "FORMATS", "FP16",
    "FP32", "FloatFormat", "FormatStats", "MATMUL_ROLES", "Override", "PRESETS",
    "PrecisionPolicy", "ROLES", "ROUNDINGS", "UMUP_LARGE_RUN_OVERRIDES", "cast_scaled",
    "format_stats", "fp8_dot", "get_format", "get_policy", "quantise", "quantise_bwd",
    "quantise_fwd", "saturation_fraction", "simulate", "tree_format_stats", "underflow_fraction",
]
