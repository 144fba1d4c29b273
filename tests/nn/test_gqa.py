"""Grouped-query and multi-query attention (``TransformerConfig.n_kv_heads``): the layout of
the fused projection, the KV cache, the encoder-decoder, the trainer's flag and bad input."""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.nn.helpers import flat_infos, flat_params, random_ids
from unitscale_jax import nn as unn
from unitscale_jax.cli import main
from unitscale_jax.params import ParamInfo
from unitscale_jax.train.errors import UsageError

V = 128
CFG = unn.TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)


def _loss(m, ids):
    return m.loss(ids)


def test_n_kv_heads_equal_to_n_heads_is_ordinary_attention():
    """``n_kv_heads = n_heads`` builds the same parameters (same init) and the same loss as
    the default, bit for bit, with the ``3 * d_model`` wide fused projection."""
    ids = random_ids(1, (2, 16), V)
    a = unn.TransformerDecoder(CFG, rngs=nnx.Rngs(0))
    b = unn.TransformerDecoder(CFG, n_kv_heads=4, rngs=nnx.Rngs(0))
    pa, pb = flat_params(a), flat_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    assert pa[("stack", "layers", "attn", "qkv_proj", "kernel")].shape == (2, 32, 96)
    la = nnx.jit(_loss)(a, ids)
    assert float(la) == float(nnx.jit(_loss)(b, ids))
    assert CFG.kv_heads == 4 and CFG.replace(n_kv_heads=2).kv_heads == 2


