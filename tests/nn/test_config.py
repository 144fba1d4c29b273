"""TransformerConfig validation and model constructors."""

import jax.numpy as jnp
import pytest
from flax import nnx

from unitscale_jax import nn as unn

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4)


@pytest.mark.parametrize("change,match", [
    (dict(d_model=30), "not divisible by n_heads"),
    (dict(n_layers=0), "n_layers must be a positive int"),
    (dict(vocab_size=1), "vocab_size must be >= 2"),
    (dict(mlp="relu"), "mlp must be one of"),
    (dict(norm="batch"), "norm must be one of"),
    (dict(parametrization="ntk"), "parametrization must be one of"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(attn_mult=0.0), "attn_mult must be a finite float > 0"),
    (dict(loss_mult=float("inf")), "loss_mult must be a finite float > 0"),
    (dict(rope=True, d_head=7), "even d_head"),
    (dict(dtype="int32"), "floating-point dtype"),
    (dict(param_dtype="nope"), "not a dtype"),
    (dict(n_decoder_layers=0), "n_decoder_layers"),
    (dict(sp_init_std=-1.0), "sp_init_std"),
    (dict(precision=object()), "lacks method"),
])
def test_invalid_configs_raise_clear_errors(change, match):
    with pytest.raises(ValueError, match=match):
        unn.TransformerConfig(**{**BASE, **change})


def test_derived_fields_and_replace():
    cfg = unn.TransformerConfig(**BASE, dtype="bfloat16")
    assert cfg.head_dim == 8 and cfg.ffn_dim == 128 and cfg.decoder_layers == 2
    assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
    wider = cfg.replace(d_model=64)
    assert wider.head_dim == 16 and wider.ffn_dim == 256  # derived, not stale
    assert cfg.replace(d_ff=100, d_head=4).ffn_dim == 100
    with pytest.raises(TypeError, match="no field"):
        cfg.replace(width=3)
    assert hash(cfg) == hash(unn.TransformerConfig(**BASE, dtype="bfloat16"))


def test_constructors_accept_config_or_fields():
    cfg = unn.TransformerConfig(**BASE)
    a = unn.TransformerDecoder(cfg, attn_mult=2.0, rngs=nnx.Rngs(0))
    b = unn.TransformerDecoder(**BASE, attn_mult=2.0, rngs=nnx.Rngs(0))
    assert a.config == b.config and a.config.attn_mult == 2.0
    assert a.stack.layers.attn.mult == 2.0
    with pytest.raises(TypeError, match="TransformerConfig"):
        unn.TransformerDecoder({"vocab_size": 3}, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError):
        unn.TransformerEncoder(rngs=nnx.Rngs(0), vocab_size=64)
    with pytest.raises(ValueError, match="n_classes"):
        unn.TransformerEncoder(cfg, n_classes=1, rngs=nnx.Rngs(0))
