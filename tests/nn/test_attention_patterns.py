"""Per-layer attention patterns (``attention_window``, ``attention_pattern``): the config's
per-layer windows, a windowed model equals an explicitly masked one, scanned equals unrolled
for mixed patterns, KV-cache generation equals the full forward pass (mixed patterns' grouped
caches: test_ring_cache_mixed.py), windowed models train a step, and bad settings fail clearly
(also as flags)."""

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.nn.helpers import loss_and_grads, random_ids, unstack_into
from unitscale_jax import nn as unn
from unitscale_jax.cli import main

CFG = unn.TransformerConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=32,
                            attention_window=4, rope=True)


def _loss(m, ids):
    return m.loss(ids)


def test_config_gives_each_layer_its_window():
    assert CFG.layer_windows(3) == (4, 4, 4)
    assert CFG.replace(attention_pattern="local,global").layer_windows(3) == (4, None, 4)
    assert CFG.replace(attention_pattern=" global , local").layer_windows(4) == (None, 4) * 2
    assert CFG.replace(attention_window=None).layer_windows(2) == (None, None)
    stack = unn.TransformerDecoder(CFG, attention_pattern="global,local", scan_layers=False,
                                   rngs=nnx.Rngs(0)).stack
    assert [layer.attn.window for layer in stack.layers] == [None, 4, None]


