"""Exact power-of-two arithmetic for loss-scale-invariant statistics.

Multiplying a float32 by 2^k is exact unless the result leaves the normal range, and rounding
commutes with it. Squaring does not keep that range: for a gradient of RMS 2^-70 (for instance
2^-50 under a loss scale of 2^-20) the squares are 2^-140, below float32's smallest normal
2^-126, and a mean square computed naively is flushed to zero. The helpers here therefore
normalise a tensor by the power of two just above its max-abs *before* squaring, so the squares
lie in [2^-2, 1) for the largest elements, and scale the square root back afterwards. For an
input multiplied by 2^k, the normalised tensor is bit-for-bit the same, so ``rms(2^k x)`` is
exactly ``2^k rms(x)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _pow2(e: jax.Array) -> jax.Array:
    """2^e as float32 for an int32 ``e`` in [-126, 127], built from its bits (exact)."""
    e = jnp.clip(e, -126, 127).astype(jnp.int32)
    return lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def scale_pow2(x: jax.Array, e: jax.Array) -> jax.Array:
    """``x * 2^e`` for float32 ``x`` and int32 ``e`` in [-252, 254], in two exact factors."""
    e = jnp.asarray(e, jnp.int32)
    e1 = e // 2
    return x * _pow2(e1) * _pow2(e - e1)


def exponent(m: jax.Array) -> jax.Array:
    """The int32 ``e`` with ``m = f * 2^e``, f in [0.5, 1) (0 for m == 0)."""
    return jnp.frexp(m)[1].astype(jnp.int32)


def rms(x: jax.Array) -> jax.Array:
    """Root mean square of all elements of ``x`` as a float32 scalar, exact under 2^k scaling.

    ``rms(x) = 2^e sqrt(mean((x 2^-e)^2))`` with ``2^e`` the power of two just above max|x|.
    Returns 0 for an all-zero (or empty) tensor and NaN/inf if ``x`` is not finite.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.size == 0:
        return jnp.zeros((), jnp.float32)
    m = jnp.max(jnp.abs(x))
    e = exponent(m)
    # One exact factor 2^-e (clamped to float32's normal range: only a max-abs below 2^-126 or
    # at/above 2^127 is affected, and those still end up with squares safely in range).
    y = x * _pow2(-e)
    r = scale_pow2(jnp.sqrt(jnp.mean(y * y)), e)
    return jnp.where(m > 0, r, jnp.where(jnp.isfinite(m), 0.0, m))


# A guess is used only if the mean square of x / 2^e lands in [2^-60, 2^60]: there no element's
# square can overflow (an inf or NaN fails the test) and squares too small to be normal weigh
# at most 2^-66 of the total.
_GUESS_MIN_MS, _GUESS_MAX_MS = 2.0 ** -60, 2.0 ** 60


def rms_with_guess(x: jax.Array, guess: jax.Array, use_guess: jax.Array) -> jax.Array:
    """``rms(x)`` in one pass over ``x`` when a scale-equivariant guess of it is at hand.

    With ``2^e`` the power of two just above ``guess`` (for instance the previous step's RMS of
    the same gradient leaf), ``rms(x) = 2^e sqrt(mean((x 2^-e)^2))`` needs one read of ``x``
    instead of the two of ``rms`` (max-abs, then the normalised mean square). If ``x`` and
    ``guess`` are both multiplied by 2^k, ``x 2^-e`` is bit-for-bit the same, and so are the
    result (times 2^k) and the choice of path: the invariance of ``rms`` is kept. When
    ``use_guess`` is false, ``guess`` is not positive and finite, or the normalised mean square
    falls outside [2^-60, 2^60] (the guess is off by more than ~2^30, or ``x`` is zero or not
    finite), the exact two-pass ``rms`` is computed instead (``lax.cond``: only one branch runs).
    """
    x = jnp.asarray(x, jnp.float32)
    if x.size == 0:
        return jnp.zeros((), jnp.float32)
    guess = jnp.asarray(guess, jnp.float32)
    e = exponent(guess)
    y = scale_pow2(x, -e)
    ms = jnp.mean(y * y)
    ok = (use_guess & (guess > 0) & jnp.isfinite(guess)
          & (ms >= _GUESS_MIN_MS) & (ms <= _GUESS_MAX_MS))
    return lax.cond(ok, lambda: scale_pow2(jnp.sqrt(ms), e), lambda: rms(x))


def weighted_rms(a: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
    """``sqrt(w a^2 + (1 - w) b^2)`` for non-negative float32 scalars, exact under 2^k scaling."""
    m = jnp.maximum(a, b)
    e = exponent(m)
    a_n, b_n = scale_pow2(a, -e), scale_pow2(b, -e)
    r = scale_pow2(jnp.sqrt(w * a_n * a_n + (1.0 - w) * b_n * b_n), e)
    return jnp.where(m > 0, r, m)
