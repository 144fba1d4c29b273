"""Parametrizations as objects: u-muP, the standard parametrization (SP) and muP.

A parametrization owns everything the modules would otherwise branch on: how a parameter is
initialised, the projection and readout rule, the embedding, norm, activation and dropout
forms, the attention logit and output scales, the residual rule and the loss. The modules of
``unitscale_jax.nn`` hold one of these objects and ask it; they never compare names.

- ``UMuP`` (Blake et al., 2025): every op unit-scaled (``unitscale_jax.ops``), weights
  N(0, 1), attention logits ``mult / d_head``, u-muP's residual rule ``residual_apply``
  with ``tau`` from ``ops.transformer_residual_scaling_rule``.
- ``SP``: the same computation with no scales (``unitscale_jax.ops.plain``), GPT-style init
  (``sp_std``, or ``fan_in^-1/2``), ``1/sqrt(d_head)`` attention, plain ``x + f(x)``
  residuals, the ordinary mean cross-entropy.
- ``MuP`` (Yang et al. 2022, table 3): SP's maths with N(0, 1/fan_in) hidden weights,
  ``mult / d_head`` attention and the readout multiplied by ``1/fan_in``.

The objects are frozen and hashable (static module structure under ``jax.jit``);
``get_parametrization("umup" | "sp" | "mup")`` maps the names the API and CLI accept.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar, Optional, Union

import jax

from unitscale_jax import ops
from unitscale_jax.ops import plain

DotGeneral = Optional[Callable[..., jax.Array]]


@dataclasses.dataclass(frozen=True)
class Parametrization:
    """The interface every parametrization implements (see the module docstring).

    Attributes:
      name: the name the API and CLI use.
      unit_scaled: whether the ops are unit-scaled (its models then use u-muP's optimizer
        rules, ``unitscale_jax.optim``).
    """

    name: ClassVar[str] = ""
    unit_scaled: ClassVar[bool] = False

    def __str__(self) -> str:
        return self.name

    # -- initialisation ---------------------------------------------------------------------
    def init_std(self, type: str, fan_in: int, sp_std: Optional[float]) -> float:
        """Std of a ``"weight"`` / ``"embedding"`` / ``"output"`` parameter at init."""
        raise NotImplementedError

    # -- projections -------------------------------------------------------------------------
    def linear(self, x, kernel, bias=None, *, constraint: Optional[str] = "to_output_scale",
               dot_general: DotGeneral = None) -> jax.Array:
        """A hidden projection ``x[..., fan_in] @ kernel[fan_in, fan_out] (+ bias)``."""
        raise NotImplementedError

    def readout(self, x, kernel, bias=None, *, dot_general: DotGeneral = None) -> jax.Array:
        """The final projection to logits (LM readout and classification heads)."""
        raise NotImplementedError

    def embedding(self, ids, table, *, check_ids: bool = False) -> jax.Array:
        return plain.embedding(ids, table, check_ids=check_ids)

    # -- norms, activations, dropout ---------------------------------------------------------
    def layer_norm(self, x, scale=None, bias=None, *, eps: float = 1e-5) -> jax.Array:
        return plain.layer_norm(x, scale, bias, eps=eps)

    def rms_norm(self, x, scale=None, *, eps: float = 1e-5) -> jax.Array:
        return plain.rms_norm(x, scale, eps=eps)

    def silu_glu(self, x, gate, *, mult: float = 1.0) -> jax.Array:
        del mult  # u-muP's activation multiplier
        return plain.silu_glu(x, gate)

    def gelu(self, x, *, mult: float = 1.0) -> jax.Array:
        del mult
        return plain.gelu(x)

    def dropout(self, x, rate: float, *, rng=None, deterministic: bool = False) -> jax.Array:
        return plain.dropout(x, rate, rng=rng, deterministic=deterministic)

    # -- attention ---------------------------------------------------------------------------
    def attention_logit_scale(self, d_head: int, mult: float) -> float:
        """The multiplier of ``q k^T`` (SP: ``1/sqrt(d_head)``)."""
        del mult
        return 1.0 / math.sqrt(d_head)

    def attention(self, q, k, v, *, mask=None, is_causal: bool = False, mult: float = 1.0,
                  dropout_rate: float = 0.0, rng=None, scale_seq_len: Optional[int] = None,
                  scale_is_causal: Optional[bool] = None,
                  implementation: Optional[str] = None,
                  block_q: int = plain.ATTENTION_BLOCK_Q,
                  block_kv: int = plain.ATTENTION_BLOCK_KV, window: Optional[int] = None,
                  scale_window: Optional[int] = None) -> jax.Array:
        """Attention in ``[batch, seq, heads, head_dim]`` layout (``scale_seq_len``,
        ``scale_is_causal`` and ``scale_window`` only matter to u-muP's output scale;
        ``implementation`` is the backend of ``ops.plain.dot_product_attention``:
        ``"auto"``/None, ``"xla"``, ``"cudnn"``, ``"chunked"`` or ``"pallas_tpu"``,
        ``block_q`` and ``block_kv`` the block sizes of the blockwise ones; ``window`` its
        sliding window)."""
        del scale_seq_len, scale_is_causal, scale_window
        return plain.dot_product_attention(
            q, k, v, logit_scale=self.attention_logit_scale(q.shape[-1], mult), mask=mask,
            is_causal=is_causal, dropout_rate=dropout_rate, rng=rng,
            implementation=implementation, block_q=block_q, block_kv=block_kv, window=window)

    def linear_attention(self, q, k, v, *, mask=None, is_causal: bool = False, state=None,
                         scale_seq_len: Optional[int] = None,
                         scale_is_causal: Optional[bool] = None):
        """Kernelised linear attention (``ops.plain.linear_attention``; ``state``: the causal
        decoding state, then ``(output, new_state)`` is returned; ``scale_seq_len`` and
        ``scale_is_causal`` only matter to u-muP's scales)."""
        del scale_seq_len, scale_is_causal
        return plain.linear_attention(q, k, v, is_causal=is_causal, mask=mask, state=state)

    # -- residuals and the loss --------------------------------------------------------------
    def residual(self, branch: Callable[[jax.Array], jax.Array], x, tau) -> jax.Array:
        """``x`` plus the residual branch ``branch`` (``tau``: u-muP's weight of the branch)."""
        del tau
        return x + branch(x)

    def cross_entropy(self, logits, labels, *, mult: float = 1.0, where=None,
                      check_ids: bool = False) -> jax.Array:
        """Mean cross-entropy over the ``where``-selected positions (``mult``: u-muP's
        loss-softmax multiplier)."""
        del mult
        return plain.cross_entropy(logits, labels, where=where, check_ids=check_ids)

    def loss_logits(self, logits, mult: float = 1.0) -> jax.Array:
        """The logits the loss's softmax reads (u-muP: ``mult * logits``; SP drops ``mult``, as
        its ``cross_entropy`` does): how a teacher's logits enter a student's distillation
        loss."""
        del mult
        return logits

    def distillation_loss(self, logits, labels, teacher_logits, *, temperature: float,
                          weight: float, mult: float = 1.0, where=None) -> jax.Array:
        """``weight * kl_divergence + (1 - weight) * cross_entropy`` (Hinton et al., 2015):
        ``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - weight) *
        CE(student, labels)``; a term of weight 0 is not computed."""
        terms = []
        if weight > 0:
            terms.append(weight * self.kl_divergence(logits, teacher_logits,
                                                     temperature=temperature, mult=mult,
                                                     where=where))
        if weight < 1:
            terms.append((1 - weight) * self.cross_entropy(logits, labels, mult=mult,
                                                           where=where))
        return sum(terms[1:], terms[0])

    def kl_divergence(self, logits, teacher_logits, *, temperature: float = 1.0,
                      mult: float = 1.0, where=None) -> jax.Array:
        """Mean distillation loss ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` over
        the ``where``-selected positions (``mult``: u-muP's loss-softmax multiplier)."""
        del mult
        return plain.kl_divergence(logits, teacher_logits, temperature=temperature,
                                   where=where)


@dataclasses.dataclass(frozen=True)
class UMuP(Parametrization):
    """u-muP: every op from ``unitscale_jax.ops`` (values and gradients of the reference)."""

    name: ClassVar[str] = "umup"
    unit_scaled: ClassVar[bool] = True

    def init_std(self, type, fan_in, sp_std):
        return 1.0

    def linear(self, x, kernel, bias=None, *, constraint="to_output_scale", dot_general=None):
        return ops.linear(x, kernel, bias, constraint=constraint, dot_general=dot_general)

    def readout(self, x, kernel, bias=None, *, dot_general=None):
        return ops.linear_readout(x, kernel, bias, dot_general=dot_general)

    def embedding(self, ids, table, *, check_ids=False):
        return ops.embedding(ids, table, check_ids=check_ids)

    def layer_norm(self, x, scale=None, bias=None, *, eps=1e-5):
        return ops.layer_norm(x, scale, bias, eps=eps)

    def rms_norm(self, x, scale=None, *, eps=1e-5):
        return ops.rms_norm(x, scale, eps=eps)

    def silu_glu(self, x, gate, *, mult=1.0):
        return ops.silu_glu(x, gate, mult=mult)

    def gelu(self, x, *, mult=1.0):
        return ops.gelu(x, mult=mult)

    def dropout(self, x, rate, *, rng=None, deterministic=False):
        return ops.dropout(x, rate, rng=rng, deterministic=deterministic)

    def attention_logit_scale(self, d_head, mult):
        return mult / d_head

    def attention(self, q, k, v, *, mask=None, is_causal=False, mult=1.0, dropout_rate=0.0,
                  rng=None, scale_seq_len=None, scale_is_causal=None, implementation=None,
                  block_q=plain.ATTENTION_BLOCK_Q, block_kv=plain.ATTENTION_BLOCK_KV,
                  window=None, scale_window=None):
        return ops.scaled_dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, mult=mult, dropout_rate=dropout_rate,
            rng=rng, scale_seq_len=scale_seq_len, scale_is_causal=scale_is_causal,
            implementation=implementation, block_q=block_q, block_kv=block_kv, window=window,
            scale_window=scale_window)

    def linear_attention(self, q, k, v, *, mask=None, is_causal=False, state=None,
                         scale_seq_len=None, scale_is_causal=None):
        return ops.linear_attention(q, k, v, is_causal=is_causal, mask=mask, state=state,
                                    scale_seq_len=scale_seq_len, scale_is_causal=scale_is_causal)

    def residual(self, branch, x, tau):
        return ops.residual_apply(branch, x, tau)

    def cross_entropy(self, logits, labels, *, mult=1.0, where=None, check_ids=False):
        return ops.cross_entropy(logits, labels, mult=mult, where=where, check_ids=check_ids)

    def loss_logits(self, logits, mult=1.0):
        return logits if mult == 1.0 else mult * logits

    def kl_divergence(self, logits, teacher_logits, *, temperature=1.0, mult=1.0, where=None):
        return ops.kl_divergence(logits, teacher_logits, temperature=temperature, mult=mult,
                                 where=where)


