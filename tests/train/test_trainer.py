"""``Trainer``'s pieces (``build_state``, ``step``, ``evaluate``, ``save``) driven by hand give
``run``'s curve, and a new task is one small class."""

import jax.numpy as jnp
import pytest

from unitscale_jax import train
from unitscale_jax.train import tasks


def _cfg(tmp_path, tfds_dir, name, **training):
    return train.get_preset("tiny").replace(
        model={"d_model": 32, "n_layers": 1, "n_heads": 2},
        data={"seq_len": 32, "data_dir": tfds_dir},
        training={"steps": 6, "batch_size": 8, "eval_every": 3, "eval_batches": 2,
                  "run_dir": str(tmp_path / name), "progress": False, "tensorboard": False,
                  "plot": False, **training})


def _train_losses(history):
    return [r["loss"] for r in history if r["split"] == "train"]


def test_pieces_by_hand_reproduce_run(tmp_path, shared_dirs):
    ref = train.run(_cfg(tmp_path, shared_dirs[0], "ref"), quiet=True)
    trainer = train.Trainer(_cfg(tmp_path, shared_dirs[0], "hand"), quiet=True)
    assert trainer.build_state() == 0
    losses = [float(trainer.step(next(trainer.train_it))["loss"]) for _ in range(6)]
    row = trainer.evaluate(6)
    trainer.save(6, force=True)
    trainer.close()
    assert losses == _train_losses(ref["history"])
    assert row["loss"] == ref["final_val_loss"] and row["bits_per_byte"] > 0
    assert trainer.ckpt.steps() == [6]

    resumed = train.Trainer(_cfg(tmp_path, shared_dirs[0], "hand"), quiet=True)
    assert resumed.build_state() == 6 and int(resumed.state["step"]) == 6
    resumed.close()


class _LMWithAccuracy(tasks.LanguageModelling):
    """A new task in a few lines: the LM loss plus a validation accuracy metric."""

    def eval_sums(self, model, batch):
        logits = model(batch["inputs"])
        hit = (jnp.argmax(logits, -1) == batch["targets"]) & batch["where"]
        return {**super().eval_sums(model, batch),
                "accuracy": (jnp.sum(hit), jnp.sum(batch["where"]))}


def test_a_new_task_is_one_class(tmp_path, shared_dirs, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "decoder", _LMWithAccuracy())
    s = train.run(_cfg(tmp_path, shared_dirs[0], "task", checkpoint=False), quiet=True)
    val = [r for r in s["history"] if r["split"] == "validation"]
    assert [r["step"] for r in val] == [0, 3, 6]
    assert all(0 <= r["accuracy"] <= 1 for r in val) and val[-1]["accuracy"] > val[0]["accuracy"]
    assert s["final_bits_per_byte"] == pytest.approx(val[-1]["loss"] / jnp.log(2.0))
