"""End-to-end runs through the Python API (``unitscale_jax.train.run``) and the CLI."""

import json
import math

import chex
import jax
import jax.numpy as jnp
import pytest

from unitscale_jax import nn, train
from unitscale_jax.cli import main

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2}


def _cfg(tmp_path, tfds_dir, name, *, model=None, optimizer=None, training=None, data=None):
    return train.get_preset("tiny").replace(
        model={**TINY, **(model or {})},
        data={"seq_len": 32, "data_dir": tfds_dir, **(data or {})},
        optimizer=optimizer or {},
        training={"steps": 50, "batch_size": 8, "eval_every": 25, "eval_batches": 2,
                  "run_dir": str(tmp_path / name), "progress": False, **(training or {})})


def _val(summary):
    return [r["loss"] for r in summary["history"] if r["split"] == "validation"]


def test_decoder_umup_trains_writes_outputs_and_samples(tmp_path, shared_dirs, capsys):
    cfg = _cfg(tmp_path, shared_dirs[0], "umup")
    s = train.run(cfg, quiet=True)
    val = _val(s)
    assert len(val) == 3  # steps 0, 25, 50
    assert val[-1] < val[0] - 1.5, val  # from ~ln(260) = 5.56 nats
    assert s["final_val_loss"] == val[-1]
    assert math.isclose(s["final_bits_per_byte"], val[-1] / math.log(2))  # bytes: 1 per token
    assert s["start_step"] == 0 and s["steps"] == 50 and s["tokens_per_s"] > 0
    run_dir = tmp_path / "umup"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 51))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = train.Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    assert saved == cfg
    assert (run_dir / "checkpoints" / "50").is_dir()

    capsys.readouterr()
    rc = main(["sample", "--run-dir", str(run_dir), "--prompt", "The ", "--max-new-tokens",
               "40", "--seed", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("The ") and len(out.encode()) > 20
    assert "step 50" in err


def test_decoder_sp_bf16_trains(tmp_path, shared_dirs):
    """Standard parametrization with plain optax AdamW, bf16 compute."""
    cfg = _cfg(tmp_path, shared_dirs[0], "sp", model={"parametrization": "sp"},
               optimizer={"lr": 3e-3}, training={"precision": "bf16", "checkpoint": False,
                                                  "plot": False, "tensorboard": False})
    s = train.run(cfg, quiet=True)
    val = _val(s)
    assert val[-1] < val[0] - 1.0, val
    assert s["checkpoint"] is None


def test_build_model_and_optimizer_api():
    cfg = train.resolve(train.get_preset("tiny"))
    from flax import nnx
    model = nnx.eval_shape(lambda: train.build_model(cfg, vocab_size=260))  # eager init is slow
    assert isinstance(model, nn.TransformerDecoder)
    assert model.config.d_model == 64 and model.config.max_seq_len == cfg.data.seq_len
    tx, schedule = train.build_optimizer(cfg, nn.param_info(model))
    params = jax.tree.map(lambda a: jnp.full(a.shape, 0.5, a.dtype),
                          nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state = jax.jit(tx.init)(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    chex.assert_trees_all_equal_shapes(updates, params)
    assert float(schedule(0)) == 0.0
    assert float(schedule(cfg.optimizer.warmup_steps)) == pytest.approx(cfg.optimizer.lr)
    assert train.default_lr("umup", "adamw") == 1.0 and train.default_lr("sp", "adamw") == 1e-3


def test_cli_flags_cover_every_field():
    from unitscale_jax.train.flags import parse_train_args
    cfg = parse_train_args(["--preset", "small", "--model", "decoder", "--parametrization", "sp",
                            "--optimizer", "sgd", "--lr", "2^-3", "--schedule", "exponential",
                            "--precision", "bf16", "--steps", "7", "--batch-size", "4",
                            "--seq-len", "16", "--eval-every", "3", "--seed", "5",
                            "--run-dir", "x", "--data", "a.txt", "--sharding", "fsdp",
                            "--no-scan-layers", "--d-head", "none", "--rope", "true"])
    assert cfg.preset == "small" and cfg.model.d_model == 128
    assert cfg.model.parametrization == "sp" and cfg.optimizer.name == "sgd"
    assert cfg.optimizer.lr == 0.125 and cfg.optimizer.schedule == "exponential"
    assert cfg.training.precision == "bf16" and cfg.training.steps == 7
    assert cfg.training.batch_size == 4 and cfg.data.seq_len == 16
    assert cfg.training.eval_every == 3 and cfg.training.seed == 5
    assert cfg.training.run_dir == "x" and cfg.data.data == "a.txt"
    assert cfg.training.sharding == "fsdp" and cfg.model.scan_layers is False
    assert cfg.model.d_head is None and cfg.model.rope is True
