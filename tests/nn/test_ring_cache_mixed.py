"""Mixed local / global attention patterns keep grouped KV caches: the local layers' ring
buffers hold ``min(W, length)`` entries, the global layers' the full length; cached
generation and decoding (scanned or unrolled, u-muP or SP, GQA) equal the full forward pass;
the cache saves the expected bytes; a wrongly shaped cache fails clearly."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn.helpers import random_ids
from unitscale_jax import nn as unn
from unitscale_jax.nn.transformer import cache_layout

W, PROMPT, NEW = 4, 5, 9
TOTAL = PROMPT + NEW
CFG = unn.TransformerConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                            max_seq_len=32, attention_window=W, rope=True)
# pattern -> (layer windows, number of local layers) for CFG's 3 layers
PATTERNS = {"local,global": ((W, None, W), 2), "global,local,local": ((None, W, W), 2)}


def test_cache_layout_places_each_layer_in_its_group():
    assert cache_layout((W, None, W)) == (("local", 0), ("global", 0), ("local", 1))
    assert cache_layout((None, W, W, None)) == (("global", 0), ("local", 0), ("local", 1),
                                                 ("global", 1))
    assert cache_layout((W, W)) is None and cache_layout((None, None)) is None


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_local_layers_keep_w_slots_and_global_ones_the_full_length(pattern):
    windows, n_local = PATTERNS[pattern]
    assert CFG.replace(attention_pattern=pattern).layer_windows(3) == windows
    model = unn.TransformerDecoder(CFG, attention_pattern=pattern, rngs=nnx.Rngs(0))
    cache = model.init_cache(2, TOTAL)["self"]
    kv, d = CFG.kv_heads, CFG.head_dim
    assert jax.tree.map(jnp.shape, cache) == {
        "local": {"k": (n_local, 2, W, kv, d), "v": (n_local, 2, W, kv, d)},
        "global": {"k": (3 - n_local, 2, TOTAL, kv, d), "v": (3 - n_local, 2, TOTAL, kv, d)}}
    # shorter sequences than the window: the ring shrinks to the length
    short = model.init_cache(2, 3)["self"]
    assert short["local"]["k"].shape[2] == 3 and short["global"]["k"].shape[2] == 3
    # memory: each local layer saves (TOTAL - W) slots of k and of v
    everything_full = unn.TransformerDecoder(CFG, attention_window=None, rngs=nnx.Rngs(0))
    nbytes = lambda c: sum(a.nbytes for a in jax.tree.leaves(c))  # noqa: E731
    full_bytes = nbytes(everything_full.init_cache(2, TOTAL))
    saved = n_local * 2 * 2 * (TOTAL - W) * kv * d * jnp.dtype(CFG.dtype).itemsize
    assert full_bytes - nbytes(model.init_cache(2, TOTAL)) == saved > 0


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("parametrization", ["umup", "sp"])
@pytest.mark.parametrize("scan", [True, False])
def test_generation_equals_full_forward(pattern, parametrization, scan):
    """Prompt 5 + 9 new tokens: the local layers' rings of 4 wrap three times."""
    model = unn.TransformerDecoder(CFG, attention_pattern=pattern, scan_layers=scan,
                                   parametrization=parametrization, rngs=nnx.Rngs(0))
    prompt = random_ids(7, (2, PROMPT), 64)
    tokens, logits = model.generate(prompt, NEW, return_logits=True)
    np.testing.assert_array_equal(tokens[:, PROMPT:], jnp.argmax(logits, -1))
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    chex.assert_trees_all_close(logits, full[:, PROMPT - 1:TOTAL - 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pattern, scan", [("local,global", True), ("global,local,local", False)])
def test_decode_steps_equal_full_forward_and_keep_the_cache_shapes(pattern, scan):
    """A prompt of 6 into rings of 4 (only its last 4 kept), then 4 single steps: every
    step's logits equal the full forward pass's over the 10 tokens; the caches keep their
    shapes; every ring slot holds a key, the global caches the 10 written so far only."""
    model = unn.TransformerDecoder(CFG, attention_pattern=pattern, scan_layers=scan,
                                   rngs=nnx.Rngs(0))
    ids = random_ids(3, (2, TOTAL), 64)
    cache = model.init_cache(2, TOTAL)
    shapes = jax.tree.map(jnp.shape, cache)
    step = nnx.jit(lambda m, i, c, p: m.decode_step(i, c, p, scale_seq_len=10))
    logits, cache = step(model, ids[:, :6], cache, 0)
    got = [logits]
    for p in range(6, 10):
        logits, cache = step(model, ids[:, p:p + 1], cache, p)
        got.append(logits)
        assert jax.tree.map(jnp.shape, cache) == shapes
    full = nnx.jit(lambda m, t: m(t))(model, ids[:, :10])
    chex.assert_trees_all_close(jnp.concatenate(got, axis=1), full, rtol=1e-4, atol=1e-5)
    k_local, k_global = cache["self"]["local"]["k"], cache["self"]["global"]["k"]
    assert float(jnp.abs(k_local).min()) > 0                    # every slot holds a key
    assert float(jnp.abs(k_global[:, :, :10]).min()) > 0        # positions 0..9 written
    assert float(jnp.abs(k_global[:, :, 10:]).max()) == 0       # the rest not yet


def test_encoder_decoder_with_a_mixed_pattern():
    """The decoder of an encoder-decoder groups its self-attention cache the same way (its
    cross-attention cache stays stacked); cached generation equals the full forward pass."""
    model = unn.TransformerEncoderDecoder(CFG, attention_pattern="local,global", rope=True,
                                          rngs=nnx.Rngs(0))
    src = random_ids(3, (2, 10), 64)
    tokens, logits = model.generate(src, 8, start_id=1, return_logits=True)
    full = nnx.jit(lambda m, s, t: m(s, t))(model, src, tokens)
    chex.assert_trees_all_close(logits, full[:, :8], rtol=1e-4, atol=1e-5)
    cache = model.init_cache(jnp.zeros((2, 10, 32)), 9)
    assert cache["self"]["local"]["k"].shape == (2, 2, W, 2, 8)
    assert cache["self"]["global"]["k"].shape == (1, 2, 9, 2, 8)
    assert cache["cross"]["k"].shape == (3, 2, 10, 2, 8)


@pytest.mark.parametrize("scan", [True, False])
def test_an_ungrouped_cache_for_a_mixed_pattern_fails_clearly(scan):
    model = unn.TransformerDecoder(CFG, attention_pattern="local,global", scan_layers=scan,
                                   rngs=nnx.Rngs(0))
    stacked = unn.TransformerDecoder(CFG, attention_window=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"mix local and global attention, so the self-attention "
                                         r"KV cache is grouped by \['global', 'local'\] "
                                         r"\(got \['k', 'v'\]\); make it with the model's "
                                         r"init_cache"):
        model.decode_step(jnp.ones((2, 1), jnp.int32), stacked.init_cache(2, TOTAL), 0,
                          scale_seq_len=TOTAL)
