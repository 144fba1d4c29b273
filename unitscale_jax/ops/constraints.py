"""Scale constraints: choosing one value for an op's forward and backward scales.

Where an edge is not a cut edge (e.g. activations inside a residual branch), the forward scale
and the backward scales of an op must agree, or the backward pass no longer computes the
gradient of the forward pass (Blake et al., 2023, section 5.2). A constraint maps the op's
``(output_scale, *grad_input_scales)`` to a single value used for all of them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

Constraint = Optional[str]


def gmean(*scales: float) -> float:
    """Geometric mean of the scales (recommended for unit scaling)."""
    return math.prod(scales) ** (1.0 / len(scales))


def hmean(*scales: float) -> float:
    """Harmonic mean of the scales (Xavier/Glorot's choice)."""
    return len(scales) / sum(1.0 / s for s in scales)


def amean(*scales: float) -> float:
    """Arithmetic mean of the scales."""
    return sum(scales) / len(scales)


def to_output_scale(output_scale: float, *grad_scales: float) -> float:
    """Every scale takes the forward (output) scale: the u-muP default."""
    del grad_scales
    return output_scale


def to_grad_input_scale(output_scale: float, *grad_scales: float) -> float:
    """Every scale takes the input-gradient scale (binary ops only)."""
    del output_scale
    if len(grad_scales) != 1:
        raise ValueError(
            "constraint 'to_grad_input_scale' applies to ops with one input; for ops with "
            "two inputs use 'to_left_grad_scale' or 'to_right_grad_scale'."
        )
    return grad_scales[0]


def to_left_grad_scale(output_scale: float, *grad_scales: float) -> float:
    """Every scale takes the left input's gradient scale (ops with two inputs)."""
    del output_scale
    if len(grad_scales) != 2:
        raise ValueError(
            "constraint 'to_left_grad_scale' applies to ops with two inputs (matmul, add); "
            "for one-input ops use 'to_grad_input_scale'."
        )
    return grad_scales[0]


def to_right_grad_scale(output_scale: float, *grad_scales: float) -> float:
    """Every scale takes the right input's gradient scale (ops with two inputs)."""
    del output_scale
    if len(grad_scales) != 2:
        raise ValueError(
            "constraint 'to_right_grad_scale' applies to ops with two inputs (matmul, add); "
            "for one-input ops use 'to_grad_input_scale'."
        )
    return grad_scales[1]


CONSTRAINTS: dict[str, Callable[..., float]] = {
    "to_output_scale": to_output_scale,
    "to_grad_input_scale": to_grad_input_scale,
    "to_left_grad_scale": to_left_grad_scale,
    "to_right_grad_scale": to_right_grad_scale,
    "gmean": gmean,
    "hmean": hmean,
    "amean": amean,
}


def validate_constraint(constraint: Constraint) -> Constraint:
    """Returns ``constraint`` if it is a known name or None, else raises ValueError."""
    if constraint is None or constraint in CONSTRAINTS:
        return constraint
    valid = ", ".join(repr(c) for c in [*CONSTRAINTS, None])
    raise ValueError(f"unknown constraint {constraint!r}; valid constraints are: {valid}.")


def apply_constraint(constraint: Constraint, *scales: float) -> tuple[float, ...]:
    """Applies a named constraint to ``(output_scale, *grad_input_scales)``.

    Args:
      constraint: one of ``CONSTRAINTS`` or None (unconstrained: each scale keeps its value).
      *scales: the op's output scale followed by its input-gradient scales.

    Returns:
      The scales after the constraint: all equal, unless ``constraint`` is None.
    """
    validate_constraint(constraint)
    if constraint is None:
        return tuple(scales)
    value = CONSTRAINTS[constraint](*scales)
    return tuple(value for _ in scales)


def logarithmic_interpolation(alpha: float, lower: float, upper: float) -> float:
    """Interpolates between ``lower`` and ``upper`` with constant ratio.

    ``interp(a, lo, hi) = exp(a * ln(hi) + (1 - a) * ln(lo))`` (u-muP, Blake et al. 2025,
    appendix: the op scales interpolate between the two limiting regimes of their multiplier).

    Args:
      alpha: interpolation weight, 0 gives ``lower`` and 1 gives ``upper``.
      lower: value at ``alpha = 0``; must be > 0.
      upper: value at ``alpha = 1``; must be > 0.

    Returns:
      The interpolated value.
    """
    if lower <= 0 or upper <= 0:
        raise ValueError(f"logarithmic_interpolation needs lower, upper > 0, got {lower}, {upper}")
    return math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))
