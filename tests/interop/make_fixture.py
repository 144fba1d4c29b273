"""Generates the ``unitscale-jax convert --from-torch`` fixture from ``unit-scaling`` 0.3.5.

Run ONLY in a separate virtual environment with torch and unit-scaling (never add torch to
this project's dependencies). From the repository root:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 unit-scaling==0.3.5 safetensors numpy
    /tmp/torchvenv/bin/python tests/interop/make_fixture.py

It builds a tiny ``unit_scaling.TransformerDecoder`` (seeded, so the files come out the same)
and writes, next to this file:

- ``torch_decoder.json``: its hyperparameters, the ``--config`` file of ``convert``;
- ``torch_decoder.safetensors`` and ``torch_decoder.pt``: its ``state_dict()`` (torch layout
  and names), once through ``safetensors.torch.save_file``, once through ``torch.save``;
- ``torch_decoder.npz``: ``ids`` (int32 ``[2, 16]`` token ids), ``logits`` (float32
  ``[2, 16, 260]``, ``model(ids)`` in eval mode) and ``loss`` (``model.loss(ids)``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import unit_scaling as uu
from safetensors.torch import save_file
from unit_scaling.core.functional import transformer_residual_scaling_rule

HERE = os.path.dirname(os.path.abspath(__file__))

# vocab 260 = the byte tokenizer's, so the converted run samples text; non-default residual
# rule so that its two hyperparameters are exercised.
CONFIG = {"hidden_size": 16, "vocab_size": 260, "layers": 2, "heads": 2, "dropout_p": 0.0,
          "residual_mult": 0.5, "residual_attn_ratio": 2.0,
          "run": {"data": {"tokenizer": "bytes", "seq_len": 16}}}


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(17)
    c = CONFIG
    model = uu.TransformerDecoder(
        c["hidden_size"], c["vocab_size"], layers=c["layers"], heads=c["heads"],
        dropout_p=c["dropout_p"],
        residual_scaling=transformer_residual_scaling_rule(c["residual_mult"],
                                                           c["residual_attn_ratio"]))
    model.eval()
    ids = torch.from_numpy(np.random.default_rng(17).integers(0, c["vocab_size"], (2, 16)))
    with torch.no_grad():
        logits = model(ids)
        loss = model.loss(ids)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(HERE, "torch_decoder.safetensors"))
    torch.save(state, os.path.join(HERE, "torch_decoder.pt"))
    np.savez_compressed(os.path.join(HERE, "torch_decoder.npz"),
                        ids=ids.numpy().astype(np.int32), logits=logits.numpy(),
                        loss=np.array(loss.item(), np.float32))
    with open(os.path.join(HERE, "torch_decoder.json"), "w") as f:
        json.dump(c, f, indent=2)
        f.write("\n")
    print(f"torch {torch.__version__}: {len(state)} tensors, logits {tuple(logits.shape)}, "
          f"loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
