"""Precision policy: which format each matmul operand and gradient uses, applied by modules.

Placement follows the reference library's ``simulate_format`` (``unit_scaling.transforms``)
and the FP8 recipe of Micikevicius et al. (arXiv 2209.05433): the forward format (E4M3) on
each matmul's inputs -- activations, weights, and q, k, v of attention -- and the backward
format (E5M2) on the gradient entering each matmul's backward pass, i.e. the gradient of its
output. Weight gradients are matmul *results* and stay in the compute dtype. Unit scaling is
what lets one static scale (1.0) serve every tensor (Blake et al., ICML 2023, section 6).

Roles (the ``role`` argument; an unknown role is an error, to catch typos in overrides):

=============  ==============================================================================
``linear``     a generic linear layer (default)
``attn_qkv``   the query/key/value projections (fused or separate)
``attn_out``   the attention output projection
``ffn_up``     the FFN up projection (first matmul)
``ffn_gate``   the FFN gate projection of a GLU
``ffn_down``   the FFN down projection
``readout``    the final projection to logits (``policy.linear`` uses ``linear_readout``)
``q k v``      the attention core's inputs (forward format), see ``attention_inputs``
``attn``       the attention core's output, whose gradient enters the backward matmuls of
               ``softmax(q k^T) v`` (backward format), see ``attention_output``
=============  ==============================================================================

Modes: ``"none"`` (only the compute dtype: fp32, bf16, fp16), ``"sim"`` (formats simulated on
the values with ``quantise_fwd``/``quantise_bwd``) and ``"real"`` (``linear``/``dot`` run
``fp8_dot`` on float8 arrays; ``cast_*`` and the attention methods round the values exactly as a
real cast would, since the attention core here has no float8 kernel).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from unitscale_jax import ops
from unitscale_jax.precision.formats import BF16, E4M3, E5M2, FloatFormat, get_format
from unitscale_jax.precision.fp8 import fp8_dot
from unitscale_jax.precision.quantise import quantise_bwd, quantise_fwd
from unitscale_jax.precision.simulate import ROUNDINGS, Rounding

MATMUL_ROLES = ("linear", "attn_qkv", "attn_out", "ffn_up", "ffn_gate", "ffn_down", "readout")
ATTENTION_ROLES = ("q", "k", "v", "attn")
ROLES = MATMUL_ROLES + ATTENTION_ROLES
MODES = ("none", "sim", "real")
_COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_UNSET = object()

FormatLike = Union[FloatFormat, str, None]


def _check_role(role: str, where: str) -> None:
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; valid roles: {ROLES}.")


def _fmt(f: FormatLike) -> Optional[FloatFormat]:
    return None if f is None else get_format(f)


@dataclasses.dataclass(frozen=True)
class Override:
    """Formats for one role (optionally only in some layers), replacing the policy's.

    Attributes:
      role: one of ``ROLES``.
      fwd_format: forward format for this role's operands; None keeps the compute dtype.
      bwd_format: backward format for this role's output gradient; None keeps compute dtype.
      layers: layer indices it applies to (the ``layer`` argument of the policy methods);
        None means every layer.
    """

    role: str
    fwd_format: FormatLike = None
    bwd_format: FormatLike = None
    layers: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        _check_role(self.role, "Override")
        object.__setattr__(self, "fwd_format", _fmt(self.fwd_format))
        object.__setattr__(self, "bwd_format", _fmt(self.bwd_format))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    def matches(self, role: str, layer: Optional[int]) -> bool:
        return role == self.role and (self.layers is None or layer in self.layers)


UMUP_LARGE_RUN_OVERRIDES = (
    Override("attn_out", BF16, BF16),
    Override("ffn_down", BF16, BF16),
)
"""u-muP's large FP8 runs kept the attention output and FFN down projections in bf16
(Blake et al., 2025): their inputs have the largest scale growth during training."""


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    """Number formats for matmul operands and gradients, plus the compute dtype.

    Hashable (a static attribute of an NNX module, or a static argument under ``jax.jit``).

    Attributes:
      name: label for logs (a preset name).
      compute_dtype: dtype activations and matmuls run in (float32, bfloat16, float16);
        inputs, weights and biases reaching the policy's methods are cast to it.
      fwd_format: format of matmul inputs and weights (and q, k, v); None: compute dtype.
      bwd_format: format of the gradient entering each matmul's backward pass; None: none.
      mode: ``"none"``, ``"sim"`` or ``"real"`` (see the module docstring).
      rounding: ``"nearest"`` or ``"stochastic"`` (``"sim"`` only; needs ``rng`` per call).
      overrides: per-role / per-layer exceptions; the first matching one wins.
      x_scale, w_scale, grad_scale: static per-tensor scales of ``fp8_dot`` (``"real"``).
    """

    name: str = "fp32"
    compute_dtype: Any = jnp.float32
    fwd_format: FormatLike = None
    bwd_format: FormatLike = None
    mode: Literal["none", "sim", "real"] = "none"
    rounding: Rounding = "nearest"
    overrides: Tuple[Override, ...] = ()
    x_scale: float = 1.0
    w_scale: float = 1.0
    grad_scale: float = 1.0

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("compute_dtype", jnp.dtype(self.compute_dtype))
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(
                f"PrecisionPolicy: compute_dtype must be float32, bfloat16 or float16, got "
                f"{self.compute_dtype}."
            )
        set_("fwd_format", _fmt(self.fwd_format))
        set_("bwd_format", _fmt(self.bwd_format))
        set_("overrides", tuple(self.overrides))
        for o in self.overrides:
            if not isinstance(o, Override):
                raise TypeError(f"PrecisionPolicy: overrides must be Override objects, got {o!r}.")
        if self.mode not in MODES:
            raise ValueError(f"PrecisionPolicy: mode must be one of {MODES}, got {self.mode!r}.")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"PrecisionPolicy: rounding must be one of {ROUNDINGS}, "
                             f"got {self.rounding!r}.")
        formats = [self.fwd_format, self.bwd_format]
        formats += [f for o in self.overrides for f in (o.fwd_format, o.bwd_format)]
        if self.mode == "none" and any(f is not None for f in formats):
            raise ValueError(
                "PrecisionPolicy: formats are set but mode='none' would ignore them; use "
                "mode='sim' (simulated) or mode='real' (float8 arrays)."
            )
        if self.mode == "real":
            if self.rounding != "nearest":
                raise ValueError(
                    "PrecisionPolicy: mode='real' casts with the hardware's round-to-nearest; "
                    "stochastic rounding is only available with mode='sim'."
                )
            for f in formats:
                if f is not None and f.dtype is None:
                    raise ValueError(f"PrecisionPolicy: format {f} has no real dtype; "
                                     "use mode='sim'.")
        for s in (self.x_scale, self.w_scale, self.grad_scale):
            if not (isinstance(s, (int, float)) and s > 0):
                raise ValueError("PrecisionPolicy: scales must be positive Python floats, "
                                 f"got {s!r}.")

    # -- lookup -----------------------------------------------------------------------------
    def formats(self, role: str, layer: Optional[int] = None) -> Tuple[Optional[FloatFormat], ...]:
        """``(fwd_format, bwd_format)`` for ``role`` in ``layer`` after overrides."""
        _check_role(role, "PrecisionPolicy")
        for o in self.overrides:
            if o.matches(role, layer):
                return o.fwd_format, o.bwd_format
        return self.fwd_format, self.bwd_format

    def _rounding_kw(self, rng):
        if self.rounding == "stochastic" and rng is None:
            raise ValueError(
                f"PrecisionPolicy {self.name!r} uses stochastic rounding: "
                "pass rng=<jax.random key>."
            )
        return dict(rounding=self.rounding, rng=rng if self.rounding == "stochastic" else None)

    def _split(self, rng, n):
        if self.rounding == "stochastic" and rng is not None:
            return tuple(jax.random.split(rng, n))
        return (None,) * n

    # -- hook methods for modules -----------------------------------------------------------
    def cast_compute(self, x: Optional[jax.Array]) -> Optional[jax.Array]:
        """Casts a floating-point array to ``compute_dtype`` (None passes through)."""
        if x is None or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return jnp.asarray(x).astype(self.compute_dtype)

    def cast_input(self, x, role: str = "linear", *, layer=None, rng=None) -> jax.Array:
        """A matmul input in ``compute_dtype``, rounded to the role's forward format
        (``quantise_fwd``: gradient straight through)."""
        fwd, _ = self.formats(role, layer)
        x = self.cast_compute(x)
        if self.mode == "none" or fwd is None:
            return x
        return quantise_fwd(x, fwd, **self._rounding_kw(rng))

    def cast_weight(self, w, role: str = "linear", *, layer=None, rng=None) -> jax.Array:
        """A matmul weight operand: the same rule as ``cast_input``."""
        return self.cast_input(w, role, layer=layer, rng=rng)

    def cast_output(self, y, role: str = "linear", *, layer=None, rng=None) -> jax.Array:
        """A matmul output, unchanged forward; its gradient is rounded to the role's backward
        format (``quantise_bwd``) before it enters the backward matmuls."""
        _, bwd = self.formats(role, layer)
        y = self.cast_compute(y)
        if self.mode == "none" or bwd is None:
            return y
        return quantise_bwd(y, bwd, **self._rounding_kw(rng))

    def dot(self, x, w, role: str = "linear", *, layer=None, rng=None) -> jax.Array:
        """Plain (not unit-scaled) ``x[..., K] @ w[K, N]`` under the policy, e.g. for SP layers.

        ``"real"`` mode runs ``fp8_dot`` (float8 operands forward and backward, result in
        ``compute_dtype``); otherwise ``cast_output(cast_input(x) @ cast_weight(w))``.
        """
        fwd, bwd = self.formats(role, layer)
        if self.mode == "real" and (fwd is not None or bwd is not None):
            compute = get_format(self.compute_dtype)
            return fp8_dot(
                x, w, x_scale=self.x_scale, w_scale=self.w_scale, grad_scale=self.grad_scale,
                fwd_dtype=(fwd or compute).dtype, bwd_dtype=(bwd or compute).dtype,
                preferred_element_type=self.compute_dtype,
            )
        rx, rw, ry = self._split(rng, 3)
        x = self.cast_input(x, role, layer=layer, rng=rx)
        w = self.cast_weight(w, role, layer=layer, rng=rw)
        return self.cast_output(jnp.matmul(x, w), role, layer=layer, rng=ry)

    def dot_general(self, role: str = "linear", *, layer=None, rng=None):
        """The matmul of ``role`` as a ``jax.lax.dot_general``-compatible function, for the
        ``dot_general=`` argument of ``ops.linear`` / ``ops.plain.linear``; None where the
        policy only sets the compute dtype (then the op's own fast matmul runs).

        The function computes ``dot(x, w, role)`` (``x[..., K] @ w[K, N]``, the only layout
        the linear ops use).
        """
        fwd, bwd = self.formats(role, layer)
        if self.mode == "none" or (fwd is None and bwd is None):
            return None

        def dot_general(lhs, rhs, dimension_numbers, precision=None,
                        preferred_element_type=None):
            del precision, preferred_element_type
            if tuple(map(tuple, dimension_numbers[0])) != ((lhs.ndim - 1,), (0,)) or any(
                    dimension_numbers[1]):
                raise ValueError(f"PrecisionPolicy.dot_general: only x[..., K] @ w[K, N] is "
                                 f"supported, got dimension_numbers {dimension_numbers}.")
            return self.dot(lhs, rhs, role, layer=layer, rng=rng)

        return dot_general

    def linear(self, x, kernel, bias=None, *, role: str = "linear", layer=None,
               constraint=_UNSET, rng=None) -> jax.Array:
        """``ops.linear`` (``ops.linear_readout`` for role ``"readout"``) under the policy.

        The op with the policy's matmul plugged in (``dot_general``): forward values are the
        op on the rounded input and weight; the output gradient is rounded to the backward
        format before the two backward matmuls. The bias gradient uses the unrounded
        gradient, as real FP8 kernels compute it (the reference's simulator rounds it too).
        ``constraint`` defaults to the op's own default (``"to_output_scale"``; None for the
        readout).
        """
        _check_role(role, "PrecisionPolicy.linear")
        readout = role == "readout"
        if constraint is _UNSET:
            constraint = None if readout else "to_output_scale"
        op = ops.linear_readout if readout else ops.linear
        dot = self.dot_general(role, layer=layer, rng=rng)
        if dot is None:
            x, kernel = self.cast_compute(x), self.cast_compute(kernel)
        # (a plugged-in dot casts its own operands, after the op's backward scales)
        return op(x, kernel, self.cast_compute(bias), constraint=constraint, dot_general=dot)

    def attention_inputs(self, q, k, v, *, layer=None, rng=None):
        """``(q, k, v)`` rounded to the forward formats of roles ``"q"``, ``"k"``, ``"v"``."""
        rq, rk, rv = self._split(rng, 3)
        return (
            self.cast_input(q, "q", layer=layer, rng=rq),
            self.cast_input(k, "k", layer=layer, rng=rk),
            self.cast_input(v, "v", layer=layer, rng=rv),
        )

    def attention_output(self, out, *, layer=None, rng=None) -> jax.Array:
        """The attention core's output; its gradient is rounded to role ``"attn"``'s backward
        format."""
        return self.cast_output(out, "attn", layer=layer, rng=rng)

    @property
    def is_identity(self) -> bool:
        """True when the policy changes nothing (float32, no formats)."""
        return self.mode == "none" and self.compute_dtype == jnp.dtype(jnp.float32)


def _presets():
    return {
        "fp32": PrecisionPolicy("fp32"),
        "bf16": PrecisionPolicy("bf16", compute_dtype=jnp.bfloat16),
        "fp16": PrecisionPolicy("fp16", compute_dtype=jnp.float16),
        "fp8-sim": PrecisionPolicy("fp8-sim", jnp.float32, E4M3, E5M2, mode="sim"),
        "fp8": PrecisionPolicy("fp8", jnp.bfloat16, E4M3, E5M2, mode="real"),
    }


PRESETS = tuple(_presets())
"""Preset names, matching the trainer's ``--precision`` choices."""


def get_policy(
    name: Union[str, PrecisionPolicy],
    *,
    overrides: Sequence[Override] = (),
    **changes,
) -> PrecisionPolicy:
    """A preset policy by name, optionally with overrides and changed fields.

    Presets: ``fp32``; ``bf16`` and ``fp16`` (compute dtype only: real bf16/fp16 arithmetic);
    ``fp8-sim`` (float32 compute, E4M3 forward / E5M2 backward simulated on every matmul,
    round to nearest); ``fp8`` (bfloat16 compute, real float8 matmuls, same formats).

    Example: ``get_policy("fp8", overrides=UMUP_LARGE_RUN_OVERRIDES)`` keeps ``attn_out`` and
    ``ffn_down`` in bf16; ``get_policy("fp8-sim", rounding="stochastic")``.
    """
    if isinstance(name, PrecisionPolicy):
        base = name
    else:
        presets = _presets()
        if name not in presets:
            raise ValueError(f"Unknown precision preset {name!r}; choose one of {PRESETS}.")
        base = presets[name]
    if overrides:
        changes["overrides"] = tuple(overrides) + base.overrides
    return dataclasses.replace(base, **changes)
