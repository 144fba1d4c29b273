"""LoRA adapters (Hu et al., 2021) under u-muP.

``y = linear(x, W) + mult * linear(linear(x, A), B)``.

A ``Linear`` built with ``lora=LoRASpec(...)`` whose role is one of the spec's targets carries a
``LoRAAdapter`` (attribute ``lora``): ``A [fan_in, r]`` and ``B [r, fan_out]``, applied through
the layer's own parametrization (``ops.linear`` for u-muP, plain matmuls for SP and muP), with
``B = 0`` so that the model's function, and every scale of its forward pass, equal the base
model's at the start. Targets (``LORA_TARGETS``) name the projections of every Transformer layer:

  ==========  ===================================================================
  target      roles
  ==========  ===================================================================
  qkv         ``attn.qkv_proj`` (and cross attention's ``q_proj`` / ``kv_proj``)
  attn_out    ``attn.out_proj`` / ``cross_attn.out_proj``
  ffn_up      ``mlp.up_proj``
  ffn_gate    ``mlp.gate_proj`` (SwiGLU)
  ffn_down    ``mlp.down_proj``
  ==========  ===================================================================

Initialisation: ``A`` as a hidden weight of fan-in ``d_in`` (``Parametrization.init_std``:
N(0, 1) for u-muP, N(0, 1/d_in) for SP and muP, the usual LoRA scale), ``B = 0``.

Parameter metadata (``unitscale_jax.params.ParamInfo``): ``A`` is a ``"weight"`` with fan-in
``d_in``, ``B`` a ``"weight"`` with fan-in ``r``, both with the stack's depth ``L``. The u-muP
Adam rule (``optim.umup_factor``: ``weight -> (fan_in * depth)^-1/2``) then gives

    eta_A = eta * (d_in L)^-1/2,        eta_B = eta * (r L)^-1/2,

so ``eta_B / eta_A = sqrt(d_in / r)``: B gets the larger learning rate, and the more so the
wider the model. Why this is the right rule: in u-muP the forward pass multiplies ``A`` by
``d_in^-1/2`` and ``B`` by ``r^-1/2`` (``ops.linear``'s ``fan_in^-1/2``). An Adam step moves
each entry by about its learning rate, and a step aligned with the input moves ``h = x A /
sqrt(d_in)`` by ``eta_A * d_in / sqrt(d_in) = eta_A sqrt(d_in)`` and the adapter's output
``h B / sqrt(r)`` by ``eta_B sqrt(r)``; both are O(1) (features learn, neither side stalls nor
blows up) exactly when ``eta_A ~ d_in^-1/2`` and ``eta_B ~ r^-1/2``. Measured in the matrices the
forward pass actually uses (``A / sqrt(d_in)``, ``B / sqrt(r)``) the per-step changes are
``eta / (d_in sqrt(L))`` and ``eta / (r sqrt(L))``: a ratio ``d_in / r``, i.e. Theta(width) at a
fixed rank, which is LoRA+'s finding (Hayou et al., 2024: in SP with Adam, ``eta_B / eta_A``
should grow like the width ``n``; their fixed ratio ``lambda ~ 2^4`` is the value at their
widths). u-muP derives it from the metadata alone, so one global ``eta`` should serve every
width and rank (``experiments/lora.py`` measures whether it does), whereas SP's LoRA, with
``mult = alpha / r`` and one learning rate for both, needs the ratio tuned by hand.

``merge_lora`` folds the adapters into the kernels: ``linear(x, W') = linear(x, W) + mult *
linear(linear(x, A), B)`` for ``W' = W + mult * linear(A, B)`` (``linear(A, B) = s(r) A B`` with
the parametrization's forward scale ``s(r)``: ``r^-1/2`` for u-muP, 1 for SP), then zeroes ``B``.

The adapters run in the compute dtype without the precision policy (they are small; the base
projection keeps its policy).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax.nn.parametrization import Parametrization, get_parametrization
from unitscale_jax.nn.sharding import param_metadata
from unitscale_jax.params import umup_param

LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "qkv": ("attn.qkv_proj", "cross_attn.q_proj", "cross_attn.kv_proj"),
    "attn_out": ("attn.out_proj", "cross_attn.out_proj"),
    "ffn_up": ("mlp.up_proj",),
    "ffn_gate": ("mlp.gate_proj",),
    "ffn_down": ("mlp.down_proj",),
}
"""LoRA target name -> the ``Linear`` roles it adapts."""

ADAPTER_NAME = "lora"
"""The attribute (and parameter-path entry) of a layer's adapter: ``.../qkv_proj/lora/a``."""


def parse_lora_targets(spec: Optional[str]) -> tuple[str, ...]:
    """The targets of a comma-separated spec (``"qkv,ffn_down"``); ``None`` or ``""`` -> ().

    Raises:
      ValueError: an unknown target, listing the valid ones.
    """
    if spec is None:
        return ()
    names = tuple(dict.fromkeys(t.strip() for t in str(spec).split(",") if t.strip()))
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(map(repr, unknown))}; the valid "
                         f"targets are {', '.join(LORA_TARGETS)} (comma-separated).")
    return names


