"""Shared pieces of the interop tests: the torch fixture, a tiny trained run, one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from unitscale_jax.cli import main

HERE = Path(__file__).resolve().parent
SAFETENSORS = HERE / "torch_decoder.safetensors"
PT = HERE / "torch_decoder.pt"
with np.load(HERE / "torch_decoder.npz") as _z:
    TORCH = {k: _z[k] for k in _z.files}

# the run settings every converted / trained test run uses: tiny and quiet
QUIET = {"batch_size": 4, "eval_batches": 1, "eval_every": 2, "steps": 2, "progress": False,
         "tensorboard": False, "plot": False, "async_checkpointing": False}


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A tfds data directory shared by the tests of one worker (the built-in corpus)."""
    return str(tmp_path_factory.mktemp("interop_tfds"))


def torch_config(path: Path, tfds_dir: str, **model) -> Path:
    """Writes the fixture's --config with the test's data dir and run settings; returns it."""
    c = json.loads((HERE / "torch_decoder.json").read_text())
    c["run"]["data"]["data_dir"] = tfds_dir
    c["run"]["training"] = dict(QUIET)
    if model:
        c["run"]["model"] = model
    path.write_text(json.dumps(c))
    return path


def one_line(capsys, rc, *needles):
    """Asserts exit 2 with exactly one line on stderr (no traceback) holding ``needles``."""
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("unitscale-jax: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])
