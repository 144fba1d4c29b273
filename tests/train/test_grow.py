"""``unitscale-jax grow``: the grown model's parameters come from the source run by the
documented rule (``train.grow``), the new run trains with the source's learning rate and
resumes, the loss right after growing is measured, and bad input is one line."""

import json
import shutil

import numpy as np
import pytest
from flax import nnx

from tests.interop.conftest import one_line, run_cli
from unitscale_jax.train import build, interop
from unitscale_jax.train.config import Config, resolve
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.grow import (
    GROWN_FILE,
    grow_params,
    grown_config,
    parse_factor,
    source_layer,
)
from unitscale_jax.train.metrics import read_metrics
from unitscale_jax.train.sample import read_run_config, restore_params

MODEL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--seq-len", "32",
         "--batch-size", "8", "--eval-batches", "2", "--no-progress", "--no-tensorboard",
         "--no-plot"]
VOCAB = 260


def _config(**model) -> Config:
    return Config().replace(model={"d_model": 16, "n_layers": 2, "n_heads": 2, **model})


def _random_params(cfg: Config):
    model = build.build_model(resolve(cfg), VOCAB)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("mode, expected", [("duplicate", [0, 0, 1, 1, 2, 2]),
                                            ("interleave", [0, 1, 2, 0, 1, 2])])
def test_source_layer(mode, expected):
    assert [source_layer(i, 3, 2, mode) for i in range(6)] == expected


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("mode", ["duplicate", "interleave"])
def test_grown_layers_are_copies_of_the_source_layers(scan, mode):
    """Layer i of the 6-layer model is layer i // 3 (duplicate) or i % 2 (interleave) of the
    2-layer one, in both stack layouts; every other parameter is the source's."""
    cfg = _config(scan_layers=scan)
    params = _random_params(cfg)
    grown = grow_params(params, cfg, 3, mode, vocab_size=VOCAB)
    old, new = interop.flat_params(params), interop.flat_params(grown)
    abstract = nnx.eval_shape(lambda: build.build_model(resolve(grown_config(cfg, 3)), VOCAB))
    assert set(new) == set(interop.flat_params(nnx.to_pure_dict(nnx.state(abstract,
                                                                          nnx.Param))))
    want = [i // 3 for i in range(6)] if mode == "duplicate" else [i % 2 for i in range(6)]
    n_layer_params = 0
    for name, value in new.items():
        value = np.asarray(value)
        if not name.startswith("stack.layers."):
            np.testing.assert_array_equal(value, np.asarray(old[name]))
            continue
        n_layer_params += 1
        if scan:
            assert value.shape[0] == 6
            for i, src in enumerate(want):
                np.testing.assert_array_equal(value[i], np.asarray(old[name])[src])
        else:
            i, tail = name.split(".", 3)[2], name.split(".", 3)[3]
            np.testing.assert_array_equal(
                value, np.asarray(old[f"stack.layers.{want[int(i)]}.{tail}"]))
    assert n_layer_params == (len([k for k in old if k.startswith("stack.layers.")])
                              * (1 if scan else 3))
    # the two copies of a trained layer differ from each other only where their sources do
    assert not np.array_equal(np.asarray(old["stack.layers.attn.qkv_proj.kernel"][0]
                                         if scan else old["stack.layers.0.attn.qkv_proj.kernel"]),
                              np.asarray(old["stack.layers.attn.qkv_proj.kernel"][1]
                                         if scan else old["stack.layers.1.attn.qkv_proj.kernel"]))


@pytest.mark.parametrize("factor", [1, 0, -2, 2.0, True])
def test_factor_must_be_an_integer_of_at_least_two(factor):
    cfg = _config()
    with pytest.raises(UsageError, match="integer >= 2"):
        grow_params(_random_params(cfg), cfg, factor)


@pytest.mark.parametrize("text, value", [("2x", 2), ("3", 3), (" 4X ", 4)])
def test_parse_factor(text, value):
    assert parse_factor(text) == value


@pytest.mark.parametrize("text", ["1x", "1.5x", "x2", "two", "0"])
def test_parse_factor_rejects(text):
    with pytest.raises(UsageError, match="--depth .*integer >= 2"):
        parse_factor(text)


def test_width_and_other_kinds_are_refused():
    cfg = _config()
    params = _random_params(cfg)
    with pytest.raises(UsageError, match="width growth is not supported"):
        grow_params(params, cfg, 2, width_factor=2)
    with pytest.raises(UsageError, match="--model encdec run; grow works on decoder and encoder"):
        grow_params(params, cfg.replace(model={"kind": "encdec"}), 2)
    with pytest.raises(UsageError, match="--mode 'stack': use one of duplicate, interleave"):
        grow_params(params, cfg, 2, "stack")


@pytest.fixture(scope="module")
def source(tmp_path_factory, shared_dirs):
    """A finished 2-layer decoder run (3 steps, validation at 3)."""
    run_dir = tmp_path_factory.mktemp("grow") / "src"
    assert run_cli("train", *MODEL, "--data-dir", shared_dirs[0], "--steps", "3",
                   "--eval-every", "3", "--run-dir", run_dir) == 0
    return run_dir


def _validation(run_dir, step):
    rows = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")
            if r["split"] == "validation" and r["step"] == step]
    assert len(rows) == 1, rows
    return rows[0]


