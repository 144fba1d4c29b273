"""Scale analysis for unit-scaled and standard models (``unitscale_jax.analysis``).

- ``track_scales(model, batch)``: std, RMS, mean |x|, max |x| and FP16 / E4M3 / E5M2
  underflow and saturation fractions of every op output, the gradient flowing into it,
  every weight and every weight gradient, for one forward and backward pass (jitted);
  ``scale_stats`` is the traceable core.
- ``plot_scales(records, path)``: the standard figure (one row per op, log2 x axis).
- ``activation_stats(fn, model, *args)``: the std of every tapped activation and of its
  gradient (``tapped_value_and_grad`` is the traceable core).
- ``coord_check(...)``: mean |x| and RMS of every module's output after 0..k Adam steps
  across widths (TP5's coordinate check), u-muP, muP and SP; ``width_ratios`` (max / min
  across widths per module, with ``ratio_table``), ``width_slopes`` (growth with width),
  ``plot_coord_check``.
- ``write_csv`` / ``read_csv``: the record tables as CSV.
- ``cli.analyse_main(argv)``: ``unitscale-jax analyse``.
"""

from unitscale_jax.analysis.activations import activation_stats, named_params, tapped_value_and_grad
from unitscale_jax.analysis.coord import (
    coord_check,
    plot_coord_check,
    ratio_table,
    width_ratios,
    width_slopes,
)
from unitscale_jax.analysis.plot import plot_scales
from unitscale_jax.analysis.records import read_csv, write_csv
from unitscale_jax.analysis.stats import FORMATS, SCALE_STATS, stat_names, tensor_stats
from unitscale_jax.analysis.tracking import (
    KINDS,
    default_loss,
    forward_backward,
    scale_stats,
    stats_of,
    to_records,
    track_scales,
    unroll,
)

__all__ = [
    "FORMATS", "KINDS", "SCALE_STATS", "activation_stats", "coord_check", "default_loss",
    "forward_backward", "named_params", "plot_coord_check", "plot_scales", "ratio_table",
    "read_csv",
    "scale_stats", "stat_names", "stats_of", "tapped_value_and_grad", "tensor_stats", "to_records",
    "track_scales", "unroll", "width_ratios", "width_slopes", "write_csv",
]
