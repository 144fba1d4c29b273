"""``unitscale-jax convert --from-torch``: a ``unit_scaling.TransformerDecoder`` state dict
(``make_fixture.py``) becomes a run whose logits are torch's, and which ``sample``, ``train``
(resume) and evaluation accept.

Tolerance of the logits: rtol 1e-5, atol 2e-6 * max(1, max|torch|), as in
``tests/reference/test_reference_modules.py`` (the same chain of float32 ops in two
frameworks; measured here: 2.4e-7 at max|logit| 0.97).
"""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from tests.interop.conftest import PT, SAFETENSORS, TORCH, one_line, run_cli, torch_config
from unitscale_jax import train
from unitscale_jax.train import from_torch
from unitscale_jax.train.data import load_data
from unitscale_jax.train.metrics import read_metrics

RTOL, ATOL = 1e-5, 2e-6


def assert_logits_match(run_dir):
    cfg, _, model, step = train.load_run(run_dir, log=lambda m: None)
    assert step == 0
    ids = jnp.asarray(TORCH["ids"])
    ours, ref = np.asarray(model(ids)), TORCH["logits"]
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref)
    atol = ATOL * max(1.0, float(np.abs(ref).max()))
    assert (diff <= atol + RTOL * np.abs(ref)).all(), f"max abs diff {diff.max():.3e}"
    np.testing.assert_allclose(float(model.loss(ids)), float(TORCH["loss"]), rtol=1e-6)
    return cfg, model


def params_of(run_dir):
    cfg = train.sample.read_run_config(run_dir)
    return train.sample.restore_params(run_dir, cfg, log=lambda m: None)[2]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tfds_dir):
    """The .safetensors fixture converted through the CLI (scanned layers, the default)."""
    base = tmp_path_factory.mktemp("convert")
    config = torch_config(base / "config.json", tfds_dir)
    rc = run_cli("convert", "--from-torch", SAFETENSORS, "--config", config,
                 "--run-dir", base / "run")
    assert rc == 0
    return base / "run"


def test_safetensors_logits_equal_torch(converted):
    cfg, _ = assert_logits_match(converted)
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.residual_mult, m.residual_attn_ratio,
            cfg.data.seq_len) == (16, 2, 2, 0.5, 2.0, 16)
    assert (converted / "checkpoints" / "0").is_dir()


def test_unrolled_layers_logits_equal_torch(tmp_path, tfds_dir):
    config = torch_config(tmp_path / "config.json", tfds_dir, scan_layers=False)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # left by a failed attempt: reusable
    assert run_cli("convert", "--from-torch", SAFETENSORS, "--config", config,
                   "--run-dir", tmp_path / "run") == 0
    cfg, model = assert_logits_match(tmp_path / "run")
    assert cfg.model.scan_layers is False and len(model.stack.layers) == 2


def test_pt_logits_equal_torch(tmp_path, tfds_dir):
    pytest.importorskip("torch", reason="reading a torch.save (.pt) file needs torch, which "
                        "the project does not depend on; the .safetensors tests cover the rest")
    config = torch_config(tmp_path / "config.json", tfds_dir)
    assert run_cli("convert", "--from-torch", PT, "--config", config,
                   "--run-dir", tmp_path / "run") == 0
    assert_logits_match(tmp_path / "run")


