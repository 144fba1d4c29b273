"""analysis.stats and analysis.records: statistics against direct numpy computation, CSV."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitscale_jax.analysis import FORMATS, stat_names, tensor_stats
from unitscale_jax.analysis.records import read_csv, select, write_csv
from unitscale_jax.precision import E4M3, E5M2, FP16


def _expected(x: np.ndarray) -> dict:
    a = np.abs(x.astype(np.float64))
    out = {"std": x.std(), "rms": np.sqrt(np.mean(a**2)), "mean_abs": a.mean(), "max_abs": a.max()}
    for f in FORMATS:
        out[f"{f.name}_underflow"] = np.mean((a > 0) & (a <= f.min_subnormal / 2))
        out[f"{f.name}_saturation"] = np.mean(a > f.max)
    return out


def test_stats_match_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 32)).astype(np.float32)
    # values chosen to underflow / saturate some formats and not others
    x.flat[:6] = [1e-9, -2e-8, 1e-6, 1000.0, -5e4, 7e4]
    x.flat[6] = 0.0
    got = tensor_stats(jnp.asarray(x))
    assert tuple(got) == stat_names()
    exp = _expected(x)
    for k in stat_names():
        np.testing.assert_allclose(float(got[k]), exp[k], rtol=1e-5, atol=1e-7, err_msg=k)
    n = x.size
    # FP16: 1e-9 and 2e-8 flush (<= 2^-25 ~ 2.98e-8), 1e-6 survives (subnormal),
    # 7e4 > 65504 saturates
    assert float(got["fp16_underflow"]) == pytest.approx(2 / n)
    assert float(got["fp16_saturation"]) == pytest.approx(1 / n)
    # E4M3 (max 448): 1000, 5e4, 7e4 saturate; tiny values flush (2^-10 ~ 9.8e-4)
    assert float(got["e4m3fn_saturation"]) == pytest.approx(3 / n)
    assert float(got["e4m3fn_underflow"]) >= 3 / n
    # E5M2 (max 57344): only 7e4 saturates
    assert float(got["e5m2_saturation"]) == pytest.approx(1 / n)


def test_stats_under_jit_and_vmap_and_bf16():
    x = jax.random.normal(jax.random.key(0), (4, 128, 16)) * 3.0
    eager = tensor_stats(x)
    jitted = jax.jit(tensor_stats)(x)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
    per_row = jax.vmap(tensor_stats)(x)
    np.testing.assert_allclose(per_row["rms"], jnp.sqrt(jnp.mean(x**2, axis=(1, 2))), rtol=1e-5)
    b = tensor_stats(x.astype(jnp.bfloat16))
    assert b["rms"].dtype == jnp.float32
    np.testing.assert_allclose(float(b["rms"]), float(eager["rms"]), rtol=1e-2)


def test_stats_formats_argument_and_bad_input():
    s = tensor_stats(jnp.ones((3,)), formats=("e4m3fnuz",))
    assert set(s) == {"std", "rms", "mean_abs", "max_abs", "e4m3fnuz_underflow",
                      "e4m3fnuz_saturation"}
    assert stat_names((FP16, E4M3, E5M2)) == stat_names()
    with pytest.raises(TypeError, match="floating-point"):
        tensor_stats(jnp.arange(4))
    with pytest.raises(ValueError, match="empty"):
        tensor_stats(jnp.zeros((0, 3)))


def test_csv_round_trip(tmp_path):
    records = [{"index": 0, "name": "embed", "kind": "fwd", "rms": 1.0000001, "flag": True},
               {"index": 1, "name": "L0.attn.q", "kind": "bwd", "rms": float("nan"), "flag": False},
               {"index": 2, "name": "logits", "kind": "fwd", "rms": 2.5e-12}]
    path = write_csv(records, str(tmp_path / "sub" / "t.csv"))
    back = read_csv(path)
    assert [r["name"] for r in back] == ["embed", "L0.attn.q", "logits"]
    assert back[0]["rms"] == 1.0000001 and back[2]["rms"] == 2.5e-12
    assert np.isnan(back[1]["rms"]) and back[0]["flag"] is True and back[2]["flag"] is None
    assert back[1]["index"] == 1 and isinstance(back[1]["index"], int)
    assert select(back, kind="fwd", name="logits") == [back[2]]
    with pytest.raises(ValueError, match="no records"):
        write_csv([], str(tmp_path / "e.csv"))
