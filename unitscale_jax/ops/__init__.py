"""Unit-scaled functional ops (``unitscale_jax.ops``).

Every op here computes ``scale_fwd(f(scale_bwd(x, beta)), alpha)`` with ``alpha`` and ``beta``
chosen from static shapes so that unit-variance inputs and incoming gradients give
unit-variance outputs and outgoing gradients. Values and gradients match the authors'
PyTorch library ``unit-scaling`` 0.3.5 (``unit_scaling.functional``).

``unitscale_jax.ops.plain`` holds the ordinary maths each unit-scaled op wraps (the same
cores with no scales), which the standard and muP parametrizations use.
"""

from unitscale_jax.ops import patterns as patterns
from unitscale_jax.ops import plain as plain
from unitscale_jax.ops._scale import microbatches, scale_bwd, scale_fwd
from unitscale_jax.ops.activations import dropout, gelu, silu, silu_glu, softmax
from unitscale_jax.ops.attention import (
    attention_scale,
    attention_scale_from_counts,
    scaled_dot_product_attention,
)
from unitscale_jax.ops.constraints import (
    CONSTRAINTS,
    apply_constraint,
    logarithmic_interpolation,
    validate_constraint,
)
from unitscale_jax.ops.embedding import embedding
from unitscale_jax.ops.linear import add, linear, linear_readout, matmul
from unitscale_jax.ops.linear_attention import linear_attention, linear_attention_scales
from unitscale_jax.ops.losses import cross_entropy, kl_divergence, mse_loss
from unitscale_jax.ops.norms import layer_norm, rms_norm
from unitscale_jax.ops.patterns import block_sparse_mask
from unitscale_jax.ops.residual import (
    residual_add,
    residual_apply,
    residual_split,
    transformer_residual_scaling_rule,
)

__all__ = [
    "CONSTRAINTS", "add", "apply_constraint", "attention_scale", "attention_scale_from_counts",
    "block_sparse_mask", "cross_entropy", "dropout",
    "embedding", "gelu", "kl_divergence", "layer_norm", "linear", "linear_attention",
    "linear_attention_scales", "linear_readout", "logarithmic_interpolation",
    "matmul", "microbatches", "mse_loss", "residual_add", "residual_apply", "residual_split",
    "rms_norm",
    "scale_bwd", "scale_fwd", "scaled_dot_product_attention", "silu", "silu_glu", "softmax",
    "transformer_residual_scaling_rule", "validate_constraint",
]
