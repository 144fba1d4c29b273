"""The Transformer MLP: SwiGLU (default) or GELU."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax.nn.layers import Linear, ParametrizationLike
from unitscale_jax.nn.parametrization import get_parametrization
from unitscale_jax.nn.sharding import constrain
from unitscale_jax.taps import tap

MLP_KINDS = ("swiglu", "gelu")


class MLP(nnx.Module):
    """``down(silu_glu(up(x), gate(x)))`` (SwiGLU) or ``down(gelu(up(x)))``.

    u-muP (as the reference ``unit_scaling.MLP``): the three projections use
    ``constraint=None``, which is safe because the forward and backward scales of the up /
    gate projections mirror those of the down projection; ``ops.silu_glu`` / ``ops.gelu``
    take the activation multiplier ``act_mult`` (``alpha_ffn-act``).

    Args:
      d_model: input and output width.
      d_ff: hidden width.
      rngs: ``nnx.Rngs``.
      kind: ``"swiglu"`` or ``"gelu"``.
      act_mult: u-muP's ``alpha_ffn-act``.
      bias: biases on the projections.
      depth: residual-stack depth (parameter metadata).
      parametrization: ``"umup"``, ``"sp"`` or ``"mup"``.
      init_std: SP std of the up / gate projections.
      out_init_std: SP std of the down projection.
      precision: low-precision policy, or None.
      layer: layer index for per-layer precision exceptions.
      dtype: compute dtype.
      param_dtype: storage dtype.
      lora: LoRA adapters on the targeted projections (``nn.lora.LoRASpec``), or None.
    """

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, kind: str = "swiglu",
                 act_mult: float = 1.0, bias: bool = False, depth: Optional[int] = None,
                 parametrization: ParametrizationLike = "umup", init_std: Optional[float] = None,
                 out_init_std: Optional[float] = None, precision: Any = None,
                 layer: Optional[int] = None, dtype: Any = None, param_dtype: Any = jnp.float32,
                 lora: Any = None):
        if kind not in MLP_KINDS:
            raise ValueError(f"MLP kind must be one of {MLP_KINDS}, got {kind!r}.")
        self.kind = kind
        self.act_mult = float(act_mult)
        self.parametrization = get_parametrization(parametrization)
        common = dict(rngs=rngs, bias=bias, constraint=None, depth=depth,
                      parametrization=parametrization, precision=precision, layer=layer,
                      dtype=dtype, param_dtype=param_dtype, lora=lora)
        self.up_proj = Linear(d_model, d_ff, init_std=init_std, sharding=("embed", "mlp"),
                              role="mlp.up_proj", **common)
        self.gate_proj = (Linear(d_model, d_ff, init_std=init_std, sharding=("embed", "mlp"),
                                 role="mlp.gate_proj", **common) if kind == "swiglu" else None)
        self.down_proj = Linear(d_ff, d_model, init_std=out_init_std, sharding=("mlp", "embed"),
                                role="mlp.down_proj", **common)

    def __call__(self, x: jax.Array, *, rng: Optional[jax.Array] = None) -> jax.Array:
        """``[..., d_model] -> [..., d_model]``; ``rng`` only for stochastic rounding."""
        k = jax.random.split(rng, 3) if rng is not None else (None, None, None)
        up = tap("mlp.up", self.up_proj(x, rng=k[0]))
        if self.gate_proj is not None:
            gate = tap("mlp.gate", self.gate_proj(x, rng=k[1]))
            h = self.parametrization.silu_glu(up, gate, mult=self.act_mult)
        else:
            h = self.parametrization.gelu(up, mult=self.act_mult)
        if h.ndim == 3:
            h = constrain(h, ("batch", "sequence", "mlp"))
        h = tap("mlp.act", h)
        return tap("mlp.out", self.down_proj(h, rng=k[2]))
