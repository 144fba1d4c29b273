"""End to end: the decoder learns tiny Shakespeare (bytes as tokens) with the optim transforms."""

import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.shared_data import TINYSHAKESPEARE as CORPUS
from unitscale_jax import checks
from unitscale_jax.nn import TransformerDecoder, param_info
from unitscale_jax.optim import adamw, unit_scale, warmup_cosine

STEPS, BATCH, SEQ = 40, 16, 64


def _batches(seed=0):
    data = np.frombuffer(open(CORPUS, "rb").read(), np.uint8)
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - SEQ, BATCH)
        yield jnp.asarray(np.stack([data[s:s + SEQ] for s in starts]).astype(np.int32))


def _train(make_tx):
    model = TransformerDecoder(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=SEQ,
                               rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_tx(model), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, ids):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(ids))(model)
        updates = opt.update(model, grads)
        return loss, grads, updates

    losses, data = [], _batches()
    for _ in range(STEPS):
        loss, grads, updates = step(model, opt, next(data))
        losses.append(float(loss))
    checks.assert_finite_updates(grads, updates)
    return np.array(losses)


@pytest.mark.parametrize("name, make_tx", [
    # any optimizer behind unit_scale(); the unit-scaled model wants a large Adam lr
    ("unit_scale+optax.adamw",
     lambda model: optax.chain(unit_scale(), optax.adamw(warmup_cosine(0.3, 5, STEPS)))),
    # the full u-muP optimizer at u-muP's width-independent lr ~ 2^0
    ("umup.adamw",
     lambda model: adamw(warmup_cosine(1.0, 5, STEPS), param_info=param_info(model),
                         weight_decay=1e-4)),
])
def test_decoder_learns_tiny_shakespeare(name, make_tx):
    assert os.path.exists(CORPUS), (f"tiny Shakespeare not found at {CORPUS} "
                                    "(set USJ_TINYSHAKESPEARE)")
    losses = _train(make_tx)
    assert np.all(np.isfinite(losses))
    assert losses[0] > np.log(256) - 0.5          # starts near uniform over bytes (5.55)
    assert losses[-5:].mean() < losses[:5].mean() - 1.5, (name, losses)
