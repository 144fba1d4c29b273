"""analysis.plot.plot_scales and the ``unitscale-jax analyse`` entry point."""

import math
import os

import matplotlib.image
import pytest

from unitscale_jax.analysis.cli import analyse_main, text_batch
from unitscale_jax.analysis.plot import _label_groups, format_lines, plot_scales
from unitscale_jax.analysis.records import read_csv, select
from unitscale_jax.precision import E4M3, E5M2, FP16
from unitscale_jax.train.errors import UsageError

PNG = b"\x89PNG\r\n\x1a\n"


def _records():
    recs = []
    for i, (name, kinds) in enumerate([("w.kernel", ("weight", "weight_grad")),
                                       ("op_a", ("fwd", "bwd")), ("op_b", ("fwd", "bwd"))]):
        for j, kind in enumerate(kinds):
            v = 2.0 ** (-4 * i - j)
            recs.append({"index": i, "name": name, "kind": kind, "rms": v, "std": v,
                         "mean_abs": v * 0.8, "max_abs": v * 8})
    recs[-1]["rms"] = 0.0          # a zero gradient cannot go on a log axis: skipped
    recs[-2]["std"] = float("nan")
    return recs


def test_plot_scales_writes_a_png(tmp_path):
    for metric in ("rms", "std", "max_abs"):
        path = plot_scales(_records(), str(tmp_path / "deep" / f"{metric}.png"), metric=metric,
                           title="t")
        with open(path, "rb") as f:
            assert f.read(8) == PNG
        img = matplotlib.image.imread(path)
        assert img.shape[0] > 300 and img.shape[1] > 800
    with pytest.raises(ValueError, match="metric"):
        plot_scales(_records(), str(tmp_path / "x.png"), metric="median")
    with pytest.raises(ValueError, match="no records"):
        plot_scales([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="unknown record kind"):
        plot_scales([dict(_records()[0], kind="grad")], str(tmp_path / "x.png"))


def test_format_lines():
    lines = {label: x for x, label, _, _ in format_lines()}
    assert lines["E4M3FN max"] == 448.0 and lines["E5M2 max"] == 57344.0
    assert lines["FP16 max"] == 65504.0 and lines["FP16 min subnormal"] == 2.0**-24
    assert lines["E4M3FN min subnormal"] == 2.0**-9 and lines["E5M2 min subnormal"] == 2.0**-16
    groups = {label for _, label, _ in _label_groups(format_lines((FP16, E4M3, E5M2)))}
    assert "FP16, E5M2 min normal" in groups and "E5M2, FP16 max" in groups


def test_text_batch():
    b = text_batch("builtin", 3, 20, 256, seed=1)
    assert b.shape == (3, 20) and b.dtype.name == "int32" and b.max() < 256
    r = text_batch("random", 2, 5, 10)
    assert r.shape == (2, 5) and r.max() < 10
    with pytest.raises(ValueError, match="vocab-size >= 256"):
        text_batch("builtin", 1, 4, 64)
    with pytest.raises(ValueError, match="--data /no/such/file.txt: no such file"):
        text_batch("/no/such/file.txt", 1, 4, 256)


def test_analyse_cli_writes_csv_and_png(tmp_path, capsys):
    out = str(tmp_path / "out")
    common = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16",
              "--batch-size", "2", "--vocab-size", "64", "--data", "random", "--out", out]
    assert analyse_main(["--model", "decoder", "--parametrization", "sp"] + common) == 0
    recs = read_csv(os.path.join(out, "scales_decoder_sp.csv"))
    assert {r["kind"] for r in recs} == {"fwd", "bwd", "weight", "weight_grad"}
    assert select(recs, name="logits", kind="fwd") and math.isfinite(recs[0]["loss"])
    with open(os.path.join(out, "scales_decoder_sp.png"), "rb") as f:
        assert f.read(8) == PNG
    assert "wrote" in capsys.readouterr().out



def test_analyse_cli_coord_check_wiring(tmp_path, monkeypatch, capsys):
    """The CLI passes its options to coord_check and writes its CSV and PNG (coord_check
    itself is tested in test_coord_check.py; a stand-in keeps this test fast)."""
    from unitscale_jax.analysis import coord as cc_mod
    calls = []

    def fake(parametrizations, widths, steps, **kw):
        calls.append((parametrizations, list(widths), steps, kw))
        return [{"parametrization": p, "width": w, "step": t, "index": i, "name": n,
                 "mean_abs": 1.0 + 0.01 * w * t * (p == "sp"), "rms": 1.0, "loss": 1.0,
                 "learning_rate": 0.1}
                for p in parametrizations for w in widths for t in range(steps + 1)
                for i, n in enumerate(["embed", "L0.mlp.out", "logits"])]

    monkeypatch.setattr(cc_mod, "coord_check", fake)
    out = str(tmp_path / "cc")
    assert analyse_main(["--coord-check", "--no-scales", "--widths", "16", "32", "--steps", "2",
                         "--n-layers", "3", "--vocab-size", "300", "--seq-len", "100",
                         "--batch-size", "5", "--out", out]) == 0
    (params, widths, steps, kw), = calls
    assert params == ("umup", "sp", "mup") and widths == [16, 32] and steps == 2
    assert kw["config"].n_layers == 3 and kw["config"].vocab_size == 300
    assert kw["seq_len"] == 64 and kw["batch_size"] == 5
    cc = read_csv(os.path.join(out, "coord_check.csv"))
    assert len(cc) == 3 * 2 * 3 * 3
    assert os.path.getsize(os.path.join(out, "coord_check.png")) > 1000
    # the ratio table at the last step: SP's stand-in grows 1 + 0.02 t w across 16 -> 32
    table = capsys.readouterr().out
    assert "coordinate check, step 2: max/min of mean_abs" in table
    sp_ratio = (1 + 0.02 * 32) / (1 + 0.02 * 16)
    assert "L0.mlp.out" in table and f"{sp_ratio:6.2f}" in table
    last = [ln for ln in table.splitlines() if ln.startswith("largest ratio")]
    assert last[0].split()[2:] == ["1.00", f"{sp_ratio:.2f}", "1.00"]
    calls.clear()
    assert analyse_main(["--coord-check", "--no-scales", "--full", "--coord-parametrizations",
                         "mup", "--coord-stat", "rms", "--out", out]) == 0
    assert calls[0][:3] == (("mup",), [64, 128, 256, 512, 1024, 2048], 5)


def test_analyse_cli_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="--seq-len must be >= 2"):
        analyse_main(["--seq-len", "1", "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="vocab-size >= 256"):
        analyse_main(["--vocab-size", "64", "--out", str(tmp_path)])
    with pytest.raises(UsageError, match="leaves nothing to do"):
        analyse_main(["--no-scales"])
    with pytest.raises(UsageError, match="invalid choice: 'xp'"):
        analyse_main(["--parametrization", "xp"])
