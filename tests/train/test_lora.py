"""LoRA in the trainer: ``finetune`` (classification, tagging) and decoder ``train`` with
``--lora-targets``: only adapters and heads change, no optimizer state for the frozen base,
``merge`` gives the same outputs from a base model, and bad LoRA flags."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.conftest import SMALL
from tests.train.finetune_helpers import TINY, fails, write_classification, write_tagging
from unitscale_jax import nn as unn
from unitscale_jax.cli import main
from unitscale_jax.train import build, interop
from unitscale_jax.train.config import resolve
from unitscale_jax.train.finetune import FineTuner, load_finetuned
from unitscale_jax.train.flags import parse_finetune_args
from unitscale_jax.train.run_dir import read_run_config
from unitscale_jax.train.sample import restore_params

LORA = ["--lora-targets", "qkv,ffn_down", "--lora-rank", "2"]


def _flat(params) -> dict:
    return {k: np.asarray(v) for k, v in interop.flat_params(jax.device_get(params)).items()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shared_dirs):
    run = tmp_path_factory.mktemp("pre") / "encoder"
    assert main(["train", "--model", "encoder", *TINY, "--steps", "3", "--eval-every", "0",
                 "--eval-batches", "1", "--data-dir", shared_dirs[0], "--run-dir", str(run)]) == 0
    return run


def test_finetune_lora_trains_adapters_and_heads_only(pretrained, tmp_path):
    data = write_classification(tmp_path / "d", test=False)
    cfg = parse_finetune_args(["--data", str(data), "--init-from", str(pretrained), *LORA,
                               "--steps", "4", "--eval-every", "0", "--no-checkpoint",
                               "--run-dir", str(tmp_path / "ft"), "--no-progress",
                               "--batch-size", "8"])
    tuner = FineTuner(cfg, quiet=True)
    tuner.build_state()
    before = _flat(tuner.state["params"])
    trunk = interop.source_arrays(pretrained, log=lambda m: None)[0]
    for k, v in before.items():  # the base is the pretrained trunk, B starts at zero
        if k in trunk:
            np.testing.assert_array_equal(v, trunk[k], err_msg=k)
        elif k.endswith("lora.b"):
            assert not v.any(), k
    for _ in range(2):  # A's gradient is zero until B has moved
        tuner.step(next(tuner.train_it))
    after = _flat(tuner.state["params"])
    tuner.close()
    trainable = {k for k in before if unn.lora.is_adapter_name(k) or k.startswith("cls_head")}
    assert {k for k in before if "lora" in k} == {
        f"stack.layers.{p}.lora.{m}" for p in ("attn.qkv_proj", "mlp.down_proj") for m in "ab"}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == trainable
    # optimizer state only for the trainable leaves: Adam's mu and nu, no frozen copy
    state_leaves = [x for x in jax.tree.leaves(tuner.state["opt_state"]) if np.ndim(x) > 0]
    sizes = sorted(int(np.size(x)) for x in state_leaves)
    assert sizes == sorted(2 * [before[k].size for k in trainable])


@pytest.fixture(scope="module")
def tagging_lora_run(pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("tag")
    data, run = write_tagging(root / "data"), root / "ner"
    assert main(["finetune", "--task", "tag", "--data", str(data), "--init-from",
                 str(pretrained), *LORA, "--lora-mult", "2", "--steps", "6", "--eval-every",
                 "3", "--run-dir", str(run), "--no-progress", "--batch-size", "8",
                 "--no-plot", "--no-tensorboard"]) == 0
    return run


def test_merge_of_a_tagging_lora_run_gives_its_outputs(tagging_lora_run, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--run-dir", str(tagging_lora_run), "--out", str(out)]) == 0
    assert "merged 2 LoRA adapter(s)" in capsys.readouterr().out
    run = load_finetuned(tagging_lora_run, log=lambda m: None)
    arrays, meta = interop.read_params_file(out)
    assert meta["merged_from"] == str(tagging_lora_run)
    assert not any("lora" in k for k in arrays) and '"lora_targets": null' in meta["config"]
    vocab = run.tokenizer.vocab_size
    adapted = build.build_model(run.cfg, vocab, task=run.task)
    state = nnx.state(adapted, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, run.params))
    nnx.update(adapted, state)
    base_cfg = resolve(read_run_config(tagging_lora_run).replace(model={"lora_targets": None}))
    base = build.build_model(base_cfg, vocab, task=run.task)
    state = nnx.state(base, nnx.Param)
    nnx.replace_by_pure_dict(state, interop.unflatten_like(nnx.to_pure_dict(state), arrays))
    nnx.update(base, state)
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in _flat(run.params).items()
               if k.endswith("lora.b"))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (2, 12)))
    adapted.eval()
    base.eval()
    np.testing.assert_allclose(np.asarray(base.tag(ids)), np.asarray(adapted.tag(ids)),
                               rtol=1e-4, atol=1e-5)


def test_decoder_lora_train_from_a_base_run_and_merge(tmp_path, shared_dirs, capsys):
    flags = [*SMALL, "--steps", "3", "--eval-every", "0", "--data-dir", shared_dirs[0]]
    base_run, lora_run = tmp_path / "base", tmp_path / "lora"
    assert main(["train", *flags, "--run-dir", str(base_run)]) == 0
    assert main(["train", *flags, "--run-dir", str(lora_run), "--init-from", str(base_run),
                 "--lora-targets", "attn_out,ffn_up,ffn_gate", "--lora-rank", "4"]) == 0
    cfg = resolve(read_run_config(lora_run))
    _, _, lora_params, _ = restore_params(lora_run, cfg, log=lambda m: None)
    _, _, base_params, _ = restore_params(base_run, resolve(read_run_config(base_run)),
                                          log=lambda m: None)
    lp, bp = _flat(lora_params), _flat(base_params)
    assert set(lp) - set(bp) == {f"stack.layers.{p}.lora.{m}" for m in "ab" for p in
                                 ("attn.out_proj", "mlp.up_proj", "mlp.gate_proj")}
    for k in bp:  # the base (embedding and readout too) stays frozen
        np.testing.assert_array_equal(lp[k], bp[k], err_msg=k)
    # merge, then a plain run starts from the merged file
    capsys.readouterr()
    assert main(["merge", "--run-dir", str(lora_run)]) == 0
    merged = lora_run / "merged.safetensors"
    assert main(["train", *flags, "--steps", "1", "--run-dir", str(tmp_path / "again"),
                 "--init-from", str(merged)]) == 0
    arrays, _ = interop.read_params_file(merged)
    assert set(arrays) == set(bp)
    assert not np.array_equal(arrays["stack.layers.attn.out_proj.kernel"],
                              bp["stack.layers.attn.out_proj.kernel"])


@pytest.mark.parametrize("argv,needles", [
    (["finetune", "--lora-targets", "qkv,mlp_up"],
     ("unknown LoRA target(s) 'mlp_up'", "qkv, attn_out, ffn_up, ffn_gate, ffn_down")),
    (["finetune", "--lora-targets", "qkv", "--lora-rank", "0"],
     ("LoRA rank must be a positive int", "got 0")),
    (["train", "--lora-targets", "ffn", "--steps", "1"], ("unknown LoRA target(s) 'ffn'",)),
    (["train", "--lora-targets", "qkv", "--lora-rank", "-1", "--steps", "1"],
     ("LoRA rank must be a positive int",)),
])
def test_bad_lora_flags(argv, needles, tmp_path, capsys):
    extra = []
    if argv[0] == "finetune":
        extra = ["--data", str(write_classification(tmp_path / "d", test=False))]
    run = tmp_path / "run"
    fails(capsys, [*argv, *extra, *TINY, "--run-dir", str(run)], *needles)
    assert not run.exists()  # nothing left behind


def test_merge_of_a_run_without_adapters(pretrained, capsys):
    fails(capsys, ["merge", "--run-dir", str(pretrained)], "has no LoRA adapters",
          "unitscale-jax export")


def test_finetune_from_the_merged_file_of_a_finetuning_run(tagging_lora_run, tmp_path):
    import orbax.checkpoint as ocp
    step = max(int(p.name) for p in (tagging_lora_run / "checkpoints").iterdir()
               if p.name.isdigit())
    stored = ocp.StandardCheckpointer().restore(
        tagging_lora_run / "checkpoints" / str(step) / "state")
    names = set(_flat(stored["params"]))  # adapters and the head only: the trunk is a reference
    assert {k for k in names if not unn.lora.is_adapter_name(k)} == {
        k for k in names if k.startswith("token_head")} != set()
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--run-dir", str(tagging_lora_run), "--out", str(out)]) == 0
    _, meta = interop.read_params_file(out)
    import json
    assert json.loads(meta["config"]).get("finetune") is None  # a plain encoder run
    assert json.loads(meta["finetune_config"])["finetune"]["task"] == "tag"
    data = write_tagging(tmp_path / "data")
    assert main(["finetune", "--task", "tag", "--data", str(data), "--init-from", str(out),
                 "--steps", "1", "--eval-every", "0", "--run-dir", str(tmp_path / "again"),
                 "--no-progress", "--batch-size", "8", "--no-plot", "--no-tensorboard",
                 "--no-checkpoint"]) == 0
