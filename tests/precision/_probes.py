"""Shared test data for unitscale_jax.precision: probe values for bit-exactness checks."""

import numpy as np

from unitscale_jax.precision import BF16, E4M3, E4M3_FNUZ, E5M2, E5M2_FNUZ, FP16

NAMED_FORMATS = [E4M3, E5M2, E4M3_FNUZ, E5M2_FNUZ, FP16, BF16]


def all_finite_values(fmt) -> np.ndarray:
    """Every finite value of ``fmt`` as float32 (from its bit patterns), sorted."""
    n_bytes = fmt.bits // 8
    patterns = np.arange(2 ** fmt.bits, dtype=np.uint64).astype(
        {1: np.uint8, 2: np.uint16}[n_bytes])
    values = patterns.view(fmt.dtype).astype(np.float32)
    return np.unique(values[np.isfinite(values)])


def probe_values(fmt, seed: int = 0, n_random: int = 20000) -> np.ndarray:
    """Grid points, midpoints (ties), their float32 neighbours, random log-uniform values and
    special cases, all within [-max, max]."""
    rng = np.random.default_rng(seed)
    grid = all_finite_values(fmt)
    mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
    lo, hi = np.log2(fmt.min_subnormal) - 4, np.log2(fmt.max) + 1
    rand = rng.choice([-1.0, 1.0], n_random) * np.exp2(rng.uniform(lo, hi, n_random))
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-39, fmt.min_subnormal / 2,
                        -fmt.min_subnormal / 2, fmt.min_subnormal * 0.75, fmt.min_normal,
                        fmt.max, -fmt.max], np.float64)
    rand = np.clip(rand, -fmt.max, fmt.max)
    x = np.concatenate([grid, mids, np.nextafter(mids, np.float32(np.inf)),
                        np.nextafter(mids, np.float32(-np.inf)), rand, special]).astype(np.float32)
    return np.clip(x, -fmt.max, fmt.max)
