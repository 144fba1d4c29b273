"""Exact u-muP factors for every parameter of a small TransformerDecoder.

The expected factor is derived from each parameter's path and Flax shape (kernels are
``[..., fan_in, fan_out]``; the embedding's width is d_model), independently of the metadata
the modules attach, and checked twice: against ``umup_factors(param_info(model))`` and in the
first update of u-muP Adam, whose per-tensor RMS is ``eta * factor``
(``optim_helpers.check_model_factors``).
"""

import pytest
from flax import nnx
from optim_helpers import check_model_factors

from unitscale_jax.nn import TransformerDecoder

N_LAYERS = 3


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_exact_factor_of_every_decoder_parameter(scan):
    model = TransformerDecoder(vocab_size=48, d_model=32, n_layers=N_LAYERS, n_heads=4,
                               max_seq_len=16, bias=True, parametric_norm=True, mlp="gelu",
                               scan_layers=scan, rngs=nnx.Rngs(0))
    # the scanned model with its own gradients; the unrolled twin (per-layer paths) with random ones
    check_model_factors(model, lambda m, ids: m.loss(ids), n_layers=N_LAYERS,
                        use_model_grads=scan)
