"""``TransformerConfig.attention_block_q`` / ``attention_block_kv``: they reach the attention
op of every layer (self and cross attention, u-muP and SP), and bad values are clear errors
(``ValueError`` in the config, ``UsageError`` in the CLI)."""

import jax.numpy as jnp
import pytest
from flax import nnx

from tests.nn.helpers import random_ids
from unitscale_jax import nn as unn
from unitscale_jax.cli import main
from unitscale_jax.ops import plain

CFG = unn.TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)


@pytest.mark.parametrize("parametrization", ["umup", "sp"])
def test_block_sizes_reach_the_op(monkeypatch, parametrization):
    seen = []
    real = plain.dot_product_attention

    def spy(*args, **kw):
        seen.append((kw["implementation"], kw["block_q"], kw["block_kv"]))
        return real(*args, **kw)

    monkeypatch.setattr(plain, "dot_product_attention", spy)
    cfg = CFG.replace(attention_impl="chunked", attention_block_q=4, attention_block_kv=8,
                      parametrization=parametrization, scan_layers=False)
    ids = random_ids(0, (2, 12), 64)
    unn.TransformerDecoder(cfg, rngs=nnx.Rngs(0))(ids)
    unn.TransformerEncoderDecoder(cfg, rngs=nnx.Rngs(0))(ids, ids)
    assert len(seen) == 1 + 3    # decoder self; encoder self, decoder self and cross
    assert set(seen) == {("chunked", 4, 8)}
    seen.clear()
    unn.TransformerDecoder(CFG.replace(parametrization=parametrization), rngs=nnx.Rngs(0))(ids)
    assert set(seen) == {("auto", plain.ATTENTION_BLOCK_Q, plain.ATTENTION_BLOCK_KV)}


def test_small_blocks_same_loss():
    """Blocks of 4 and 8 keys (so 3 and 2 blocks of 12 tokens) give the default's loss."""
    ids = random_ids(1, (2, 12), 64)
    loss = nnx.jit(lambda m, i: m.loss(i))
    small = unn.TransformerDecoder(CFG.replace(attention_impl="chunked", attention_block_q=4,
                                               attention_block_kv=8), rngs=nnx.Rngs(0))
    dense = unn.TransformerDecoder(CFG.replace(attention_impl="xla"), rngs=nnx.Rngs(0))
    assert jnp.allclose(loss(small, ids), loss(dense, ids), rtol=1e-6)


@pytest.mark.parametrize("field", ["attention_block_q", "attention_block_kv"])
@pytest.mark.parametrize("bad", [0, -8, 1.5, True])
def test_bad_block_sizes(field, bad):
    with pytest.raises(ValueError, match=f"TransformerConfig: {field} must be a positive int, "
                                         f"got {bad!r}"):
        CFG.replace(**{field: bad})


def test_cli_bad_block_size(capsys, tmp_path):
    rc = main(["train", "--attention-block-kv", "0", "--steps", "1", "--data-dir",
               str(tmp_path / "tfds"), "--run-dir", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "attention_block_kv must be a positive int, got 0" in err
    rc = main(["train", "--attention-impl", "pallas_tpu", "--attention-block-q", "12",
               "--steps", "1", "--data-dir", str(tmp_path / "tfds"), "--run-dir",
               str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert rc == 2 and "attention_block_q a multiple of 8" in err, (out, err)