def test_grow_cli_writes_a_run_that_trains_with_the_same_lr_and_resumes(source, tmp_path,
                                                                        capsys):
    new = tmp_path / "grown"
    capsys.readouterr()
    assert run_cli("grow", "--from", source, "--depth", "2x", "--mode", "interleave",
                   "--run-dir", new, "--steps", "2") == 0
    assert f"train it with: unitscale-jax train --config {new / 'config.json'}" in \
        capsys.readouterr().out
    old_cfg, new_cfg = read_run_config(source), read_run_config(new)
    assert new_cfg.model.n_layers == 4 and new_cfg.training.steps == 2
    assert new_cfg.optimizer == old_cfg.optimizer  # the same learning rate and schedule
    assert resolve(new_cfg).optimizer.lr == resolve(old_cfg).optimizer.lr
    assert new_cfg.replace(model={"n_layers": 2}, training=dict(
        steps=3, run_dir=str(source), init_from=None)) == old_cfg
    # the grown file: the source's checkpoint, its layers repeated (interleave: 0 1 0 1)
    arrays, meta = interop.read_params_file(new / GROWN_FILE)
    _, _, params, step = restore_params(source, resolve(old_cfg), log=lambda m: None)
    old = interop.flat_params(params)
    assert step == 3 and json.loads(meta["growth"])["mode"] == "interleave"
    for name, value in old.items():
        want = np.asarray(value)
        if name.startswith("stack.layers."):
            want = want[[0, 1, 0, 1]]
        np.testing.assert_array_equal(arrays[name], want, err_msg=name)

    # train it: the loss right after growing is its validation loss at step 0
    assert run_cli("train", "--config", new / "config.json") == 0
    out = capsys.readouterr().out
    assert f"initialised the parameters from {new / GROWN_FILE}" in out
    before, after, trained = _validation(source, 3), _validation(new, 0), _validation(new, 2)
    with capsys.disabled():
        print(f"\nvalidation loss: source at its end {before:.4f}, grown at step 0 {after:.4f}, "
              f"after 2 steps {trained:.4f}")
    assert np.isfinite(after) and after != before  # taus change with depth (train.grow)
    assert trained < after
    # rerunning with more steps resumes from its checkpoint at step 2
    assert run_cli("train", "--config", new / "config.json", "--steps", "3",
                   "--eval-every", "3") == 0
    assert "resum" in capsys.readouterr().out.lower()
    steps = [r["step"] for r in read_metrics(new / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3]


def test_grow_cli_bad_input(source, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(source, unfinished)
    c = json.loads((unfinished / "config.json").read_text())
    c["training"]["steps"] = 5
    (unfinished / "config.json").write_text(json.dumps(c))
    capsys.readouterr()
    one_line(capsys, run_cli("grow", "--from", unfinished, "--depth", "2x", "--run-dir",
                             tmp_path / "a"),
             f"--from {unfinished} is not finished (its newest checkpoint is at step 3 of 5)")
    assert not (tmp_path / "a").exists()
    encdec = tmp_path / "encdec"
    shutil.copytree(source, encdec)
    c["training"]["steps"], c["model"]["kind"] = 3, "encdec"
    (encdec / "config.json").write_text(json.dumps(c))
    one_line(capsys, run_cli("grow", "--from", encdec, "--depth", "2x", "--run-dir",
                             tmp_path / "b"), "--model encdec run")
    for depth in ("1x", "1.5x"):
        one_line(capsys, run_cli("grow", "--from", source, "--depth", depth, "--run-dir",
                                 tmp_path / "c"), f"--depth '{depth}'", "integer >= 2")
    one_line(capsys, run_cli("grow", "--from", source, "--depth", "2x", "--width", "2x",
                             "--run-dir", tmp_path / "d"), "width growth is not supported")
    one_line(capsys, run_cli("grow", "--from", source, "--depth", "2x", "--run-dir", source),
             "is the source run")
    assert not any((tmp_path / x).exists() for x in "abcd")