@pytest.mark.parametrize("bad, needle", [
    (dict(attention_window=0), "attention_window must be a positive int"),
    (dict(attention_window=-2), "attention_window must be a positive int"),
    (dict(attention_pattern="local,dense"), "attention_pattern must be a comma-separated cycle"),
    (dict(attention_window=None, attention_pattern="local,global"),
     "has local layers but attention_window is None; set attention_window"),
])
def test_bad_settings_fail_clearly(bad, needle):
    with pytest.raises(ValueError, match=needle):
        CFG.replace(**bad)
    with pytest.raises(ValueError, match="window must be a positive int"):
        unn.MultiHeadAttention(32, 2, window=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cross attention has no sliding window"):
        unn.MultiHeadAttention(32, 2, cross=True, window=4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("argv, needle", [
    (["--attention-window", "0"], "attention_window must be a positive int"),
    (["--attention-pattern", "local,global"], "has local layers but attention_window is None"),
])
def test_bad_flags_fail_clearly(capsys, tmp_path, argv, needle):
    rc = main(["train", *argv, "--run-dir", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and needle in lines[0], err


def test_sp_windowed_model_equals_the_explicitly_masked_one():
    """SP has no scale to follow the window, so a windowed SP decoder is its global twin with
    the window as an attention mask (causal: keys t-3..t); chunked = xla; and the window
    changes the loss (the check can fail)."""
    ids = random_ids(1, (2, 19), 64)
    t = np.arange(19)
    keep = jnp.asarray((t[:, None] - t[None, :] >= 0) & (t[:, None] - t[None, :] < 4))
    sp = CFG.replace(parametrization="sp", scan_layers=False, n_layers=2)
    windowed = unn.TransformerDecoder(sp, attention_impl="chunked", rngs=nnx.Rngs(0))
    masked = unn.TransformerDecoder(sp, attention_window=None, rngs=nnx.Rngs(0))
    la, ga = loss_and_grads(windowed, _loss, ids)
    lb, gb = loss_and_grads(masked, lambda m, i: m.loss(i, mask=keep[None, None]), ids)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    chex.assert_trees_all_close(ga, gb, rtol=2e-4, atol=2e-6)
    g_full = loss_and_grads(masked, _loss, ids)[1]     # SP's loss barely sees attention at
    qkv = [p for p in ga if "qkv_proj" in p][0]        # init, its q/k/v gradients do
    assert np.abs(g_full[qkv] - ga[qkv]).max() > 0.1 * np.abs(ga[qkv]).max()


@pytest.mark.parametrize("parametrization", ["umup", "sp"])
def test_scanned_mixed_pattern_equals_unrolled(parametrization):
    cfg = CFG.replace(attention_pattern="local,global", parametrization=parametrization)
    scanned = unn.TransformerDecoder(cfg, rngs=nnx.Rngs(0))
    unrolled = unn.TransformerDecoder(cfg, scan_layers=False, rngs=nnx.Rngs(1))
    unstack_into(scanned, unrolled)
    ids = random_ids(4, (2, 16), 64)
    l1, g1 = loss_and_grads(scanned, _loss, ids)
    l2, g2 = loss_and_grads(unrolled, _loss, ids)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for path, g in g1.items():
        if "layers" in path:
            i = path.index("layers")
            for layer in range(cfg.n_layers):
                np.testing.assert_allclose(g[layer], g2[path[:i + 1] + (layer,) + path[i + 1:]],
                                           rtol=1e-4, atol=1e-5 * np.abs(g).max())
        else:
            np.testing.assert_allclose(g, g2[path], rtol=1e-4, atol=1e-5 * np.abs(g).max())


@pytest.mark.parametrize("parametrization, pattern, scan", [
    ("umup", None, True), ("umup", "local,global", True), ("umup", "local,global", False),
    ("sp", None, False), ("sp", "local,global", True)])
def test_kv_cache_generation_equals_full_forward(parametrization, pattern, scan):
    """Prompt 5 + 9 new tokens with a window of 4: the local layers' ring buffers hold 4
    entries and wrap three times (mixed patterns: the global layers' caches hold all 14)."""
    model = unn.TransformerDecoder(CFG, attention_pattern=pattern, scan_layers=scan,
                                   parametrization=parametrization, rngs=nnx.Rngs(0))
    prompt = random_ids(7, (2, 5), 64)
    tokens, logits = model.generate(prompt, 9, return_logits=True)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    chex.assert_trees_all_close(logits, full[:, 4:13], rtol=1e-4, atol=1e-5)
    cache = model.init_cache(2, 14)["self"]
    if pattern is None:
        assert cache["k"].shape[2] == 4
    else:
        assert cache["local"]["k"].shape[2] == 4 and cache["global"]["k"].shape[2] == 14


def test_prefill_longer_than_the_ring_then_steps():
    """A prompt of 11 tokens into a ring of 4 (only its last 4 kept), then single steps:
    every step's logits equal the full forward pass's."""
    model = unn.TransformerDecoder(CFG, rngs=nnx.Rngs(0))
    ids = random_ids(3, (1, 15), 64)
    cache = model.init_cache(1, 15)
    step = nnx.jit(lambda m, i, c, p: m.decode_step(i, c, p, scale_seq_len=15))
    logits, cache = step(model, ids[:, :11], cache, 0)
    got = [logits]
    for p in range(11, 15):
        logits, cache = step(model, ids[:, p:p + 1], cache, p)
        got.append(logits)
    full = nnx.jit(lambda m, t: m(t))(model, ids)
    chex.assert_trees_all_close(jnp.concatenate(got, axis=1), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs scale_seq_len"):
        model.decode_step(ids[:, :1], model.init_cache(1, 15), 0)


@pytest.mark.parametrize("cls", [unn.TransformerDecoder, unn.TransformerEncoder])
def test_windowed_models_train_a_step(cls):
    """One Adam step on a batch lowers its loss, for a causal decoder and a bidirectional
    encoder with mixed local / global layers (scanned)."""
    model = cls(CFG, attention_pattern="local,global", rngs=nnx.Rngs(0))
    ids = random_ids(5, (4, 24), 64)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss(m):
        if cls is unn.TransformerDecoder:
            return m.loss(ids)
        return m.mlm_loss(ids, ids, jnp.broadcast_to(jnp.arange(24) % 5 == 0, ids.shape))

    @nnx.jit
    def step(model, opt):
        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    before = step(model, opt)
    after = nnx.jit(loss)(model)
    assert np.isfinite(float(before)) and float(after) < float(before)
