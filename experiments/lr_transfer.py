"""Learning-rate transfer across width: u-muP against the standard parametrization (SP).

A byte-level decoder (2 layers, head width 8) on tiny Shakespeare at widths 16 -> 128 (8x),
sweeping the peak learning rate over powers of 2 for u-muP (``unitscale_jax.optim`` Adam, grid
from 2^-2..2^2) and SP (optax Adam, GPT-2 init std 0.02, grid from 2^-9..2^-5); a grid is
extended by two points while its best run sits at an edge. Same token budget, schedule
(10% warmup, cosine to 0.1x) and zero weight decay for every run. The claim tested: u-muP's
optimum moves by at most one factor of 2 across the widths while SP's moves by more, and the
loss improves with width.

    python experiments/lr_transfer.py            # full (results in experiments/results/)
    python experiments/lr_transfer.py --quick    # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _transfer  # noqa: E402

DEFAULTS = {"values": "16,32,64,128", "fixed": 2, "d_head": 8, "steps": 200, "batch_size": 16,
            "seq_len": 64, "umup_lrs": "-2:2", "sp_lrs": "-9:-5"}
MODES = {"quick_values": "16,32,64", "smoke_values": "8,16", "quick_fixed": 2, "smoke_fixed": 1,
         "quick_lrs": {"umup": "-2:2", "sp": "-9:-5"}, "smoke_lrs": {"umup": "0:1", "sp": "-7:-6"}}


def main(argv=None) -> dict:
    return _transfer.main(argv, axis="width", experiment="lr_transfer", doc=__doc__,
                          defaults=DEFAULTS, modes=MODES)


if __name__ == "__main__":
    main()
