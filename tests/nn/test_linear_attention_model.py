"""Models with ``attention_kind="linear"``: they train, the recurrent-state cache generates
what the full forward pass computes, padding is hidden, and bad settings are clear errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.nn.helpers import random_ids
from unitscale_jax import nn as unn
from unitscale_jax import optim, train
from unitscale_jax.train import build
from unitscale_jax.train.flags import parse_train_args

V = 64
LINEAR = unn.TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                               attention_kind="linear")


def _train(model, loss_fn, batch, steps=12):
    """Losses of ``steps`` full-batch steps (u-muP Adam for u-muP, optax Adam for SP)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if model.config.parametrization.unit_scaled:
        tx = optim.adam(2.0**-4, param_info=unn.param_info(model))
    else:
        tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, g = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), *batch))(
            params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("parametrization", ["umup", "sp"])
def test_a_linear_decoder_trains(parametrization):
    model = unn.TransformerDecoder(LINEAR, parametrization=parametrization, rngs=nnx.Rngs(0))
    assert model.stack.layers.attn.attention_kind == "linear"
    ids = random_ids(1, (4, 16), 8)  # few distinct tokens: quickly learnable
    losses = _train(model, lambda m, i: m.loss(i), (ids,))
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_a_linear_encoder_trains_with_padding():
    model = unn.TransformerEncoder(LINEAR, rope=True, rngs=nnx.Rngs(1))
    labels = random_ids(2, (4, 16), 8)
    mask = jnp.arange(16)[None, :] < jnp.array([[16], [12], [9], [16]])
    where = (jnp.arange(16)[None, :] % 3 == 0) & mask
    ids = jnp.where(where, V - 1, labels)            # the masked-LM corruption
    losses = _train(model, lambda m, i, l, w, k: m.mlm_loss(i, l, w, mask=k),
                    (ids, labels, where, mask))
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_the_encoder_hides_padded_keys():
    model = unn.TransformerEncoder(LINEAR, rope=True, rngs=nnx.Rngs(2))
    ids = random_ids(3, (2, 12), V)
    mask = jnp.arange(12)[None, :] < jnp.array([[8], [12]])   # row 0: 4 padding tokens
    changed = ids.at[0, 8:].set((ids[0, 8:] + 7) % V)
    run = nnx.jit(lambda m, i, k: m(i, mask=k))
    a, b = run(model, ids, mask), run(model, changed, mask)
    chex.assert_trees_all_close(a[0, :8], b[0, :8], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(a[1], b[1], rtol=1e-6, atol=1e-6)
    unmasked = nnx.jit(lambda m, i: m(i))(model, changed)
    assert not np.allclose(unmasked[0, :8], b[0, :8], atol=1e-4)


@pytest.mark.parametrize("parametrization,scan,rope", [
    ("umup", True, False), ("umup", False, True), ("sp", True, True)])
def test_recurrent_state_generation_matches_the_full_forward(parametrization, scan, rope):
    model = unn.TransformerDecoder(LINEAR, parametrization=parametrization, scan_layers=scan,
                                   rope=rope, rngs=nnx.Rngs(0))
    cache = model.init_cache(3, 12)["self"]
    assert jax.tree.map(jnp.shape, cache) == {"kv": (2, 3, 2, 16, 16), "z": (2, 3, 2, 16)}
    prompt = random_ids(7, (3, 5), V)
    tokens, logits = model.generate(prompt, 7, return_logits=True)
    np.testing.assert_array_equal(tokens[:, 5:], jnp.argmax(logits, -1))
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    chex.assert_trees_all_close(logits, full[:, 4:11], rtol=1e-4, atol=1e-5)


def test_a_linear_encoder_decoder_generates_what_its_forward_pass_computes():
    model = unn.TransformerEncoderDecoder(LINEAR, rngs=nnx.Rngs(4))
    src = random_ids(5, (2, 9), V)
    src_mask = jnp.arange(9)[None, :] < jnp.array([[9], [6]])
    tokens, logits = model.generate(src, 5, src_mask=src_mask, return_logits=True)
    full = nnx.jit(lambda m, s, t, k: m(s, t, src_mask=k))(model, src, tokens, src_mask)
    chex.assert_trees_all_close(logits, full[:, :5], rtol=1e-4, atol=1e-5)


def test_a_softmax_decoder_gives_other_values():
    """The kind reaches the layers: the same weights give other logits under softmax."""
    ids = random_ids(8, (2, 10), V)
    lin = unn.TransformerDecoder(LINEAR, rngs=nnx.Rngs(0))
    soft = unn.TransformerDecoder(LINEAR.replace(attention_kind="softmax"), rngs=nnx.Rngs(0))
    run = nnx.jit(lambda m, i: m(i))
    assert not np.allclose(run(lin, ids), run(soft, ids), atol=1e-3)


@pytest.mark.parametrize("changes,match", [
    (dict(attention_kind="performer"), r"attention_kind must be one of \('softmax', 'linear'\)"),
    (dict(attention_impl="chunked"), "leave attention_impl='auto' with attention_kind='linear'"),
    (dict(attn_mult=2.0), "leave attn_mult=1 with attention_kind='linear'"),
])
def test_bad_settings_are_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        LINEAR.replace(**changes)
    with pytest.raises(ValueError, match=match):
        unn.MultiHeadAttention(32, 2, rngs=nnx.Rngs(0), **{
            {"attn_mult": "mult"}.get(k, k): v for k, v in
            {"attention_kind": "linear", **changes}.items()})


def test_bad_model_inputs_are_clear_errors():
    model = unn.TransformerDecoder(LINEAR, rngs=nnx.Rngs(0))
    ids = random_ids(0, (2, 6), V)
    with pytest.raises(ValueError, match="linear attention takes a key padding mask only"):
        model(ids, mask=jnp.ones((2, 1, 6, 6), bool))
    cache = model.init_cache(2, 6)
    with pytest.raises(ValueError, match="needs scale_seq_len"):
        model.decode_step(ids, cache, 0)
    enc = unn.MultiHeadAttention(32, 2, attention_kind="linear", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="bidirectional self attention has no cache"):
        enc(jnp.ones((1, 3, 32)), cache=cache["self"], cache_index=0, scale_seq_len=3)


def test_the_cli_flag_reaches_the_model_and_bad_values_are_usage_errors():
    cfg = train.resolve(parse_train_args(["--attention-kind", "linear"]))
    assert build.transformer_config(cfg, 260).attention_kind == "linear"
    with pytest.raises(train.UsageError, match=r"invalid choice: 'performer'"):
        parse_train_args(["--attention-kind", "performer"])
    cfg = train.resolve(parse_train_args(["--attention-kind", "linear", "--attention-impl",
                                          "xla"]))
    with pytest.raises(train.UsageError, match="leave attention_impl='auto'"):
        build.transformer_config(cfg, 260)
