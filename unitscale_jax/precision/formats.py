"""Floating-point number formats: FP8 (OCP and ``fnuz``), FP16, BF16 and FP32.

A format is described by its exponent and mantissa bits, its exponent bias and a variant that
says how the top of the exponent range is used (which decides the largest finite value):

- ``"ieee"``: the all-ones exponent encodes inf and NaN (FP16, BF16, FP32 and OCP E5M2).
  ``max = 2^emax * (2 - 2^-m)`` with ``emax = 2^e - 2 - bias``.
- ``"fn"`` (finite, NaN): no inf; only the all-ones exponent *and* mantissa encodes NaN
  (OCP E4M3, ``float8_e4m3fn``). ``max = 2^emax * (2 - 2^(1-m))`` with ``emax = 2^e - 1 - bias``.
- ``"fnuz"`` (finite, NaN, unsigned zero): no inf and no negative zero; the bit pattern of
  ``-0`` is the single NaN (Graphcore/AMD ``float8_e4m3fnuz``, ``float8_e5m2fnuz``).
  ``max = 2^emax * (2 - 2^-m)`` with ``emax = 2^e - 1 - bias``.

In every variant ``min_normal = 2^(1 - bias)`` and ``min_subnormal = 2^(1 - bias - m)``.

Sources: OCP "8-bit Floating Point Specification (OFP8)" rev. 1.0 (2023); Micikevicius et al.,
"FP8 Formats for Deep Learning" (arXiv 2209.05433); Noune et al., "8-bit Numerical Formats for
Deep Neural Networks" (arXiv 2206.02915); ``ml_dtypes`` for the ``fnuz`` encodings. The
reference library's ``unit_scaling.formats.FPFormat(4, 3)`` has max 240 and min normal 2^-7,
i.e. the range of ``E4M3_FNUZ``; its ``FPFormat(5, 2)`` has the range of ``E5M2_FNUZ``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Union

import jax.numpy as jnp
import numpy as np

Variant = Literal["ieee", "fn", "fnuz"]
_VARIANTS = ("ieee", "fn", "fnuz")


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """Description of a binary floating-point format (hashable: usable as a static argument).

    Attributes:
      name: short name, e.g. ``"e4m3fn"``.
      exponent_bits: number of exponent bits ``e`` (2..8).
      mantissa_bits: number of explicit mantissa (fraction) bits ``m`` (1..23).
      bias: exponent bias; the smallest normal is ``2^(1 - bias)``.
      variant: ``"ieee"``, ``"fn"`` or ``"fnuz"`` (see the module docstring).
      dtype: the JAX/``ml_dtypes`` dtype with exactly this encoding, or None for a format that
        can only be simulated. Used by real (non-simulated) casts.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    variant: Variant = "ieee"
    dtype: Optional[Any] = None

    def __post_init__(self):
        if self.variant not in _VARIANTS:
            raise ValueError(
                f"FloatFormat {self.name!r}: variant must be one of {_VARIANTS}, "
                f"got {self.variant!r}."
            )
        if not 2 <= self.exponent_bits <= 8:
            raise ValueError(
                f"FloatFormat {self.name!r}: exponent_bits must be in [2, 8] (it is simulated in "
                f"float32), got {self.exponent_bits}."
            )
        if not 1 <= self.mantissa_bits <= 23:
            raise ValueError(
                f"FloatFormat {self.name!r}: mantissa_bits must be in [1, 23], "
                f"got {self.mantissa_bits}."
            )
        if self.min_normal_exponent < -126 or self.max_exponent > 127:
            raise ValueError(
                f"FloatFormat {self.name!r}: exponent range [{self.min_normal_exponent}, "
                f"{self.max_exponent}] does not fit float32's [-126, 127]; choose another bias."
            )
        if self.dtype is not None:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    @property
    def bits(self) -> int:
        """Total storage bits: sign + exponent + mantissa."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite value."""
        reserved = 2 if self.variant == "ieee" else 1
        return 2**self.exponent_bits - reserved - self.bias

    @property
    def min_normal_exponent(self) -> int:
        """Unbiased exponent of the smallest normal value, ``1 - bias``."""
        return 1 - self.bias

    @property
    def max(self) -> float:
        """Largest finite value (the saturation value)."""
        top_ulps = 2 if self.variant == "fn" else 1  # fn: all-ones mantissa is NaN
        return float(2.0**self.max_exponent * (2.0 - top_ulps * 2.0**-self.mantissa_bits))

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, ``2^(1 - bias)``."""
        return float(2.0**self.min_normal_exponent)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive subnormal value, ``2^(1 - bias - m)``."""
        return float(2.0 ** (self.min_normal_exponent - self.mantissa_bits))

    @property
    def has_inf(self) -> bool:
        """Whether the format encodes infinities (only the ``"ieee"`` variant)."""
        return self.variant == "ieee"

    @property
    def has_nan(self) -> bool:
        """All variants here encode NaN."""
        return True

    @property
    def has_negative_zero(self) -> bool:
        """False for ``fnuz`` formats, whose ``-0`` bit pattern is NaN."""
        return self.variant != "fnuz"

    @property
    def is_float32(self) -> bool:
        """True for the float32 format itself (simulation is the identity)."""
        return ((self.exponent_bits, self.mantissa_bits, self.bias, self.variant)
                == (8, 23, 127, "ieee"))

    def __str__(self) -> str:
        return self.name


