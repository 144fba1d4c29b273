"""Flax NNX unit-scaled modules and models (``unitscale_jax.nn``)."""

from unitscale_jax.nn.params import PARAM_TYPES, ParamInfo, info_of, param_info, umup_param
from unitscale_jax.nn.config import TransformerConfig
from unitscale_jax.nn.hooks import capture_activations, set_precision, tap
from unitscale_jax.nn.sharding import (
    LOGICAL_AXES,
    LOGICAL_RULES,
    constrain,
    logical_rules,
    logical_to_spec,
    partition_specs,
)
from unitscale_jax.nn.layers import Embedding, LayerNorm, Linear, LinearReadout, RMSNorm
from unitscale_jax.nn.mlp import MLP
from unitscale_jax.nn.attention import MultiHeadAttention, rope
from unitscale_jax.nn.transformer import TransformerLayer, TransformerStack, branch_taus
from unitscale_jax.nn.decoder import TransformerDecoder
from unitscale_jax.nn.encoder import TransformerEncoder
from unitscale_jax.nn.encoder_decoder import TransformerEncoderDecoder

__all__ = [
    "PARAM_TYPES", "ParamInfo", "info_of", "param_info", "umup_param",
    "TransformerConfig",
    "capture_activations", "set_precision", "tap",
    "LOGICAL_AXES", "LOGICAL_RULES", "constrain", "logical_rules", "logical_to_spec",
    "partition_specs",
    "Embedding", "LayerNorm", "Linear", "LinearReadout", "RMSNorm", "MLP",
    "MultiHeadAttention", "rope", "TransformerLayer", "TransformerStack", "branch_taus",
    "TransformerDecoder", "TransformerEncoder", "TransformerEncoderDecoder",
]
