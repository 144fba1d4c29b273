"""analysis.tracking: the statistics of every op output, op gradient, weight and weight grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitscale_jax import nn, ops
from unitscale_jax.analysis import KINDS, scale_stats, tensor_stats, track_scales, unroll
from unitscale_jax.analysis.naming import op_names, param_name, row_order

CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
IDS = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)


def _model(parametrization="umup", scan=False, seed=0, n_layers=2):
    return nn.TransformerDecoder(**dict(CFG, n_layers=n_layers), parametrization=parametrization,
                                 scan_layers=scan, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def umup_records():
    return track_scales(_model("umup"), IDS)


@pytest.fixture(scope="module")
def sp_records():
    return track_scales(_model("sp", n_layers=1), IDS)


def _by(records, kind):
    return {r["name"]: r for r in records if r["kind"] == kind}


def test_record_structure(umup_records):
    recs = umup_records
    assert {r["kind"] for r in recs} == set(KINDS)
    fwd, bwd = _by(recs, "fwd"), _by(recs, "bwd")
    assert list(fwd) == list(bwd)
    # forward order: embedding first, then the layers, final norm and logits last
    ops = list(fwd)
    assert ops[0] == "embed" and ops[-2:] == ["final_norm", "logits"]
    assert ops[1:4] == ["L0.attn.norm", "L0.attn.q", "L0.attn.k"]
    assert "L1.mlp.resid" in ops and len(ops) == 2 + 2 * 13 + 1
    w, wg = _by(recs, "weight"), _by(recs, "weight_grad")
    assert list(w) == list(wg)
    assert set(w) == {"embed.embedding", "readout.kernel"} | {
        f"L{l}.{m}.kernel" for l in range(2) for m in
        ("attn.qkv_proj", "attn.out_proj", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj")}
    # rows sorted; each weight sits just before the op it feeds
    idx = [r["index"] for r in recs]
    assert idx == sorted(idx)
    row = {r["name"]: r["index"] for r in recs}
    assert row["L0.attn.qkv_proj.kernel"] == row["L0.attn.q"] - 1
    assert row["L1.mlp.down_proj.kernel"] == row["L1.mlp.out"] - 1
    assert row["readout.kernel"] == row["logits"] - 1
    assert row["embed.embedding"] == row["embed"] - 1
    loss = recs[0]["loss"]
    assert all(r["loss"] == loss for r in recs) and 0.5 * np.log(64) < loss < 2 * np.log(64)
    for r in recs:
        assert r["max_abs"] >= r["rms"] >= r["mean_abs"] > 0
        for f in ("fp16", "e4m3fn", "e5m2"):
            assert 0.0 <= r[f"{f}_underflow"] <= 1.0 and 0.0 <= r[f"{f}_saturation"] <= 1.0


def test_stats_match_direct_computation(umup_records):
    model = _model("umup")
    c = model.config

    @nnx.jit
    def direct(m):
        logits = m(IDS)
        # gradient flowing into the logits: the (scaled) cross-entropy gradient
        g = jax.grad(lambda lg: ops.cross_entropy(lg[:, :-1], IDS[:, 1:], mult=c.loss_mult))(logits)
        grads = nnx.grad(lambda m: m.loss(IDS))(m)
        return tensor_stats(logits), tensor_stats(g), {
            "readout.kernel": (tensor_stats(m.readout.kernel[...]),
                               tensor_stats(grads.readout.kernel[...])),
            "L1.mlp.up_proj.kernel": (tensor_stats(m.stack.layers[1].mlp.up_proj.kernel[...]),
                                      tensor_stats(grads.stack.layers[1].mlp.up_proj.kernel[...]))}

    fwd_exp, bwd_exp, weights = direct(model)
    fwd, bwd = _by(umup_records, "fwd")["logits"], _by(umup_records, "bwd")["logits"]
    w, wg = _by(umup_records, "weight"), _by(umup_records, "weight_grad")
    for k in fwd_exp:
        np.testing.assert_allclose(fwd[k], float(fwd_exp[k]), rtol=1e-4, atol=1e-9, err_msg=k)
        np.testing.assert_allclose(bwd[k], float(bwd_exp[k]), rtol=1e-4, atol=1e-9, err_msg=k)
        for name, (value, grad) in weights.items():
            np.testing.assert_allclose(w[name][k], float(value[k]), rtol=1e-4, atol=1e-9)
            np.testing.assert_allclose(wg[name][k], float(grad[k]), rtol=1e-3, atol=1e-9)


def test_works_under_a_users_jit(sp_records):
    """``scale_stats`` traced inside the caller's ``nnx.jit`` gives track_scales' numbers."""
    model = _model("sp", n_layers=1)

    @nnx.jit
    def jitted(m, ids):
        return scale_stats(m, ids)

    loss, stats = jitted(model, IDS)
    assert set(stats) == set(KINDS) and len(stats["fwd"]) == 2 + 13 + 1
    np.testing.assert_allclose(loss, sp_records[0]["loss"], rtol=1e-6)
    names = dict(zip(stats["fwd"], op_names(list(stats["fwd"]))))
    for kind in ("fwd", "bwd"):
        rec = _by(sp_records, kind)
        for key, s in stats[kind].items():
            for k in ("rms", "max_abs", "fp16_underflow"):
                np.testing.assert_allclose(float(s[k]), rec[names[key]][k], rtol=1e-5, atol=1e-9)
    rec = _by(sp_records, "weight_grad")
    for key, s in stats["weight_grad"].items():
        np.testing.assert_allclose(float(s["std"]), rec[param_name(key.split("."))]["std"],
                                   rtol=1e-5)


def test_umup_is_unit_scaled_and_sp_is_not(umup_records, sp_records):
    # u-muP: op outputs and the gradients into them have RMS near 1. Known exceptions: the
    # readout's logits are fan_in^-1/2 at init (u-muP's 1/fan_in readout), and at init the
    # attention is near uniform so the gradients into q and k are small.
    for r in umup_records:
        lo, hi = (0.5, 2.0)
        if r["kind"] == "fwd" and r["name"] == "logits":
            assert r["rms"] == pytest.approx(CFG["d_model"] ** -0.5, rel=0.3)
            continue
        if r["kind"] == "bwd" and r["name"].endswith(("attn.q", "attn.k")):
            lo = 0.05
        if r["kind"] in ("weight", "weight_grad"):
            lo, hi = 0.2, 5.0
        assert lo < r["rms"] < hi, r
        assert r["fp16_underflow"] == 0.0 and r["e4m3fn_saturation"] == 0.0, r
    # SP: weights std 0.02 and weight gradients orders of magnitude below 1
    for r in sp_records:
        if r["kind"] == "weight_grad":
            assert r["rms"] < 0.05, r
        if r["kind"] == "weight":
            assert r["rms"] < 0.05, r
    sp_bwd = [r["rms"] for r in sp_records if r["kind"] == "bwd"]
    assert np.median(sp_bwd) < 1e-2
    assert max(r["fp16_underflow"] for r in sp_records) > 0  # SP gradients underflow FP16


def test_scanned_model_is_unrolled_with_the_same_values():
    scanned = _model("umup", scan=True, seed=5)
    flat = unroll(scanned)
    assert not flat.config.scan_layers and scanned.config.scan_layers
    np.testing.assert_array_equal(flat.stack.layers[1].mlp.down_proj.kernel[...],
                                  scanned.stack.layers.mlp.down_proj.kernel[...][1])
    np.testing.assert_allclose(flat.loss(IDS), scanned.loss(IDS), rtol=1e-5)
    assert unroll(flat) is flat


def test_naming_helpers():
    keys = ["000.embed", "001.attn.norm", "002.mlp.out", "003.attn.norm", "004.attn.q",
            "005.enc_out", "006.attn.norm", "007.cross_attn.q", "008.logits", "009.logits"]
    assert op_names(keys) == ["embed", "S0.L0.attn.norm", "S0.L0.mlp.out", "S0.L1.attn.norm",
                              "S0.L1.attn.q", "enc_out", "S1.L0.attn.norm",
                              "S1.L0.cross_attn.q", "logits", "logits#2"]
    assert param_name(("stack", "layers", 3, "mlp", "up_proj", "kernel")) == "L3.mlp.up_proj.kernel"
    assert (param_name(("encoder", "layers", 0, "attn", "out_proj", "kernel"))
            == "encoder.L0.attn.out_proj.kernel")
    assert param_name(("readout", "kernel")) == "readout.kernel"
    assert row_order(["embed", "L0.mlp.up", "logits"],
                     ["readout.kernel", "L0.mlp.up_proj.kernel", "other.w"]) == [
        "embed", "L0.mlp.up_proj.kernel", "L0.mlp.up", "readout.kernel", "logits", "other.w"]


def test_errors():
    lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no taps"):
        scale_stats(lin, jnp.ones((2, 4)), loss_fn=lambda m, x: jnp.sum(m(x)))
    with pytest.raises(TypeError, match="no loss method"):
        track_scales(lin, jnp.ones((2, 4)))
