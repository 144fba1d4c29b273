"""The encoder (masked LM) and encoder-decoder (span corruption) train end to end."""

import pytest
from flax import nnx

from unitscale_jax import nn, train


@pytest.mark.parametrize("kind, cls", [("encoder", "TransformerEncoder"),
                                       ("encdec", "TransformerEncoderDecoder")])
def test_model_kind_loss_falls_in_50_steps(kind, cls, trained_run):
    cfg, s = trained_run(kind)  # shared with tests/train/test_sample.py
    model = nnx.eval_shape(lambda: train.build_model(train.resolve(cfg), 260))
    assert isinstance(model, getattr(nn, cls))
    val = [r["loss"] for r in s["history"] if r["split"] == "validation"]
    assert [r["step"] for r in s["history"] if r["split"] == "validation"] == [0, 50]
    assert val[1] < val[0] - 1.5, val
    assert train.resolve(cfg).model.rope is True  # bidirectional attention needs positions
    assert s["checkpoint"] and s["steps"] == 50
