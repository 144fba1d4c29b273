"""Exact u-muP factors for every parameter of a small TransformerEncoder with all three heads
(see ``test_model_factors.py`` and ``optim_helpers.check_model_factors``)."""

import pytest
from flax import nnx
from optim_helpers import check_model_factors

from unitscale_jax.nn import TransformerEncoder

N_LAYERS = 3


def _loss(m, ids):
    return (m.mlm_loss(ids, (ids + 1) % 48) + m.classification_loss(ids, ids[:, 0] % 3)
            + m.token_classification_loss(ids, ids % 5))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_exact_factor_of_every_encoder_parameter(scan):
    model = TransformerEncoder(vocab_size=48, d_model=32, n_layers=N_LAYERS, n_heads=4,
                               max_seq_len=16, bias=True, parametric_norm=True, rope=True,
                               scan_layers=scan, n_classes=3, n_token_classes=5,
                               rngs=nnx.Rngs(0))
    check_model_factors(model, _loss, n_layers=N_LAYERS, use_model_grads=scan)