def check_lora_rank(rank: Any) -> int:
    """``rank`` as an int; raises ValueError unless it is a positive int."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int (e.g. 8), got {rank!r}.")
    return rank


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which projections get adapters, of what rank and multiplier.

    Attributes:
      targets: names from ``LORA_TARGETS``.
      rank: ``r``, the inner width of every adapter.
      mult: the adapter's output multiplier (a u-muP-style multiplier; for SP's usual
        parametrization pass ``alpha / r``).
    """

    targets: tuple[str, ...]
    rank: int = 8
    mult: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "targets", parse_lora_targets(",".join(self.targets)))
        check_lora_rank(self.rank)
        if not (float(self.mult) > 0 and math.isfinite(float(self.mult))):
            raise ValueError(f"LoRA mult must be a finite float > 0, got {self.mult!r}.")

    @property
    def roles(self) -> frozenset:
        """Every ``Linear`` role the targets adapt."""
        return frozenset(r for t in self.targets for r in LORA_TARGETS[t])

    def applies_to(self, role: str) -> bool:
        return role in self.roles


class LoRAAdapter(nnx.Module):
    """The low-rank update ``mult * linear(linear(x, A), B)`` of one projection.

    Args:
      in_features: the projection's fan-in ``d_in``.
      out_features: its fan-out.
      rank: ``r``.
      mult: output multiplier.
      rngs: ``nnx.Rngs`` (``A``'s init).
      depth: residual-stack depth (metadata), or None.
      parametrization: the projection's parametrization.
      sharding: the projection kernel's logical axis names ``(in, out)``.
      dtype: compute dtype (None: the input's).
      param_dtype: storage dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, mult: float,
                 rngs: nnx.Rngs, depth: Optional[int] = None,
                 parametrization: Any = "umup",
                 sharding: Sequence[Optional[str]] = (None, None), dtype: Any = None,
                 param_dtype: Any = jnp.float32):
        self.rank = check_lora_rank(rank)
        self.mult = float(mult)
        self.parametrization: Parametrization = get_parametrization(parametrization)
        self.dtype = dtype
        std = self.parametrization.init_std("weight", int(in_features), None)
        a = std * jax.random.normal(rngs.params(), (int(in_features), self.rank), jnp.float32)
        self.a = umup_param(a.astype(param_dtype), "weight", int(in_features), depth,
                            **param_metadata((sharding[0], None)))
        self.b = umup_param(jnp.zeros((self.rank, int(out_features)), param_dtype), "weight",
                            self.rank, depth, **param_metadata((None, sharding[1])))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``mult * linear(linear(x, A), B)`` for ``x[..., d_in]`` -> ``[..., d_out]``."""
        dtype = self.dtype or x.dtype
        p = self.parametrization
        h = p.linear(x.astype(dtype), self.a[...].astype(dtype), constraint=None)
        return self.mult * p.linear(h, self.b[...].astype(dtype), constraint=None)

    def kernel_delta(self) -> jax.Array:
        """What ``merge_lora`` adds to the kernel: ``mult * linear(A, B)`` (``[d_in, d_out]``,
        or ``[layers, d_in, d_out]`` for a scanned stack's stacked adapters)."""
        a, b = self.a[...], self.b[...]
        fn = lambda a, b: self.mult * self.parametrization.linear(a, b, constraint=None)  # noqa: E731
        for _ in range(a.ndim - 2):
            fn = jax.vmap(fn)
        return fn(a.astype(jnp.float32), b.astype(jnp.float32))


def adapted_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """``(path, module)`` of every module of ``model`` that carries a ``LoRAAdapter``."""
    return [(path, m) for path, m in model.iter_modules()
            if isinstance(getattr(m, ADAPTER_NAME, None), LoRAAdapter)]


def merge_lora(model: nnx.Module) -> int:
    """Folds every adapter of ``model`` into its layer's kernel, in place, and zeroes ``B``
    (the model computes the same function; training it further starts a new adapter).

    Returns:
      The number of adapted layers merged.
    """
    layers = adapted_layers(model)
    for _, m in layers:
        adapter = getattr(m, ADAPTER_NAME)
        kernel = m.kernel[...]
        m.kernel[...] = (kernel.astype(jnp.float32) + adapter.kernel_delta()).astype(kernel.dtype)
        adapter.b[...] = jnp.zeros_like(adapter.b[...])
    return len(layers)


def is_adapter_path(path: Sequence[Any]) -> bool:
    """Whether a parameter path (strings, or ``jax.tree_util`` keys) lies inside an adapter."""
    return any(str(getattr(k, "key", getattr(k, "name", k))) == ADAPTER_NAME for k in path)


def is_adapter_name(name: str) -> bool:
    """Whether a dotted parameter name (``stack.layers.attn.qkv_proj.lora.a``) is an adapter's."""
    return ADAPTER_NAME in name.split(".")


def trainable_labels(params: Any, trainable_top: Sequence[str] = ()) -> Any:
    """``"train"`` for each adapter leaf and each leaf under a top-level key in
    ``trainable_top`` (e.g. the task heads), ``"frozen"`` for the rest: the labels of
    ``optax.partition`` for LoRA training."""
    top = set(trainable_top)

    def label(path, _):
        first = str(getattr(path[0], "key", path[0])) if path else ""
        return "train" if is_adapter_path(path) or first in top else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


__all__ = ["ADAPTER_NAME", "LORA_TARGETS", "LoRAAdapter", "LoRASpec", "adapted_layers",
           "check_lora_rank", "is_adapter_name", "is_adapter_path", "merge_lora",
           "parse_lora_targets", "trainable_labels"]
