"""Bit-exact simulation of a narrower float format inside float32.

``simulate(x, fmt)`` returns ``x`` rounded to the values ``fmt`` can represent, still stored
in ``x``'s dtype. All rounding is done on the float32 bit pattern with integer arithmetic, so
the result does not depend on the platform's denormal (flush-to-zero) mode.

Method (the reference library's ``FPFormat.quantise`` rounds the same way: add an offset to the
bit pattern and mask the dropped mantissa bits; here subnormals are handled exactly too):

1. ``|x|`` is clipped to ``fmt.max`` (saturation: overflow never gives inf or NaN).
2. Values in ``fmt``'s normal range keep ``m`` of float32's 23 mantissa bits: the low
   ``23 - m`` bits are dropped after adding ``2^(22-m) - 1 + lsb`` (round to nearest, ties to
   even) or a uniform random integer in ``[0, 2^(23-m))`` (stochastic rounding). A carry out
   of the mantissa moves to the next binade, which is the correct neighbour.
3. Values below ``fmt.min_normal`` are multiples ``k`` of ``fmt.min_subnormal``: ``k`` is
   rounded from the 24-bit significand with the same rule, then ``k * min_subnormal``.
   (For formats with float32's exponent range, e.g. bf16, step 2 already covers subnormals,
   since float32 denormal bit patterns are linear in value.)
4. NaN and +-inf inputs are returned unchanged (they are not overflow). ``fnuz`` formats
   have no negative zero, so values that round to zero become +0.

Stochastic rounding rounds up with probability equal to the distance to the lower
neighbour in units of the spacing, so ``E[simulate(x)] = x`` (exactly for normal values;
to 2^-24 of the spacing for subnormal ones, whose fraction is truncated to 24 bits).
"""

from __future__ import annotations

import functools
from typing import Literal, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from unitscale_jax.precision.formats import FloatFormat, get_format

Rounding = Literal["nearest", "stochastic"]
ROUNDINGS = ("nearest", "stochastic")

_SIGN = np.uint32(0x80000000)
_ABS = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)


def _f32_bits(value: float) -> np.uint32:
    return np.array(value, np.float32).view(np.uint32)


def check_float_input(x, op: str) -> jax.Array:
    """Returns ``x`` as an array, raising a clear error unless it is float16/bfloat16/float32."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{op}: expects a floating-point array, got dtype {x.dtype}.")
    if x.dtype.itemsize > 4:
        raise TypeError(
            f"{op}: {x.dtype} input is not supported (rounding happens in float32); "
            f"cast to float32 first."
        )
    return x


def check_rounding(rounding: str, rng, op: str) -> None:
    """Validates a rounding mode and its random key."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"{op}: rounding must be one of {ROUNDINGS}, got {rounding!r}.")
    if rounding == "stochastic" and rng is None:
        raise ValueError(f"{op}: rounding='stochastic' needs rng=jax.random.key(...).")
    if rounding == "nearest" and rng is not None:
        raise ValueError(f"{op}: rng is only used with rounding='stochastic'; drop it or switch.")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _simulate(x, fmt, rounding, rng):
    return _round(x, fmt, rounding, rng)


@_simulate.defjvp
def _simulate_jvp(fmt, rounding, primals, tangents):
    raise TypeError(
        "simulate() is not differentiable (rounding has zero gradient almost everywhere). "
        "Use quantise_fwd (straight-through gradient) or quantise_bwd (rounds the gradient), "
        "or apply jax.lax.stop_gradient to its input."
    )


