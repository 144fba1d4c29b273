"""The encoder (masked LM) and encoder-decoder (span corruption) train end to end."""

import pytest
from flax import nnx

from unitscale_jax import nn, train
from unitscale_jax.cli import main


@pytest.mark.parametrize("kind, cls", [("encoder", "TransformerEncoder"),
                                       ("encdec", "TransformerEncoderDecoder")])
def test_model_kind_loss_falls_in_50_steps(kind, cls, tmp_path, shared_dirs, capsys):
    cfg = train.get_preset("tiny").replace(
        model={"kind": kind, "d_model": 32, "n_layers": 1, "n_heads": 2},
        data={"seq_len": 32, "data_dir": shared_dirs[0]},
        training={"steps": 50, "batch_size": 8, "eval_every": 50, "eval_batches": 2,
                  "run_dir": str(tmp_path / kind), "progress": False, "tensorboard": False,
                  "plot": False})
    model = nnx.eval_shape(lambda: train.build_model(train.resolve(cfg), 260))
    assert isinstance(model, getattr(nn, cls))
    s = train.run(cfg, quiet=True)
    val = [r["loss"] for r in s["history"] if r["split"] == "validation"]
    assert [r["step"] for r in s["history"] if r["split"] == "validation"] == [0, 50]
    assert val[1] < val[0] - 1.5, val
    assert train.resolve(cfg).model.rope is True  # bidirectional attention needs positions

    capsys.readouterr()
    rc = main(["sample", "--run-dir", str(tmp_path / kind)])
    err = capsys.readouterr().err
    assert rc == 2 and "sample needs a decoder run" in err and len(err.splitlines()) == 1
