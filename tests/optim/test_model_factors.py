"""Exact u-muP factors for every parameter of a small TransformerDecoder and TransformerEncoder.

The expected factor is derived here from each parameter's path and Flax shape (kernels are
``[..., fan_in, fan_out]``; the embedding's width is d_model), independently of the metadata
the modules attach, and checked twice: against ``umup_factors(param_info(model))`` and in the
first update of u-muP Adam, whose per-tensor RMS is ``eta * factor``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitscale_jax import checks
from unitscale_jax.nn import TransformerDecoder, TransformerEncoder, param_info
from unitscale_jax.optim import adam, umup_factors
from unitscale_jax.optim._tree import path_key

N_LAYERS, LR = 3, 0.5
HEADS = ("readout", "cls_head", "token_head")


def _expected(key, shape):
    if key[0] == "embed":
        return shape[-1] ** -0.5                     # embedding: d_model^-1/2
    if key[0] in HEADS or key[0] == "final_norm":
        return 1.0                                   # output layers, norms outside the stack
    assert key[0] == "stack", key
    depth = N_LAYERS ** -0.5
    return depth * shape[-2] ** -0.5 if key[-1] == "kernel" else depth  # hidden weight / bias, gain


def _flat(tree, is_leaf=None):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {path_key(p): v for p, v in flat}


def _decoder(scan):
    model = TransformerDecoder(vocab_size=48, d_model=32, n_layers=N_LAYERS, n_heads=4,
                               max_seq_len=16, bias=True, parametric_norm=True, mlp="gelu",
                               scan_layers=scan, rngs=nnx.Rngs(0))
    return model, lambda m, ids: m.loss(ids)


def _encoder(scan):
    model = TransformerEncoder(vocab_size=48, d_model=32, n_layers=N_LAYERS, n_heads=4,
                               max_seq_len=16, bias=True, parametric_norm=True, rope=True,
                               scan_layers=scan, n_classes=3, n_token_classes=5,
                               rngs=nnx.Rngs(0))

    def loss(m, ids):
        return (m.mlm_loss(ids, (ids + 1) % 48) + m.classification_loss(ids, ids[:, 0] % 3)
                + m.token_classification_loss(ids, ids % 5))

    return model, loss


@pytest.mark.parametrize("build", [_decoder, _encoder], ids=["decoder", "encoder"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_exact_factor_of_every_parameter(build, scan):
    model, loss = build(scan)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    shapes = {k: v.shape for k, v in _flat(params).items()}
    want = {k: _expected(k, s) for k, s in shapes.items()}
    assert any(k[0] == "stack" and k[-1] == "kernel" for k in want)

    # 1. the metadata gives exactly these factors, for every parameter
    info = param_info(model)
    got = _flat(umup_factors(info), is_leaf=lambda x: x is None)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k

    # 2. they show in the first update of u-muP Adam (a sign step): RMS = eta * factor
    if scan:  # the model's own gradients
        ids = jax.random.randint(jax.random.key(1), (4, 16), 0, 48)
        grads = nnx.as_pure(nnx.state(nnx.jit(nnx.grad(loss))(model, ids), nnx.Param))
    else:     # (the unrolled twin: same layout with per-layer paths; random gradients, faster)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        grads = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    # (betas with power-of-two complements make Adam's first step exactly sign(g))
    tx = adam(LR, param_info=info, eps=1e-30, b1=1 - 2 ** -3, b2=1 - 2 ** -10)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    checks.assert_umup_first_step(updates, info, LR, rtol=1e-6)
    for k, u in _flat(updates).items():
        mags = np.abs(np.asarray(u))
        np.testing.assert_allclose(mags[mags > 0], np.float32(LR * want[k]), rtol=1e-6,
                                   err_msg=str(k))
        assert (mags > 0).mean() > (0.3 if k[0] == "embed" else 0.99), k
