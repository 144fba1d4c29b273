"""Adapter-only checkpoints of LoRA runs (``train.lora_base``): what a checkpoint holds,
resuming, readers reassembling base + adapters, and a changed or missing base."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from tests.train.conftest import SMALL
from tests.train.finetune_helpers import fails
from unitscale_jax.cli import main
from unitscale_jax.train import build, interop
from unitscale_jax.train.config import resolve
from unitscale_jax.train.lora_base import BASE_FILE
from unitscale_jax.train.run_dir import read_run_config
from unitscale_jax.train.sample import generate_text, load_run, restore_params

ADAPTED = ("attn.out_proj", "mlp.up_proj")
LORA = ["--lora-targets", "attn_out,ffn_up", "--lora-rank", "4", "--lr", "0.05"]


def _flat(params) -> dict:
    return {k: np.asarray(v) for k, v in interop.flat_params(jax.device_get(params)).items()}


def _params(run) -> dict:
    return _flat(restore_params(run, resolve(read_run_config(run)), log=lambda m: None)[2])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_dirs):
    """A base decoder run, a 4-step LoRA run from it in one go, and one killed after its
    step-2 checkpoint and resumed to step 4."""
    root = tmp_path_factory.mktemp("lora_base")
    flags = [*SMALL, "--eval-every", "0", "--data-dir", shared_dirs[0]]
    base, whole, resumed = root / "base", root / "whole", root / "resumed"
    assert main(["train", *flags, "--steps", "3", "--run-dir", str(base)]) == 0
    lora = [*flags, "--init-from", str(base), *LORA, "--checkpoint-every", "2"]
    assert main(["train", *lora, "--steps", "4", "--run-dir", str(whole)]) == 0
    assert main(["train", *lora, "--steps", "4", "--run-dir", str(resumed)]) == 0
    shutil.rmtree(resumed / "checkpoints" / "4")  # as if killed after the step-2 checkpoint
    assert main(["train", *lora, "--steps", "4", "--run-dir", str(resumed)]) == 0
    return base, whole, resumed


def test_checkpoint_holds_only_the_adapters(runs):
    base, whole, _ = runs
    ref = json.loads((whole / BASE_FILE).read_text())
    assert ref["source"] == str(base.absolute())
    adapters = {f"stack.layers.{p}.lora.{m}" for p in ADAPTED for m in "ab"}
    assert set(ref["frozen"]) == set(_params(base))
    for step in (2, 4):
        stored = ocp.StandardCheckpointer().restore(whole / "checkpoints" / str(step) / "state")
        assert set(_flat(stored["params"])) == adapters
        # optimizer state: Adam's mu and nu of the adapters only
        sizes = sorted(int(np.size(x)) for x in jax.tree.leaves(stored["opt_state"])
                       if np.ndim(x) > 0)
        assert sizes == sorted(2 * [int(np.size(v)) for v in _flat(stored["params"]).values()])


def test_readers_reassemble_base_and_adapters(runs):
    base, whole, _ = runs
    bp, lp = _params(base), _params(whole)
    assert set(lp) - set(bp) == {f"stack.layers.{p}.lora.{m}" for p in ADAPTED for m in "ab"}
    for k in bp:
        np.testing.assert_array_equal(lp[k], bp[k], err_msg=k)
    assert any(np.abs(lp[k]).max() > 0 for k in lp if k.endswith("lora.b"))


def test_resuming_reproduces_the_run(runs):
    _, whole, resumed = runs
    a, b = _params(whole), _params(resumed)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sample_of_a_lora_run_matches_its_merged_model(runs, tmp_path, capsys):
    _, whole, _ = runs
    cfg, tok, model, _ = load_run(whole, log=lambda m: None)
    assert main(["sample", "--run-dir", str(whole), "--prompt", "ab", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "--run-dir", str(whole), "--out", str(merged)]) == 0
    arrays, _ = interop.read_params_file(merged)
    base_cfg = resolve(read_run_config(whole).replace(model={"lora_targets": None}))
    merged_model = build.build_model(base_cfg, tok.vocab_size)
    state = nnx.state(merged_model, nnx.Param)
    nnx.replace_by_pure_dict(state, interop.unflatten_like(nnx.to_pure_dict(state), arrays))
    nnx.update(merged_model, state)
    merged_model.eval()
    kw = dict(max_new_tokens=8, seq_len=cfg.data.seq_len, temperature=0.0)
    assert (generate_text(model, tok, "the ", **kw)
            == generate_text(merged_model, tok, "the ", **kw))


def test_a_changed_or_missing_base_is_one_clear_error(runs, tmp_path, shared_dirs, capsys):
    base, whole, _ = runs
    copy_base, run = tmp_path / "base", tmp_path / "run"
    shutil.copytree(base, copy_base)
    flags = [*SMALL, "--eval-every", "0", "--data-dir", shared_dirs[0]]
    lora = [*flags, "--init-from", str(copy_base), *LORA, "--checkpoint-every", "2"]
    assert main(["train", *lora, "--steps", "2", "--run-dir", str(run)]) == 0
    # the base trains on: its newest checkpoint is another model
    assert main(["train", *flags, "--steps", "4", "--run-dir", str(copy_base)]) == 0
    capsys.readouterr()
    fails(capsys, ["train", *lora, "--steps", "4", "--run-dir", str(run)],
          "has changed since the run started", str(copy_base.absolute()), BASE_FILE)
    fails(capsys, ["sample", "--run-dir", str(run), "--prompt", "a"], "has changed")
    assert (run / "checkpoints" / "2").is_dir()  # nothing quarantined or lost
    shutil.rmtree(copy_base)
    fails(capsys, ["merge", "--run-dir", str(run)], "is missing", str(copy_base.absolute()))


def test_a_deleted_base_reference_is_one_clear_error_not_a_restart(runs, tmp_path, shared_dirs,
                                                                    capsys):
    """Without ``lora_base.json`` the adapter-only checkpoints cannot be restored: every reader
    and a resumed ``train`` refuse with one line naming the file (they used to set the
    checkpoints aside as corrupt and start the run over); put back, the run resumes."""
    base, whole, _ = runs
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    kept = (run / BASE_FILE).read_text()
    (run / BASE_FILE).unlink()
    flags = [*SMALL, "--eval-every", "0", "--data-dir", shared_dirs[0]]
    lora = [*flags, "--init-from", str(base), *LORA, "--checkpoint-every", "2"]
    capsys.readouterr()
    needles = (f"{run / BASE_FILE} is missing", "holds only this LoRA run's trainable",
               "--overwrite")
    fails(capsys, ["train", *lora, "--steps", "6", "--run-dir", str(run)], *needles)
    fails(capsys, ["sample", "--run-dir", str(run), "--prompt", "a"], *needles)
    fails(capsys, ["sample", "--run-dir", str(run), "--prompt", "a", "--step", "2"],
          "checkpoint at step 2", *needles[1:])
    fails(capsys, ["merge", "--run-dir", str(run)], *needles)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    assert not (run / "corrupt_checkpoints").exists()
    (run / BASE_FILE).write_text(kept)
    assert main(["train", *lora, "--steps", "6", "--run-dir", str(run)]) == 0
    assert "resumed from the checkpoint at step 4" in capsys.readouterr().out