def simulate(
    x: jax.Array,
    fmt: Union[FloatFormat, str],
    *,
    rounding: Rounding = "nearest",
    rng: Optional[jax.Array] = None,
) -> jax.Array:
    """Rounds ``x`` to the representable values of ``fmt``, keeping ``x``'s dtype.

    Round to nearest (ties to even) gives bit-for-bit the value of ``ml_dtypes``'s cast
    ``x.astype(fmt.dtype)`` for every ``x`` within ``[-fmt.max, fmt.max]``; outside it the
    result saturates to ``+-fmt.max`` where a cast would give NaN or inf. Values at most half
    the smallest subnormal flush to zero. Not differentiable (differentiating it raises):
    use ``quantise_fwd`` / ``quantise_bwd`` inside models.

    Args:
      x: float32, bfloat16 or float16 array. The result is cast back to ``x.dtype``, which is
        exact when ``fmt`` is narrower than ``x.dtype`` (every FP8 format fits in bf16 and in
        fp16). FP16's max 65504 is not a bf16 value: simulating FP16 on bf16 input rounds it
        to 65536.
      fmt: a ``FloatFormat`` or its name. ``FP32`` returns ``x`` unchanged.
      rounding: ``"nearest"`` (ties to even) or ``"stochastic"``.
      rng: a ``jax.random`` key; required for (and only for) stochastic rounding.

    Returns:
      An array of ``x``'s shape and dtype whose values lie on ``fmt``'s grid (or are NaN/inf
      where ``x`` was).
    """
    fmt = get_format(fmt)
    x = check_float_input(x, "simulate")
    check_rounding(rounding, rng, "simulate")
    if fmt.is_float32:
        return x
    return _simulate(x, fmt, rounding, rng)


@functools.partial(jax.jit, static_argnums=(1, 2))  # one fused kernel, also when called eagerly
def _round(x, fmt: FloatFormat, rounding: str, rng) -> jax.Array:
    m = fmt.mantissa_bits
    shift = 23 - m
    stochastic = rounding == "stochastic"

    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    sign = bits & _SIGN
    a = bits & _ABS
    nonfinite = a >= _INF
    a = jnp.minimum(a, _f32_bits(fmt.max))  # saturate; also maps inf/NaN to max (restored below)
    rand = jax.random.bits(rng, x.shape, jnp.uint32) if stochastic else None

    # Normal range of fmt: drop the low `shift` mantissa bits of the float32 pattern.
    if shift == 0:
        out = a
    else:
        drop = np.uint32((1 << shift) - 1)
        if stochastic:
            offset = rand >> np.uint32(32 - shift)
        else:
            offset = np.uint32((1 << (shift - 1)) - 1) + ((a >> np.uint32(shift)) & np.uint32(1))
        out = (a + offset) & ~drop

    # Subnormal range of fmt (only where it is above float32's own denormal range).
    if fmt.min_normal_exponent > -126:
        exp_b = a >> np.uint32(23)
        sig = (a & np.uint32(0x7FFFFF)) | jnp.where(exp_b > 0, np.uint32(0x800000), np.uint32(0))
        # k = |x| / min_subnormal = sig * 2^-s
        s = (150 + fmt.min_normal_exponent - m) - jnp.maximum(exp_b, np.uint32(1)).astype(jnp.int32)
        s = jnp.maximum(s, 1)
        if stochastic:
            frac_bits = jnp.minimum(s, 24)  # keep at most 24 fraction bits of k
            t = sig >> jnp.minimum(s - frac_bits, 31).astype(jnp.uint32)
            k = (t + (rand >> (32 - frac_bits).astype(jnp.uint32))) >> frac_bits.astype(jnp.uint32)
        else:
            sc = jnp.minimum(s, 26).astype(jnp.uint32)  # s >= 25 already rounds to 0
            half = (np.uint32(1) << (sc - np.uint32(1))) - np.uint32(1)
            k = (sig + half + ((sig >> sc) & np.uint32(1))) >> sc
        sub = jax.lax.bitcast_convert_type(
            k.astype(jnp.float32) * np.float32(fmt.min_subnormal), jnp.uint32
        )
        out = jnp.where(a < _f32_bits(fmt.min_normal), sub, out)

    if fmt.has_negative_zero:
        out = out | sign
    else:
        out = jnp.where(out == 0, out, out | sign)
    out = jnp.where(nonfinite, bits, out)
    return jax.lax.bitcast_convert_type(out, jnp.float32).astype(x.dtype)