E4M3 = FloatFormat("e4m3fn", 4, 3, 7, "fn", jnp.float8_e4m3fn)
"""OCP FP8 E4M3 (``float8_e4m3fn``): max 448, min normal 2^-6, min subnormal 2^-9."""
E5M2 = FloatFormat("e5m2", 5, 2, 15, "ieee", jnp.float8_e5m2)
"""OCP FP8 E5M2 (``float8_e5m2``): max 57344, min normal 2^-14, min subnormal 2^-16, has inf."""
E4M3_FNUZ = FloatFormat("e4m3fnuz", 4, 3, 8, "fnuz", jnp.float8_e4m3fnuz)
"""``float8_e4m3fnuz``: max 240, min normal 2^-7, min subnormal 2^-10 (the reference's E4M3)."""
E5M2_FNUZ = FloatFormat("e5m2fnuz", 5, 2, 16, "fnuz", jnp.float8_e5m2fnuz)
"""``float8_e5m2fnuz``: max 57344, min normal 2^-15, min subnormal 2^-17."""
FP16 = FloatFormat("fp16", 5, 10, 15, "ieee", jnp.float16)
"""IEEE half precision: max 65504, min normal 2^-14, min subnormal 2^-24."""
BF16 = FloatFormat("bf16", 8, 7, 127, "ieee", jnp.bfloat16)
"""bfloat16: max ~3.39e38, min normal 2^-126, min subnormal 2^-133."""
FP32 = FloatFormat("fp32", 8, 23, 127, "ieee", jnp.float32)
"""IEEE single precision; simulating it is the identity."""

FORMATS = {f.name: f for f in (E4M3, E5M2, E4M3_FNUZ, E5M2_FNUZ, FP16, BF16, FP32)}
_ALIASES = {
    "float8_e4m3fn": "e4m3fn", "e4m3": "e4m3fn", "float8_e5m2": "e5m2",
    "float8_e4m3fnuz": "e4m3fnuz", "float8_e5m2fnuz": "e5m2fnuz",
    "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32",
}


def get_format(fmt: Union[str, FloatFormat, Any]) -> FloatFormat:
    """Returns a ``FloatFormat`` from a format, a name (``"e4m3fn"``, ``"float8_e5m2"``,
    ``"bf16"``, ...) or a dtype with a named format (``jnp.float8_e4m3fn``, ``jnp.bfloat16``)."""
    if isinstance(fmt, FloatFormat):
        return fmt
    if isinstance(fmt, str):
        key = _ALIASES.get(fmt.lower(), fmt.lower())
        if key in FORMATS:
            return FORMATS[key]
        raise ValueError(
            f"Unknown format name {fmt!r}; known: {sorted(FORMATS)} and aliases {sorted(_ALIASES)}."
        )
    try:
        dt = np.dtype(fmt)
    except TypeError:
        dt = None
    for f in FORMATS.values():
        if dt is not None and f.dtype == dt:
            return f
    raise TypeError(f"Cannot interpret {fmt!r} as a float format; pass a FloatFormat or a name.")