def test_sample_and_resume_and_evaluate(converted, capsys):
    capsys.readouterr()
    assert run_cli("sample", "--run-dir", converted, "--prompt", "The ", "--max-new-tokens",
                   "8", "--temperature", "0") == 0
    out, err = capsys.readouterr()
    assert out.startswith("The ") and "at step 0" in err
    # resume: the checkpoint at step 0 is the starting point; its validation loss is the
    # converted model's on the run's validation batches
    assert run_cli("train", "--config", converted / "config.json", "--steps", "2") == 0
    out, _ = capsys.readouterr()
    assert "resumed from the checkpoint at step 0" in out
    rows = read_metrics(converted / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    val0 = next(r["loss"] for r in rows if r["split"] == "validation" and r["step"] == 0)
    cfg, _, model, _ = train.load_run(converted, step=0, log=lambda m: None)
    batches = load_data(cfg, log=lambda m: None).eval_batches(cfg, cfg.training.eval_batches)
    sums = [(float(model.loss(b["inputs"], b["where"], targets=b["targets"])) * b["where"].sum(),
             b["where"].sum()) for b in batches]
    np.testing.assert_allclose(val0, sum(s for s, _ in sums) / sum(n for _, n in sums),
                               rtol=1e-5)


def _write(path, data):
    path.write_bytes(data)
    return path


def _safetensors(path, tensors):
    from safetensors.numpy import save_file
    save_file(tensors, str(path))
    return path


def _torch_state():
    from safetensors.numpy import load_file
    return load_file(str(SAFETENSORS))


@pytest.mark.parametrize("case, needles", [
    ("missing", ["nope.safetensors: no such file"]),
    ("directory", ["is a directory", "pass the state dict file"]),
    ("garbage", ["is not a readable safetensors file"]),
    ("suffix", ["unknown file type '.npz'"]),
    ("not_decoder", ["does not match the model", "missing embedding.weight",
                     "unexpected conv.weight"]),
    ("dropped", ["missing layers.1.mlp.linear_2.weight"]),
])
def test_bad_checkpoint(tmp_path, tfds_dir, capsys, case, needles):
    ckpt = {"missing": lambda: tmp_path / "nope.safetensors",
            "directory": lambda: tmp_path,
            "garbage": lambda: _write(tmp_path / "x.safetensors", b"not a safetensors file"),
            "suffix": lambda: _write(tmp_path / "x.npz", b"zz"),
            "not_decoder": lambda: _safetensors(tmp_path / "x.safetensors",
                                                {"conv.weight": np.zeros((2, 2), np.float32)}),
            "dropped": lambda: _safetensors(
                tmp_path / "x.safetensors",
                {k: v for k, v in _torch_state().items() if k != "layers.1.mlp.linear_2.weight"}),
            }[case]()
    config = torch_config(tmp_path / "config.json", tfds_dir)
    rc = run_cli("convert", "--from-torch", ckpt, "--config", config, "--run-dir", tmp_path / "r")
    one_line(capsys, rc, *needles)
    assert not (tmp_path / "r").exists()


def test_pt_without_torch(tmp_path, tfds_dir, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    config = torch_config(tmp_path / "config.json", tfds_dir)
    rc = run_cli("convert", "--from-torch", PT, "--config", config, "--run-dir", tmp_path / "r")
    one_line(capsys, rc, "needs torch, which is not installed", "save the state dict as "
             "safetensors")


def test_pt_that_is_not_a_state_dict(tmp_path, tfds_dir, capsys):
    torch = pytest.importorskip("torch", reason="writing a .pt file needs torch")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _write(tmp_path / "junk.pt", b"\x00junk")
    config = torch_config(tmp_path / "config.json", tfds_dir)
    rc = run_cli("convert", "--from-torch", tmp_path / "list.pt", "--config", config,
                 "--run-dir", tmp_path / "r")
    one_line(capsys, rc, "holds a list, not a state dict")
    rc = run_cli("convert", "--from-torch", tmp_path / "junk.pt", "--config", config,
                 "--run-dir", tmp_path / "r")
    one_line(capsys, rc, "is not a state dict torch.load can read")


@pytest.mark.parametrize("change, needles", [
    ({"hidden_size": 8}, ["does not match the model", "different shape or dtype",
                          "embedding.weight (260, 16) float32 (the model needs (260, 8) float32)",
                          "hidden_size 8"]),
    ({"layers": 3}, ["missing layers.2.mhsa.linear_o.weight"]),
    ({"vocab_size": 32}, ["vocab_size 32, but the tokenizer 'bytes' has 260 ids"]),
    ({"heads": 3}, ["hidden_size 16 is not divisible by heads 3"]),
    ({"layers": 0}, ["layers must be a positive integer, got 0"]),
    ({"hiden_size": 16}, ["unknown key(s) ['hiden_size']"]),
    ({"run": {"model": {"mlp": "gelu"}}}, ["run.model.mlp 'gelu' (the torch model has "
                                           "'swiglu') cannot be set"]),
    ({"run": {"data": {"seqlen": 3}}}, ["bad 'run' section", "unknown field(s) ['seqlen']"]),
])
def test_config_mismatch(tmp_path, tfds_dir, capsys, change, needles):
    config = torch_config(tmp_path / "config.json", tfds_dir)
    c = json.loads(config.read_text())
    c.update(change)
    config.write_text(json.dumps(c))
    rc = run_cli("convert", "--from-torch", SAFETENSORS, "--config", config,
                 "--run-dir", tmp_path / "r")
    one_line(capsys, rc, *needles)


def test_bad_config_file_and_run_dir(tmp_path, tfds_dir, capsys, converted):
    config = torch_config(tmp_path / "config.json", tfds_dir)
    argv = ["convert", "--from-torch", SAFETENSORS, "--config"]
    one_line(capsys, run_cli(*argv, tmp_path / "none.json", "--run-dir", tmp_path / "r"),
             "none.json: no such file")
    bad = _write(tmp_path / "bad.json", b"{hidden_size: 16")
    one_line(capsys, run_cli(*argv, bad, "--run-dir", tmp_path / "r"), "is not valid JSON")
    a_file = _write(tmp_path / "file", b"x")
    one_line(capsys, run_cli(*argv, config, "--run-dir", a_file), "is a file, not a directory; "
             "pass a new directory")
    one_line(capsys, run_cli(*argv, config, "--run-dir", converted), "already holds a run")
    one_line(capsys, run_cli("convert", "--config", config, "--run-dir", tmp_path / "r"),
             "the following arguments are required: --from-torch")


def test_decoder_map_covers_every_tensor_once():
    mapping = from_torch.decoder_map(2, 2, scan=True)
    assert set(mapping) == set(_torch_state())
    paths = [(t.path, t.layer) for t in mapping.values()]
    assert len(set(paths)) == len(paths)
    assert sorted(re.sub(r"\d", "#", k) for k in mapping).count(
        "layers.#.mhsa.linear_qkv.weight") == 2
