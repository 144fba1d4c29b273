"""Flax NNX unit-scaled modules and Transformer models (``unitscale_jax.nn``).

Models (u-muP by default; ``parametrization="sp"`` or ``"mup"`` switches the same code)::

    from flax import nnx
    from unitscale_jax import nn as unn

    cfg = unn.TransformerConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4,
                                max_seq_len=256)
    model = unn.TransformerDecoder(cfg, rngs=nnx.Rngs(0))     # or TransformerDecoder(**fields)
    logits = model(ids)                                        # [batch, seq, vocab]
    loss = model.loss(ids, where=None)                         # next-token cross-entropy
    tokens = model.generate(prompt, 32, temperature=0.0)      # KV cache, jitted
    info = unn.param_info(model)                               # type / fan_in / depth per param

    enc = unn.TransformerEncoder(cfg.replace(rope=True), n_classes=2, rngs=nnx.Rngs(0))
    enc.mlm_loss(ids, labels, where); enc.classification_loss(ids, y)
    enc.token_classification_loss(ids, tags)
    s2s = unn.TransformerEncoderDecoder(cfg, rngs=nnx.Rngs(0))
    s2s.loss(src, tgt); s2s.generate(src, 32, start_id=0)

Layers: ``Linear``, ``LinearReadout``, ``Embedding``, ``LayerNorm``, ``RMSNorm``, ``MLP``,
``MultiHeadAttention``, ``TransformerLayer``, ``TransformerStack``. Parametrizations:
``UMuP``, ``SP``, ``MuP`` (``get_parametrization(name)``), the one object each module asks
for its maths. Sharding: logical axis names on every parameter, rule tables in
``LOGICAL_RULES`` / ``logical_rules``. Precision: one hook (``hooks``), set with
``set_precision(model, policy)``. LoRA adapters: ``TransformerConfig.lora_targets`` /
``lora_rank`` / ``lora_mult`` (``unitscale_jax.nn.lora``; ``merge_lora`` folds them in).
Parameter metadata lives in ``unitscale_jax.params``
(re-exported here); activation taps in ``unitscale_jax.taps``.
"""

from unitscale_jax.nn import lora
from unitscale_jax.nn.attention import MultiHeadAttention, rope
from unitscale_jax.nn.config import TransformerConfig
from unitscale_jax.nn.decoder import TransformerDecoder
from unitscale_jax.nn.encoder import TransformerEncoder
from unitscale_jax.nn.encoder_decoder import TransformerEncoderDecoder
from unitscale_jax.nn.hooks import set_precision
from unitscale_jax.nn.layers import Embedding, LayerNorm, Linear, LinearReadout, RMSNorm
from unitscale_jax.nn.lora import LORA_TARGETS, LoRAAdapter, LoRASpec, merge_lora
from unitscale_jax.nn.mlp import MLP
from unitscale_jax.nn.multitask import MultiTaskEncoder, trunk_grad_scale
from unitscale_jax.nn.parametrization import (
    PARAMETRIZATIONS,
    SP,
    MuP,
    Parametrization,
    UMuP,
    get_parametrization,
)
from unitscale_jax.nn.sharding import (
    LOGICAL_AXES,
    LOGICAL_RULES,
    constrain,
    logical_rules,
    logical_to_spec,
    partition_specs,
)
from unitscale_jax.nn.transformer import (
    TransformerLayer,
    TransformerStack,
    branch_taus,
    stack_runner,
)
from unitscale_jax.params import PARAM_TYPES, ParamInfo, info_of, param_info, umup_param

__all__ = [
    "PARAM_TYPES", "ParamInfo", "info_of", "param_info", "umup_param",
    "MuP", "PARAMETRIZATIONS", "Parametrization", "SP", "UMuP", "get_parametrization",
    "TransformerConfig", "set_precision",
    "LOGICAL_AXES", "LOGICAL_RULES", "constrain", "logical_rules", "logical_to_spec",
    "partition_specs",
    "Embedding", "LayerNorm", "Linear", "LinearReadout", "RMSNorm", "MLP",
    "MultiHeadAttention", "rope", "TransformerLayer", "TransformerStack", "branch_taus",
    "stack_runner",
    "TransformerDecoder", "TransformerEncoder", "TransformerEncoderDecoder",
    "lora", "LORA_TARGETS", "LoRAAdapter", "LoRASpec", "merge_lora",
    "MultiTaskEncoder", "trunk_grad_scale",
]
