"""``unitscale-jax export`` and ``train --init-from``: a run's parameters to a safetensors file
(with their u-muP metadata and the model config) and back into a new run, bit for bit."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from tests.interop.conftest import one_line, run_cli
from unitscale_jax import nn
from unitscale_jax.train import Config, Trainer, build_model, interop
from unitscale_jax.train.metrics import read_metrics
from unitscale_jax.train.sample import read_run_config, restore_params

MODEL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--seq-len", "32",
         "--batch-size", "8", "--eval-batches", "2", "--no-progress", "--no-tensorboard",
         "--no-plot"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
    """A run trained for 3 steps (validation at 3), and its export through the CLI."""
    run_dir = tmp_path_factory.mktemp("export") / "a"
    assert run_cli("train", *MODEL, "--data-dir", tfds_dir, "--steps", "3", "--eval-every", "3",
                   "--run-dir", run_dir) == 0
    assert run_cli("export", "--run-dir", run_dir, "--format", "safetensors") == 0
    return run_dir


def _checkpoint(run_dir):
    cfg = read_run_config(run_dir)
    _, abstract_model, params, step = restore_params(run_dir, cfg, log=lambda m: None)
    return abstract_model, interop.flat_params(params), step


def _bitwise_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _param_info(model):
    info = nnx.to_pure_dict(nn.param_info(model))
    return {k: dataclasses.asdict(v) for k, v in
            interop.flat_params(info, is_leaf=lambda x: isinstance(x, nn.ParamInfo)).items()}


def test_export_holds_the_checkpoint_and_its_metadata(trained):
    arrays, meta = interop.read_params_file(trained / "model.safetensors")
    abstract_model, params, step = _checkpoint(trained)
    assert step == 3 and set(arrays) == set(params) and len(arrays) == 7
    assert "stack.layers.attn.qkv_proj.kernel" in arrays  # scanned: one array, layer axis first
    for name, value in params.items():
        assert _bitwise_equal(arrays[name], value), name
    assert meta["format"] == "unitscale_jax" and meta["step"] == "3"
    assert json.loads(meta["config"]) == json.loads((trained / "config.json").read_text())
    assert json.loads(meta["param_info"]) == _param_info(abstract_model)
    assert json.loads(meta["param_info"])["stack.layers.mlp.down_proj.kernel"] == {
        "type": "weight", "fan_in": 128, "depth": 2, "depth_exponent": 0.5}
    model = json.loads(meta["model"])
    assert (model["kind"], model["d_model"], model["n_layers"], model["vocab_size"],
            model["max_seq_len"], model["rope"]) == ("decoder", 32, 2, 260, 32, False)


def test_init_from_round_trip_is_bit_exact(trained, tmp_path):
    path = trained / "model.safetensors"
    _, meta = interop.read_params_file(path)
    given = Config.from_dict(json.loads((trained / "config.json").read_text()))
    cfg = given.replace(training={"run_dir": str(tmp_path / "b"), "init_from": str(path)})
    trainer = Trainer(cfg, quiet=True)
    try:
        assert trainer.build_state() == 0
        new = interop.flat_params(trainer.state["params"])
        abstract_model = nnx.eval_shape(lambda: build_model(trainer.cfg, 260))
    finally:
        trainer.close()
    _, params, _ = _checkpoint(trained)
    assert set(new) == set(params)
    for name, value in params.items():
        assert _bitwise_equal(new[name], value), name
    assert json.loads(meta["param_info"]) == _param_info(abstract_model)


def test_init_from_a_run_directory_equals_its_export(trained, tmp_path):
    """--init-from RUN_DIR starts at that run's newest checkpoint: the same parameters as
    --init-from its exported file, bit for bit."""
    given = Config.from_dict(json.loads((trained / "config.json").read_text()))
    states = {}
    for name, source in (("dir", trained), ("file", trained / "model.safetensors")):
        cfg = given.replace(training={"run_dir": str(tmp_path / name), "init_from": str(source)})
        trainer = Trainer(cfg, quiet=True)
        try:
            assert trainer.build_state() == 0
            states[name] = interop.flat_params(jax.device_get(trainer.state["params"]))
        finally:
            trainer.close()
    assert set(states["dir"]) == set(states["file"])
    for name, value in states["file"].items():
        assert _bitwise_equal(states["dir"][name], value), name


def test_train_init_from_cli_starts_at_the_exported_model(trained, tfds_dir, tmp_path, capsys):
    """Same data, same parameters: the new run's validation loss at step 0 is the old run's
    at its last step, exactly."""
    capsys.readouterr()
    b = tmp_path / "b"
    assert run_cli("train", *MODEL, "--data-dir", tfds_dir, "--steps", "1", "--eval-every", "1",
                   "--init-from", trained / "model.safetensors", "--run-dir", b) == 0
    assert "initialised the parameters from" in capsys.readouterr().out
    old = [r["loss"] for r in read_metrics(trained / "metrics.jsonl")
           if r["split"] == "validation" and r["step"] == 3]
    new = [r["loss"] for r in read_metrics(b / "metrics.jsonl")
           if r["split"] == "validation" and r["step"] == 0]
    assert len(old) == len(new) == 1 and new == old
    assert json.loads((b / "config.json").read_text())["training"]["init_from"] == str(
        trained / "model.safetensors")


def test_init_from_mismatch_lists_the_differences(trained, tfds_dir, tmp_path, capsys):
    path = trained / "model.safetensors"
    base = ["train", *MODEL, "--data-dir", tfds_dir, "--steps", "1"]
    rc = run_cli(*base, "--d-model", "16", "--init-from", path, "--run-dir", tmp_path / "c")
    one_line(capsys, rc, "--init-from", "does not match the model", "different shape or dtype",
             "embed.embedding (260, 32) float32 (the model needs (260, 16) float32)",
             "the source's model differs in: d_model 32 -> 16")
    arrays, _ = interop.read_params_file(path)
    arrays.pop("readout.kernel")
    arrays["extra.weight"] = np.zeros(3, np.float32)
    from safetensors.numpy import save_file
    save_file(arrays, str(tmp_path / "edited.safetensors"))
    rc = run_cli(*base, "--init-from", tmp_path / "edited.safetensors", "--run-dir",
                 tmp_path / "d")
    one_line(capsys, rc, "missing readout.kernel", "unexpected extra.weight")
    assert not (tmp_path / "d" / "config.json").exists()


@pytest.mark.parametrize("case, needles", [
    ("missing", ["none.safetensors does not exist; pass a run directory"]),
    ("directory", ["no config.json there"]),
    ("garbage", ["is not a readable safetensors file"]),
])
def test_init_from_bad_file(tfds_dir, tmp_path, capsys, case, needles):
    path = {"missing": tmp_path / "none.safetensors", "directory": tmp_path,
            "garbage": tmp_path / "g.safetensors"}[case]
    if case == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    rc = run_cli("train", *MODEL, "--data-dir", tfds_dir, "--steps", "1", "--init-from", path,
                 "--run-dir", tmp_path / "r")
    one_line(capsys, rc, *needles)


def _unwritable_dir(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere it has a file system that takes files
        return "/proc"
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o500)
    return str(d)


def test_export_bad_input(trained, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line(capsys, run_cli("export", "--run-dir", a_file), "is a file, not a directory; "
             "pass the run directory")
    one_line(capsys, run_cli("export", "--run-dir", tmp_path / "none"), "no config.json")
    one_line(capsys, run_cli("export", "--run-dir", trained, "--out",
                             tmp_path / "no" / "m.safetensors"), "does not exist")
    one_line(capsys, run_cli("export", "--run-dir", trained, "--out", a_file / "m.safetensors"),
             "is a file, not a directory")
    one_line(capsys, run_cli("export", "--run-dir", trained, "--out",
                             os.path.join(_unwritable_dir(tmp_path), "m.safetensors")),
             "cannot write in")
    one_line(capsys, run_cli("export", "--run-dir", trained, "--out", tmp_path),
             "is a directory; pass a file name")
    one_line(capsys, run_cli("export", "--run-dir", trained, "--format", "npz"),
             "invalid choice: 'npz'")
    out = tmp_path / "kept.safetensors"
    out.write_bytes(b"old")
    one_line(capsys, run_cli("export", "--run-dir", trained, "--out", out, "--step", "99"),
             "--step 99: no checkpoint at that step")
    assert out.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
