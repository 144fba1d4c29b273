"""The policy plugged into unitscale_jax.nn's decoder through its precision hook."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitscale_jax.nn import TransformerDecoder
from unitscale_jax.precision import UMUP_LARGE_RUN_OVERRIDES, get_policy

CFG = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, scan_layers=False)
IDS = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)


def _loss_and_grads(policy, **kw):
    model = TransformerDecoder(**CFG, **kw, precision=policy, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return nnx.merge(graphdef, p, rest).loss(IDS)

    fn = jax.jit(jax.value_and_grad(loss))
    return fn(params), fn.lower(params).as_text()


def test_fp32_policy_is_a_no_op():
    (l0, g0), _ = _loss_and_grads(None)
    (l1, g1), _ = _loss_and_grads(get_policy("fp32"))
    chex.assert_trees_all_equal((l0, g0), (l1, g1))


def test_fp8_real_matches_fp8_sim_in_a_decoder():
    (ls, gs), sim_text = _loss_and_grads(get_policy("fp8-sim"))
    (lr, gr), real_text = _loss_and_grads(get_policy("fp8", compute_dtype=jnp.float32))
    np.testing.assert_allclose(float(lr), float(ls), rtol=1e-5)
    chex.assert_trees_all_close(gr, gs, rtol=1e-3, atol=1e-4)
    (l32, _), _ = _loss_and_grads(None)
    assert float(lr) != float(l32) and abs(float(lr) - float(l32)) < 0.05 * float(l32)
    dots = [ln for ln in real_text.splitlines() if "stablehlo.dot_general" in ln]
    # (qkv, out, up, gate, down) + readout = 6 projections, 3 matmuls each.
    assert sum("f8E4M3FN>" in ln for ln in dots) == 18
    assert sum("f8E5M2>" in ln for ln in dots) == 12
    assert "f8E4M3FN" not in sim_text


def test_bf16_fp8_preset_with_large_run_overrides():
    (loss, grads), text = _loss_and_grads(get_policy("fp8", overrides=UMUP_LARGE_RUN_OVERRIDES))
    assert bool(jnp.isfinite(loss)) and all(bool(jnp.isfinite(g).all())
                                            for g in jax.tree.leaves(grads))
    dots = [ln for ln in text.splitlines() if "stablehlo.dot_general" in ln]
    # attn_out and ffn_down now run in bf16: 4 projections in float8.
    assert sum("f8E4M3FN>" in ln for ln in dots) == 12


def test_stochastic_rounding_runs_through_every_model_and_head():
    """Every projection, the output heads included, receives a key: the models' losses run
    under a stochastic-rounding policy, depend on the key, and repeat for the same key."""
    from unitscale_jax.nn import TransformerEncoder, TransformerEncoderDecoder

    pol = get_policy("fp8-sim", rounding="stochastic")
    cfg = {k: v for k, v in CFG.items() if k != "scan_layers"}
    ids, labels = IDS[:, :8], IDS[:, 8:]
    models = {
        "decoder": (TransformerDecoder(**cfg, precision=pol, rngs=nnx.Rngs(0)),
                    lambda m, k: m.loss(ids, rng=k)),
        "encoder_mlm": (TransformerEncoder(**cfg, precision=pol, n_classes=3, n_token_classes=4,
                                           rngs=nnx.Rngs(0)),
                        lambda m, k: m.mlm_loss(ids, labels, rng=k)),
        "encoder_cls": (None, lambda m, k: m.classification_loss(ids, labels[:, 0] % 3, rng=k)),
        "encoder_tag": (None, lambda m, k: m.token_classification_loss(ids, labels % 4, rng=k)),
        "encoder_decoder": (TransformerEncoderDecoder(**cfg, precision=pol, rngs=nnx.Rngs(0)),
                            lambda m, k: m.loss(ids, labels, rng=k)),
    }
    model = None
    for name, (m, fn) in models.items():
        model = m if m is not None else model
        run = nnx.jit(fn)
        a, b, c = (float(run(model, jax.random.key(s))) for s in (1, 2, 1))
        assert np.isfinite(a) and a == c and a != b, (name, a, b, c)
        with np.testing.assert_raises_regex(ValueError, "stochastic rounding: pass rng"):
            fn(model, None)
