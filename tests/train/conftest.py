"""Helpers for the trainer tests: small model flags, a shared tfds directory and JAX
compilation cache for subprocesses, and running the command in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A model small enough that a step takes milliseconds on one CPU core.
SMALL = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "32",
         "--batch-size", "8", "--eval-batches", "2", "--no-progress", "--no-tensorboard",
         "--no-plot"]


@pytest.fixture(scope="session")
def shared_dirs(tmp_path_factory):
    """(tfds data dir, compilation cache dir) shared by the tests of one worker."""
    base = tmp_path_factory.mktemp("train_shared")
    return str(base / "tfds"), str(base / "jax_cache")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shared_dirs):
    """``trained_run(kind)``: ``(config, summary)`` of a tiny run of ``--model kind`` (d_model
    32, one layer, seq_len 32) trained for 50 steps with a checkpoint at the end; each kind is
    trained once per session and shared by the tests that read it."""
    from unitscale_jax import train
    base, runs = tmp_path_factory.mktemp("trained_runs"), {}

    def get(kind):
        if kind not in runs:
            cfg = train.get_preset("tiny").replace(
                model={"kind": kind, "d_model": 32, "n_layers": 1, "n_heads": 2},
                data={"seq_len": 32, "data_dir": shared_dirs[0]},
                training={"steps": 50, "batch_size": 8, "eval_every": 50, "eval_batches": 2,
                          "run_dir": str(base / kind), "progress": False,
                          "tensorboard": False, "plot": False})
            runs[kind] = (cfg, train.run(cfg, quiet=True))
        return runs[kind]

    return get


def subprocess_env(cache_dir, devices=None):
    env = dict(os.environ)
    env.update({"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache_dir,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    if devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={devices}").strip()
    return env


def train_cmd(*args):
    return [sys.executable, "-m", "unitscale_jax.train", *map(str, args)]


def run_train(args, cache_dir, *, env_extra=None, timeout=300):
    env = subprocess_env(cache_dir)
    env.update(env_extra or {})
    return subprocess.run(train_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_rows(run_dir):
    """Rows of metrics.jsonl (a line being written while we read is skipped)."""
    from unitscale_jax.train.metrics import read_metrics
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def curves(run_dir):
    """The exact loss curves of a run: train losses and validation losses by step."""
    rows = read_rows(run_dir)
    return ([(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows
             if r["split"] == "train"],
            [(r["step"], r["loss"]) for r in rows if r["split"] == "validation"])
