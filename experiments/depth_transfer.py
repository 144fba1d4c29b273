"""Learning-rate transfer across depth: u-muP's depth rule against SP.

A byte-level decoder of width 32 (head width 8) on tiny Shakespeare at depths 2 -> 16 layers,
sweeping the peak learning rate over powers of 2 as in ``lr_transfer.py``. u-muP uses the
library's depth rule: the residual branch weights tau_i = 1/sqrt(L/2 + i) (with the
``residual_mult``/``residual_attn_ratio`` multipliers at 1) and the learning-rate factor
depth^-1/2 of every parameter inside the layer stack; SP uses GPT-2's init (std 0.02, residual
output projections 0.02/sqrt(2 n_layers)) and optax Adam. The claim tested: with the depth
rule u-muP's optimum moves by at most one factor of 2 from 2 to 16 layers, and deeper is better.

    python experiments/depth_transfer.py          # full (results in experiments/results/)
    python experiments/depth_transfer.py --quick  # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _transfer  # noqa: E402

DEFAULTS = {"values": "2,4,8,16", "fixed": 32, "d_head": 8, "steps": 200, "batch_size": 16,
            "seq_len": 64, "umup_lrs": "-2:2", "sp_lrs": "-9:-5"}
MODES = {"quick_values": "1,2,4", "smoke_values": "1,2", "quick_fixed": 16, "smoke_fixed": 8,
         "quick_lrs": {"umup": "-2:2", "sp": "-8:-4"}, "smoke_lrs": {"umup": "0:1", "sp": "-7:-6"}}


def main(argv=None) -> dict:
    return _transfer.main(argv, axis="depth", experiment="depth_transfer", doc=__doc__,
                          defaults=DEFAULTS, modes=MODES)


if __name__ == "__main__":
    main()