@pytest.mark.parametrize("n_kv", [1, 2])
def test_gqa_equals_multi_head_attention_with_shared_kv_heads(n_kv):
    """A GQA model computes what an ordinary model computes whose query heads of a group
    read copies of the group's k and v: the fused projection's columns are group-major
    ``[n_kv, group + 2, d_head]`` and query head ``h`` reads kv head ``h // group``."""
    ids = random_ids(2, (2, 16), V)
    gqa = unn.TransformerDecoder(CFG, n_kv_heads=n_kv, scan_layers=False, rngs=nnx.Rngs(3))
    mha = unn.TransformerDecoder(CFG, scan_layers=False, rngs=nnx.Rngs(3))
    g, dh = 4 // n_kv, 8
    for lg, lm in zip(gqa.stack.layers, mha.stack.layers):
        w = lg.attn.qkv_proj.kernel[...]
        assert w.shape == (32, (4 + 2 * n_kv) * dh)
        w = w.reshape(32, n_kv, g + 2, dh)
        q = w[:, :, :g].reshape(32, 4, dh)
        k = jnp.repeat(w[:, :, g], g, axis=1)               # [32, 4, dh]: head h <- h // g
        v = jnp.repeat(w[:, :, g + 1], g, axis=1)
        lm.attn.qkv_proj.kernel[...] = jnp.stack([q, k, v], axis=2).reshape(32, 96)
        for name in ("out_proj",):
            getattr(lm.attn, name).kernel[...] = getattr(lg.attn, name).kernel[...]
        for name in ("up_proj", "gate_proj", "down_proj"):
            getattr(lm.mlp, name).kernel[...] = getattr(lg.mlp, name).kernel[...]
    mha.embed.embedding[...] = gqa.embed.embedding[...]
    mha.readout.kernel[...] = gqa.readout.kernel[...]
    run = nnx.jit(lambda m, i: m(i))
    chex.assert_trees_all_close(run(gqa, ids), run(mha, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv, scan, rope", [(1, True, False), (2, False, True)])
def test_mqa_and_gqa_kv_cache_generation_matches_full_forward(n_kv, scan, rope):
    model = unn.TransformerDecoder(CFG, n_kv_heads=n_kv, scan_layers=scan, rope=rope,
                                   rngs=nnx.Rngs(0))
    cache = model.init_cache(3, 12)
    assert cache["self"]["k"].shape == (2, 3, 12, n_kv, 8)
    assert cache["self"]["v"].shape == (2, 3, 12, n_kv, 8)
    prompt = random_ids(7, (3, 5), V)
    tokens, logits = model.generate(prompt, 7, return_logits=True)
    np.testing.assert_array_equal(tokens[:, 5:], jnp.argmax(logits, -1))
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    chex.assert_trees_all_close(logits, full[:, 4:11], rtol=1e-4, atol=1e-5)
    _, new_cache = nnx.jit(lambda m, i, c: m.decode_step(i, c, 0))(model, prompt, cache)
    assert new_cache["self"]["k"].shape == (2, 3, 12, n_kv, 8)
    assert float(jnp.abs(new_cache["self"]["k"][:, :, :5]).min()) > 0   # written
    assert float(jnp.abs(new_cache["self"]["k"][:, :, 5:]).max()) == 0  # not yet


def test_gqa_metadata_and_sharding():
    """Fan-in stays d_model (u-muP's scales unchanged); the fused projection still shards
    over ``heads``."""
    model = unn.TransformerDecoder(CFG, n_kv_heads=2, rngs=nnx.Rngs(0))
    infos = flat_infos(model)
    assert infos[("stack", "layers", "attn", "qkv_proj", "kernel")] == ParamInfo("weight", 32, 2)
    assert infos[("stack", "layers", "attn", "out_proj", "kernel")] == ParamInfo("weight", 32, 2)
    specs = {tuple(p): s for p, s in
             nnx.to_flat_state(unn.partition_specs(model, unn.LOGICAL_RULES["tp"]))}
    assert specs[("stack", "layers", "attn", "qkv_proj", "kernel")] == P(None, None, "tensor")


def test_gqa_encoder_decoder():
    """Self and cross attention both take ``n_kv_heads``; cached generation still equals
    the full forward pass."""
    c = CFG.replace(rope=True, n_kv_heads=1)
    model = unn.TransformerEncoderDecoder(c, rngs=nnx.Rngs(0))
    params = flat_params(model)
    assert params[("decoder", "layers", "cross_attn", "kv_proj", "kernel")].shape == (2, 32, 16)
    assert params[("decoder", "layers", "cross_attn", "q_proj", "kernel")].shape == (2, 32, 32)
    assert params[("encoder", "layers", "attn", "qkv_proj", "kernel")].shape == (2, 32, 48)
    src = random_ids(3, (2, 10), V)
    src_mask = jnp.arange(10)[None, :] < jnp.array([[10], [7]])
    tokens, logits = model.generate(src, 5, start_id=1, src_mask=src_mask, return_logits=True)
    full = nnx.jit(lambda m, s, t: m(s, t, src_mask=src_mask))(model, src, tokens)
    chex.assert_trees_all_close(logits, full[:, :5], rtol=1e-4, atol=1e-5)
    cache = model.init_cache(jnp.zeros((2, 10, 32)), 6)
    assert cache["self"]["k"].shape == (2, 2, 6, 1, 8)


@pytest.mark.parametrize("bad", [3, 0, -2, 8, 2.0, True])
def test_bad_n_kv_heads(bad):
    with pytest.raises(ValueError, match=r"TransformerConfig: n_kv_heads must be a positive "
                                         r"divisor of n_heads \(4\)"):
        CFG.replace(n_kv_heads=bad)
    with pytest.raises(ValueError, match="n_kv_heads must be a positive divisor"):
        unn.MultiHeadAttention(32, 4, n_kv_heads=bad, rngs=nnx.Rngs(0))


def _one_line(capsys, rc, *needles):
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("bad", ["3", "0"])
def test_cli_bad_n_kv_heads(capsys, tmp_path, bad):
    rc = main(["train", "--n-heads", "4", "--n-kv-heads", bad, "--steps", "1",
               "--data-dir", str(tmp_path / "tfds"), "--run-dir", str(tmp_path / "r")])
    _one_line(capsys, rc, "n_kv_heads must be a positive divisor of n_heads (4)", bad)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_cli_trains_a_gqa_decoder(capsys, tmp_path):
    """``train --n-kv-heads 2`` runs, records the field, and its checkpoint holds the narrow
    projection; ``export`` then ``--init-from`` into a model with other kv heads fails on
    the shapes, naming them."""
    run_dir = tmp_path / "gqa"
    common = ["--d-model", "32", "--n-layers", "1", "--n-heads", "4", "--seq-len", "32",
              "--batch-size", "4", "--eval-batches", "1", "--no-progress", "--no-tensorboard",
              "--no-plot", "--data-dir", str(tmp_path / "tfds")]
    rc = main(["train", *common, "--n-kv-heads", "2", "--steps", "3", "--eval-every", "3",
               "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads((run_dir / "config.json").read_text())["model"]["n_kv_heads"] == 2
    exported = tmp_path / "gqa.safetensors"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(exported)]) == 0, \
        capsys.readouterr()
    from safetensors.numpy import load_file
    assert load_file(str(exported))["stack.layers.attn.qkv_proj.kernel"].shape == (1, 32, 64)
    capsys.readouterr()
    rc = main(["train", *common, "--steps", "1", "--init-from", str(exported),
               "--run-dir", str(tmp_path / "mha")])
    _one_line(capsys, rc, "qkv_proj.kernel (1, 32, 64)", "(1, 32, 96)")


def test_converted_torch_model_has_no_gqa(tmp_path):
    """``unit_scaling``'s decoder has no grouped-query attention: asking a conversion for
    ``n_kv_heads`` is a clear error."""
    from unitscale_jax.train import from_torch
    path = tmp_path / "torch.json"
    path.write_text(json.dumps({"hidden_size": 32, "vocab_size": 260, "layers": 1, "heads": 4,
                                "run": {"model": {"n_kv_heads": 2}}}))
    with pytest.raises(UsageError, match=r"run.model.n_kv_heads 2 \(the torch model has None\)"):
        from_torch.read_config(path, tmp_path / "run")
