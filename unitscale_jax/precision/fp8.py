"""Real FP8 matmuls: operands are float8 arrays, scaled by static per-tensor scales.

``fp8_dot(x, w)`` computes ``x @ w`` as

    xq = clip(x * x_scale, +-max_fwd).astype(fwd_dtype)          # E4M3 by default
    wq = clip(w * w_scale, +-max_fwd).astype(fwd_dtype)
    y  = dot_general(xq, wq, preferred_element_type=...) / (x_scale * w_scale)

and its custom VJP runs both backward matmuls on float8 operands too, with the incoming
gradient cast to ``bwd_dtype`` (E5M2 by default) after scaling by ``grad_scale``:

    gq = clip(g * grad_scale, +-max_bwd).astype(bwd_dtype)
    dx = dot_general(gq, wq^T) / (grad_scale * w_scale)
    dw = dot_general(xq^T, gq) / (x_scale * grad_scale)

The forward keeps ``xq`` and ``wq`` (1 byte per element) as residuals.

Scales are static Python floats, not amax histories ("delayed scaling", Micikevicius et al.,
arXiv 2209.05433): unit scaling keeps every matmul operand near unit variance from
initialisation (Blake et al., ICML 2023, section 6), so the natural scale is 1 (the
default). Clipping before the cast is required: ``float8_e4m3fn`` has no inf and a cast turns
overflow into NaN. XLA maps a dot of float8 operands onto FP8 tensor cores on H100-class
GPUs; on CPU it upcasts the float8 operands and gives the same values as ``simulate``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from unitscale_jax.precision.formats import FloatFormat, get_format


def _static_scale(value, name: str) -> float:
    if isinstance(value, jax.Array):
        raise TypeError(
            f"fp8_dot: {name} must be a static Python float (taken from unit scaling), got a "
            f"traced array; dynamic amax-based scaling is not what this op does."
        )
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"fp8_dot: {name} must be a finite positive float, got {value}.")
    return value


def _real_format(dtype, name: str) -> FloatFormat:
    fmt = get_format(dtype)
    if fmt.dtype is None:
        raise ValueError(f"fp8_dot: {name} {fmt.name} has no real dtype; it can only be simulated.")
    return fmt


def cast_scaled(v: jax.Array, scale: float, fmt: FloatFormat) -> jax.Array:
    """``clip(v * scale, -fmt.max, fmt.max).astype(fmt.dtype)`` (saturating real cast)."""
    v = v.astype(jnp.float32)
    if scale != 1.0:
        v = v * scale
    if fmt.is_float32:
        return v
    return jnp.clip(v, -fmt.max, fmt.max).astype(fmt.dtype)


def _dot(a, b, contract_a, contract_b, out_dtype, unscale: float):
    acc = out_dtype if unscale == 1.0 else jnp.float32
    y = jax.lax.dot_general(a, b, ((contract_a, contract_b), ((), ())), preferred_element_type=acc)
    if unscale != 1.0:
        y = y * unscale
    return y.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_dot(x, w, cfg):
    y, _ = _fp8_dot_fwd(x, w, cfg)
    return y


def _fp8_dot_fwd(x, w, cfg):
    x_scale, w_scale, _, fwd_fmt, _, out_dtype = cfg
    xq = cast_scaled(x, x_scale, fwd_fmt)
    wq = cast_scaled(w, w_scale, fwd_fmt)
    y = _dot(xq, wq, (x.ndim - 1,), (0,), out_dtype, 1.0 / (x_scale * w_scale))
    # Zero-size arrays carry the input dtypes into the backward pass.
    return y, (xq, wq, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_dot_bwd(cfg, res, g):
    x_scale, w_scale, grad_scale, _, bwd_fmt, _ = cfg
    xq, wq, x_tag, w_tag = res
    gq = cast_scaled(g, grad_scale, bwd_fmt)
    lead = tuple(range(g.ndim - 1))
    dx = _dot(gq, wq, (g.ndim - 1,), (1,), x_tag.dtype, 1.0 / (grad_scale * w_scale))
    dw = _dot(xq, gq, lead, lead, w_tag.dtype, 1.0 / (x_scale * grad_scale))
    return dx, dw


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def fp8_dot(
    x: jax.Array,
    w: jax.Array,
    *,
    x_scale: float = 1.0,
    w_scale: float = 1.0,
    grad_scale: float = 1.0,
    fwd_dtype: Any = jnp.float8_e4m3fn,
    bwd_dtype: Any = jnp.float8_e5m2,
    preferred_element_type: Optional[Any] = None,
) -> jax.Array:
    """``x @ w`` with float8 operands in both passes (see the module docstring).

    Args:
      x: ``[..., K]`` float array (activations).
      w: ``[K, N]`` float array (weights, Flax layout).
      x_scale: static per-tensor scale of ``x``, applied before the forward cast and divided
        out of the result. 1.0 suits unit-scaled (unit-variance) operands.
      w_scale: the same for ``w``.
      grad_scale: static scale applied to the incoming gradient before its cast.
      fwd_dtype: dtype (or ``FloatFormat``/name with a dtype) of ``x`` and ``w`` in the matmul.
      bwd_dtype: dtype of the gradient operand in the two backward matmuls.
      preferred_element_type: dtype of the matmul result (float32 or bfloat16); default
        ``x.dtype``. Gradients come back in ``x.dtype`` and ``w.dtype``.

    Returns:
      ``[..., N]`` array of ``preferred_element_type``.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    for name, a in (("x", x), ("w", w)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"fp8_dot: {name} must be floating point, got {a.dtype}.")
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"fp8_dot: expects x [..., K] and w [K, N] (Flax layout); got x {x.shape}, w {w.shape}."
        )
    out_dtype = jnp.dtype(preferred_element_type if preferred_element_type is not None else x.dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating) or out_dtype.itemsize < 2:
        raise ValueError(
            "fp8_dot: preferred_element_type must be float32, bfloat16 or float16, "
            f"got {out_dtype}."
        )
    cfg = (
        _static_scale(x_scale, "x_scale"),
        _static_scale(w_scale, "w_scale"),
        _static_scale(grad_scale, "grad_scale"),
        _real_format(fwd_dtype, "fwd_dtype"),
        _real_format(bwd_dtype, "bwd_dtype"),
        out_dtype,
    )
    return _fp8_dot(x, w, cfg)
