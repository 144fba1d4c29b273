"""Configuration of the Transformer models (decoder, encoder, encoder-decoder).

One frozen dataclass describes every model of ``unitscale_jax.nn``; ``parametrization``
switches the same module code between u-muP (``"umup"``, the default), the standard
parametrization (``"sp"``) and muP (``"mup"``). Invalid settings raise at construction with a
message saying what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax.numpy as jnp

from unitscale_jax.nn.parametrization import PARAMETRIZATIONS, Parametrization, get_parametrization
from unitscale_jax.ops.plain import (
    ATTENTION_BLOCK_KV,
    ATTENTION_BLOCK_Q,
    ATTENTION_IMPLEMENTATIONS,
    ATTENTION_KINDS,
    PALLAS_TPU_HEAD_DIM_TILE,
    check_block_sizes,
)
from unitscale_jax.params import check_depth_exponent

MLP_KINDS = ("swiglu", "gelu")
ATTENTION_PATTERN_KINDS = ("local", "global")
NORM_KINDS = ("rms", "layer")


def _dtype(value: Any, name: str) -> jnp.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"TransformerConfig.{name}: {value!r} is not a dtype (use e.g. 'float32' "
                         "or 'bfloat16').") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"TransformerConfig.{name} must be a floating-point dtype, got {dtype}.")
    return dtype


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a Transformer of ``unitscale_jax.nn``.

    Attributes:
      vocab_size: number of token ids (ids must lie in ``[0, vocab_size)``).
      d_model: width of the residual stream.
      n_layers: number of Transformer layers (of the encoder, for an encoder-decoder).
      n_heads: number of attention heads.
      n_kv_heads: number of key/value heads (grouped-query attention, Ainslie et al., 2023;
        1 is multi-query attention, Shazeer, 2019): query head ``h`` reads kv head
        ``h // (n_heads // n_kv_heads)``; must divide ``n_heads``. None means ``n_heads``
        (ordinary multi-head attention). The KV cache holds ``n_kv_heads`` heads.
      d_head: width of one head; default ``d_model // n_heads``.
      ffn_mult: hidden width of the MLP as a multiple of ``d_model`` (used if ``d_ff`` is None).
      d_ff: explicit hidden width of the MLP.
      max_seq_len: longest accepted sequence (checked at trace time).
      mlp: ``"swiglu"`` (default, as u-muP) or ``"gelu"``.
      norm: ``"rms"`` (default) or ``"layer"``.
      parametric_norm: give the norms a learnable gain (u-muP's default is non-parametric).
      bias: give linear layers biases (default False, as u-muP).
      dropout: attention-probability and residual-branch dropout rate.
      attention_impl: attention backend: auto (cuDNN on a GPU, the Pallas kernel on a TPU,
        where they can run; chunked for keys longer than ``ops.plain.CHUNKED_MIN_KV_LEN``;
        else XLA), xla (dense), cudnn (GPU, bfloat16/float16), chunked (memory-efficient
        blockwise attention, no dropout) or pallas_tpu (the TPU flash-attention kernel; no
        dropout, d_head below 128 or a multiple of 128).
      attention_block_q: query block size of the chunked attention backend (and of
        pallas_tpu, where it must be a multiple of 8); clipped to the sequence length.
      attention_block_kv: key block size of the chunked attention backend (and of
        pallas_tpu, where it must be a multiple of 128); clipped to the sequence length.
      attention_kind: softmax (default: ``ops.scaled_dot_product_attention``) or linear
        (kernelised linear attention, ``ops.linear_attention``: ``phi(x) = elu(x) + 1``,
        O(S) time and memory, a recurrent state as the decoding cache; it has no attention
        dropout, ``dropout`` then applies to the residual branches only, and no backend
        choice or logits multiplier: ``attention_impl`` must stay auto, ``attn_mult`` 1).
      attention_window: width ``W`` of the sliding-window (local) attention layers; None
        (default) for none. Causal layers see the ``W`` keys ``t - W + 1 .. t``,
        bidirectional ones ``W`` on each side (``ops.patterns.window_keep``); u-muP's
        attention scale follows the window (``ops.attention_scale``), and a decoder's local
        layers keep ring-buffer KV caches of ``W`` entries (``nn.decoder.empty_cache``).
      attention_pattern: which layers are local (sliding window) and which global: a
        comma-separated cycle of ``local`` and ``global``, layer ``l`` taking entry ``l mod
        len`` (e.g. ``local,global``); default (None) every layer local when
        ``attention_window`` is set, else every layer global. Works scanned or not.
      rope: rotary position encoding on q and k (default False: no position encoding, as in
        u-muP's decoder; encoders usually want True since bidirectional attention without
        positions cannot tell token order).
      rope_theta: RoPE base.
      attn_mult: u-muP's ``alpha_attn-softmax`` (attention logits multiplier).
      act_mult: u-muP's ``alpha_ffn-act`` (MLP activation multiplier).
      residual_mult: u-muP's ``alpha_res``.
      residual_attn_ratio: u-muP's ``alpha_res-attn-ratio`` (rho). Below 1 it weights the
        attention branches less against the MLP branches; 0.25 keeps deep, long-context and
        bidirectional models much closer to unit scale at init, where flat attention makes
        positions share a component that the attention scale amplifies
        (``experiments/results/init_scales.md``).
      depth_exponent: the residual stack's depth exponent ``a`` in ``[0.5, 1]`` (u-muP only):
        each branch is weighted ``n_layers^-a`` against the embedding
        (``ops.transformer_residual_scaling_rule``) and the stack's parameters carry it, so
        the u-muP optimizer gives them the learning-rate factor ``depth^(a - 1)``
        (``optim.umup_factor``). 0.5 is u-muP's rule (depth-muP); 1 is CompleteP's (Dey et
        al., 2025).
      loss_mult: u-muP's ``alpha_loss-softmax`` (cross-entropy multiplier).
      parametrization: a ``Parametrization`` object, or its name: ``"umup"``, ``"sp"``
        (standard: GPT-style init, 1/sqrt(d_head) attention, plain maths) or ``"mup"`` (muP:
        N(0, 1/fan_in) hidden init, 1/d_head attention, readout multiplied by 1/fan_in,
        plain maths otherwise); stored as the object.
      sp_init_std: std of SP's weights and embeddings (GPT-2: 0.02; residual output
        projections get ``sp_init_std / sqrt(2 n_layers)``); None means ``fan_in^-1/2``.
      check_ids: check at run time that token ids lie in ``[0, vocab_size)``.
      dtype: compute dtype (activations), e.g. ``"bfloat16"``.
      param_dtype: dtype the parameters are stored in.
      scan_layers: stack the layers and run them with ``jax.lax.scan`` (compile time
        independent of depth).
      remat: rematerialise each layer in the backward pass (``jax.checkpoint``).
      n_decoder_layers: decoder depth of an encoder-decoder (default ``n_layers``).
      norm_eps: epsilon of the norms.
      precision: optional low-precision policy (``unitscale_jax.precision.PrecisionPolicy``
        or any hashable object with its ``linear``, ``dot``, ``attention_inputs`` and
        ``attention_output`` methods, see ``unitscale_jax.nn.hooks``) applied to every
        projection and to q, k, v. None: no-op.
      lora_targets: LoRA adapters (``unitscale_jax.nn.lora``) on these projections of every
        layer: a comma-separated subset of qkv, attn_out, ffn_up, ffn_gate, ffn_down; None
        (default) for none. Training then updates the adapters (and task heads) only.
      lora_rank: the adapters' rank ``r`` (a positive int).
      lora_mult: the adapters' output multiplier (u-muP's LoRA multiplier; for SP's usual
        LoRA scaling pass ``alpha / r``).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    d_head: Optional[int] = None
    ffn_mult: float = 4.0
    d_ff: Optional[int] = None
    max_seq_len: int = 1024
    mlp: str = "swiglu"
    norm: str = "rms"
    parametric_norm: bool = False
    bias: bool = False
    dropout: float = 0.0
    attention_impl: str = "auto"
    attention_block_q: int = ATTENTION_BLOCK_Q
    attention_block_kv: int = ATTENTION_BLOCK_KV
    attention_kind: str = "softmax"
    attention_window: Optional[int] = None
    attention_pattern: Optional[str] = None
    rope: bool = False
    rope_theta: float = 10000.0
    attn_mult: float = 1.0
    act_mult: float = 1.0
    residual_mult: float = 1.0
    residual_attn_ratio: float = 1.0
    depth_exponent: float = 0.5
    loss_mult: float = 1.0
    parametrization: Any = "umup"
    sp_init_std: Optional[float] = 0.02
    check_ids: bool = False
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    scan_layers: bool = True
    remat: bool = False
    n_decoder_layers: Optional[int] = None
    norm_eps: float = 1e-5
    precision: Any = None
    lora_targets: Optional[str] = None
    lora_rank: int = 8
    lora_mult: float = 1.0

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"TransformerConfig: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail(f"{name} must be a positive int, got {v!r}.")
        if self.vocab_size < 2:
            fail(f"vocab_size must be >= 2, got {self.vocab_size}.")
        if self.d_head is None:
            if self.d_model % self.n_heads:
                fail(f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); "
                     f"change one of them or set d_head explicitly.")
        elif not isinstance(self.d_head, int) or self.d_head < 1:
            fail(f"d_head must be a positive int or None, got {self.d_head!r}.")
        try:
            check_kv_heads(self.n_heads, self.n_kv_heads)
        except ValueError as e:
            fail(str(e))
        if self.rope and self.head_dim % 2:
            fail(f"rope=True needs an even d_head, got {self.head_dim}.")
        if self.d_ff is None:
            if not self.ffn_mult > 0:
                fail(f"ffn_mult must be > 0, got {self.ffn_mult}.")
        elif not isinstance(self.d_ff, int) or self.d_ff < 1:
            fail(f"d_ff must be a positive int or None, got {self.d_ff!r}.")
        if self.mlp not in MLP_KINDS:
            fail(f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}.")
        if self.norm not in NORM_KINDS:
            fail(f"norm must be one of {NORM_KINDS}, got {self.norm!r}.")
        if not isinstance(self.parametrization, Parametrization) and (
                self.parametrization not in PARAMETRIZATIONS):
            fail(f"parametrization must be one of {tuple(PARAMETRIZATIONS)} (or a "
                 f"Parametrization), got {self.parametrization!r}.")
        object.__setattr__(self, "parametrization", get_parametrization(self.parametrization))
        if not 0.0 <= float(self.dropout) < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            fail(f"attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                 f"{self.attention_impl!r}.")
        if self.attention_impl == "chunked" and float(self.dropout) > 0.0:
            fail("attention_impl='chunked' has no attention dropout; set dropout=0 or use "
                 "'auto' or 'xla'.")
        problem = linear_attention_problem(self.attention_kind, self.attention_impl,
                                           self.attn_mult)
        if problem:
            fail(problem)
        check_block_sizes(self.attention_block_q, self.attention_block_kv, self.attention_impl,
                          names=("attention_block_q", "attention_block_kv"),
                          op="TransformerConfig")
        if self.attention_impl == "pallas_tpu":
            if float(self.dropout) > 0.0:
                fail("attention_impl='pallas_tpu' has no attention dropout; set dropout=0 or use "
                     "'auto' or 'xla'.")
            tile = PALLAS_TPU_HEAD_DIM_TILE
            if self.head_dim >= tile and self.head_dim % tile:
                fail(f"attention_impl='pallas_tpu' needs d_head below {tile} "
                     f"or a multiple of it, got {self.head_dim}.")
        self._check_attention_pattern(fail)
        if self.attention_kind == "linear" and self.attention_window is not None:
            fail("attention_window is for softmax attention; linear attention has no window "
                 "(leave attention_window unset, or use attention_kind='softmax').")
        for name in ("attn_mult", "act_mult", "residual_mult", "residual_attn_ratio",
                     "loss_mult", "rope_theta", "norm_eps"):
            v = float(getattr(self, name))
            if not (v > 0 and math.isfinite(v)):
                fail(f"{name} must be a finite float > 0, got {getattr(self, name)!r}.")
        if isinstance(self.depth_exponent, bool) or not isinstance(
                self.depth_exponent, (int, float)):
            fail(f"depth_exponent must be a float, got {self.depth_exponent!r}.")
        try:
            check_depth_exponent(self.depth_exponent)
        except ValueError as e:
            fail(str(e))
        if self.sp_init_std is not None and not float(self.sp_init_std) > 0:
            fail(f"sp_init_std must be > 0 or None, got {self.sp_init_std}.")
        if self.n_decoder_layers is not None and (
                not isinstance(self.n_decoder_layers, int) or self.n_decoder_layers < 1):
            fail(f"n_decoder_layers must be a positive int or None, got {self.n_decoder_layers!r}.")
        object.__setattr__(self, "dtype", _dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", _dtype(self.param_dtype, "param_dtype"))
        from unitscale_jax.nn.hooks import check_policy
        try:
            check_policy(self.precision)
        except ValueError as e:
            fail(str(e))
        from unitscale_jax.nn.lora import LoRASpec, parse_lora_targets
        try:
            spec = LoRASpec(parse_lora_targets(self.lora_targets), self.lora_rank,
                            self.lora_mult)
        except ValueError as e:
            fail(str(e))
        object.__setattr__(self, "_lora_spec", spec if spec.targets else None)

    def _check_attention_pattern(self, fail) -> None:
        w = self.attention_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            fail(f"attention_window must be a positive int (the keys each query sees on its "
                 f"side) or None, got {w!r}.")
        if self.attention_pattern is None:
            return
        kinds = [k.strip() for k in str(self.attention_pattern).split(",")]
        if any(k not in ATTENTION_PATTERN_KINDS for k in kinds):
            fail(f"attention_pattern must be a comma-separated cycle of "
                 f"{ATTENTION_PATTERN_KINDS} (e.g. 'local,global'), got "
                 f"{self.attention_pattern!r}.")
        if "local" in kinds and w is None:
            fail(f"attention_pattern {self.attention_pattern!r} has local layers but "
                 f"attention_window is None; set attention_window (e.g. 256).")

    def layer_windows(self, n_layers: int) -> tuple:
        """The sliding window of each of ``n_layers`` self-attention layers (None: global),
        from ``attention_pattern`` and ``attention_window``."""
        if self.attention_pattern is None:
            return (self.attention_window,) * n_layers
        kinds = [k.strip() for k in self.attention_pattern.split(",")]
        return tuple(self.attention_window if kinds[l % len(kinds)] == "local" else None
                     for l in range(n_layers))

    @property
    def lora_spec(self):
        """The ``nn.lora.LoRASpec`` of ``lora_targets`` / ``lora_rank`` / ``lora_mult``, or None
        without targets."""
        return self._lora_spec

    @property
    def head_dim(self) -> int:
        """Width of one attention head (``d_head``, or ``d_model // n_heads``)."""
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_heads``, or ``n_heads``)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the MLP (``d_ff``, or ``round(ffn_mult * d_model)``)."""
        return (self.d_ff if self.d_ff is not None
                else max(1, int(round(self.ffn_mult * self.d_model))))

    @property
    def decoder_layers(self) -> int:
        """Depth of the decoder stack of an encoder-decoder."""
        return self.n_decoder_layers or self.n_layers

    def replace(self, **changes: Any) -> "TransformerConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"TransformerConfig has no field(s) {sorted(unknown)}.")
        return dataclasses.replace(self, **changes)


def check_kv_heads(n_heads: int, n_kv_heads: Optional[int]) -> int:
    """The number of key/value heads: ``n_kv_heads`` (default ``n_heads``).

    Raises:
      ValueError: ``n_kv_heads`` is not a positive divisor of ``n_heads``.
    """
    if n_kv_heads is None:
        return int(n_heads)
    if (isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads < 1
            or n_heads % n_kv_heads):
        raise ValueError(f"n_kv_heads must be a positive divisor of n_heads ({n_heads}) or "
                         f"None, got {n_kv_heads!r}.")
    return n_kv_heads


def linear_attention_problem(kind: str, attention_impl: str, attn_mult: float) -> Optional[str]:
    """What is wrong with an ``attention_kind`` and the settings it must agree with, or None.

    An unknown kind (listing ``ops.plain.ATTENTION_KINDS``); linear attention with a named
    backend (``attention_impl`` chooses among softmax kernels) or a logits multiplier
    (linear attention has no logits).
    """
    if kind not in ATTENTION_KINDS:
        return f"attention_kind must be one of {ATTENTION_KINDS}, got {kind!r}."
    if kind == "linear" and attention_impl != "auto":
        return (f"attention_impl={attention_impl!r} picks a softmax-attention backend; linear "
                f"attention has one kernel: leave attention_impl='auto' with "
                f"attention_kind='linear'.")
    if kind == "linear" and float(attn_mult) != 1.0:
        return (f"attn_mult={attn_mult} multiplies softmax attention's logits; linear "
                f"attention has none: leave attn_mult=1 with attention_kind='linear'.")
    return None


def resolve_config(config: Optional[TransformerConfig], overrides: dict) -> TransformerConfig:
    """The config a model is built from: ``config`` with ``overrides``, or one made of them."""
    if config is None:
        try:
            return TransformerConfig(**overrides)
        except TypeError as e:
            raise TypeError(
                f"pass a TransformerConfig or its fields as keyword arguments: {e}") from e
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}.")
    return config.replace(**overrides) if overrides else config