@dataclasses.dataclass(frozen=True)
class SP(Parametrization):
    """The standard parametrization: plain maths, GPT-style init, ``1/sqrt(d_head)`` attention."""

    name: ClassVar[str] = "sp"

    def init_std(self, type, fan_in, sp_std):
        return float(sp_std) if sp_std is not None else fan_in ** -0.5

    def linear(self, x, kernel, bias=None, *, constraint="to_output_scale", dot_general=None):
        del constraint
        return plain.linear(x, kernel, bias, dot_general=dot_general)

    def readout(self, x, kernel, bias=None, *, dot_general=None):
        return plain.linear(x, kernel, bias, dot_general=dot_general)


@dataclasses.dataclass(frozen=True)
class MuP(SP):
    """muP (Yang et al. 2022, table 3): N(0, 1/fan_in) hidden weights, ``mult / d_head``
    attention logits, readout multiplied by ``1/fan_in``; plain maths otherwise."""

    name: ClassVar[str] = "mup"

    def init_std(self, type, fan_in, sp_std):
        return fan_in ** -0.5 if type == "weight" else 1.0

    def readout(self, x, kernel, bias=None, *, dot_general=None):
        return plain.linear(x, kernel, bias, mult=1.0 / kernel.shape[0], dot_general=dot_general)

    def attention_logit_scale(self, d_head, mult):
        return mult / d_head


PARAMETRIZATIONS: dict[str, type[Parametrization]] = {c.name: c for c in (UMuP, SP, MuP)}


def get_parametrization(p: Union[str, Parametrization]) -> Parametrization:
    """The parametrization object for a name (``"umup"``, ``"sp"``, ``"mup"``) or an object.

    Raises:
      ValueError: an unknown name, listing the valid ones.
    """
    if isinstance(p, Parametrization):
        return p
    if p not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {p!r}; use one of {tuple(PARAMETRIZATIONS)} "
                         "or a unitscale_jax.nn.Parametrization.")
    return PARAMETRIZATIONS[p]()
