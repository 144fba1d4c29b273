"""``TransformerEncoderDecoder``: a T5-style sequence-to-sequence model."""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax.nn import _common
from unitscale_jax.nn.config import TransformerConfig, resolve_config
from unitscale_jax.nn.decoder import LOGITS, STREAM, empty_cache
from unitscale_jax.nn.layers import make_embedding, make_norm, make_readout
from unitscale_jax.nn.sharding import constrain
from unitscale_jax.nn.transformer import TransformerStack
from unitscale_jax.taps import tap

_NAME = "TransformerEncoderDecoder"


class TransformerEncoderDecoder(nnx.Module):
    """Encoder-decoder Transformer (T5-style) in u-muP (default), SP or muP form.

    One embedding table is shared by source and target tokens (as T5); the encoder is a
    bidirectional stack of ``n_layers`` layers with a final norm, the decoder a causal stack
    of ``n_decoder_layers`` (default ``n_layers``) layers with self attention, cross
    attention to the encoder output and an MLP (three residual branches per layer, taus from
    ``branch_taus``), then a final norm and an untied readout. Each stack's parameters carry
    its own depth.

    Target sequences start with a start token: ``tgt[:, t]`` predicts ``tgt[:, t + 1]``.

    Args:
      config: ``TransformerConfig`` (keyword arguments override its fields, or build it).
      rngs: ``nnx.Rngs``.
    """

    def __init__(self, config: Optional[TransformerConfig] = None, *, rngs: nnx.Rngs,
                 **overrides: Any):
        c = resolve_config(config, overrides)
        self.config = c
        self.deterministic = False
        self.embed = make_embedding(c, rngs)
        self.encoder = TransformerStack(c, n_layers=c.n_layers, rngs=rngs, causal=False)
        self.encoder_norm = make_norm(c, depth=None)
        self.decoder = TransformerStack(c, n_layers=c.decoder_layers, rngs=rngs, causal=True,
                                        cross_attention=True)
        self.final_norm = make_norm(c, depth=None)
        self.readout = make_readout(c, rngs, c.vocab_size)

    def encode(self, src: jax.Array, *, src_mask: Optional[jax.Array] = None,
               rng: Optional[jax.Array] = None) -> jax.Array:
        """Encoder output ``[batch, src_len, d_model]`` (after the encoder's final norm)."""
        c = self.config
        src = _common.check_ids(src, "src", c.max_seq_len, _NAME)
        m = _common.attention_mask(src_mask, *src.shape, _NAME, c.attention_kind,
                                   "src_mask")
        x = tap("src_embed", constrain(self.embed(src), STREAM))
        return tap("encoder_norm", self.encoder_norm(self.encoder(x, mask=m, rng=rng)))

    def decode(self, tgt: jax.Array, context: jax.Array, *, src_mask: Optional[jax.Array] = None,
               tgt_mask: Optional[jax.Array] = None, rng: Optional[jax.Array] = None) -> jax.Array:
        """Logits ``[batch, tgt_len, vocab]`` of the decoder given the encoder output."""
        c = self.config
        tgt = _common.check_ids(tgt, "tgt", c.max_seq_len, _NAME)
        _check_batch(context.shape[0], tgt.shape[0])
        m = _common.attention_mask(tgt_mask, *tgt.shape, _NAME, c.attention_kind,
                                   "tgt_mask")
        cm = _common.key_padding_mask(src_mask, context.shape[0], context.shape[1], _NAME,
                                      "src_mask")
        x = tap("tgt_embed", constrain(self.embed(tgt), STREAM))
        x = self.decoder(x, mask=m, context=context, context_mask=cm, rng=rng)
        x = tap("final_norm", self.final_norm(x))
        return tap("logits", constrain(self.readout(x, rng=_common.head_key(rng)), LOGITS))

    def __call__(self, src: jax.Array, tgt: jax.Array, *, src_mask: Optional[jax.Array] = None,
                 tgt_mask: Optional[jax.Array] = None,
                 rng: Optional[jax.Array] = None) -> jax.Array:
        """Logits ``[batch, tgt_len, vocab]``.

        Args:
          src: integer source ids ``[batch, src_len]``.
          tgt: integer target ids ``[batch, tgt_len]`` (starting with the start token).
          src_mask: source padding mask ``[batch, src_len]`` (True = real token).
          tgt_mask: target padding mask ``[batch, tgt_len]`` or attention mask.
          rng: PRNG key for dropout.
        """
        _check_batch(jnp.shape(src)[0], jnp.shape(tgt)[0])
        k1, k2 = jax.random.split(rng) if rng is not None else (None, None)
        context = self.encode(src, src_mask=src_mask, rng=k1)
        return self.decode(tgt, context, src_mask=src_mask, tgt_mask=tgt_mask, rng=k2)

    def loss(self, src: jax.Array, tgt: jax.Array, where: Optional[jax.Array] = None, *,
             targets: Optional[jax.Array] = None, src_mask: Optional[jax.Array] = None,
             tgt_mask: Optional[jax.Array] = None, rng: Optional[jax.Array] = None) -> jax.Array:
        """Mean cross-entropy of ``tgt[:, 1:]`` given ``src`` and ``tgt[:, :-1]``.

        Args:
          src: as ``__call__``.
          tgt: target ids ``[batch, tgt_len]`` starting with the start token; with
            ``targets``, the decoder inputs, each position predicting ``targets`` there.
          where: boolean mask of the target tokens that count, aligned with ``tgt`` (or with
            ``targets`` when given).
          targets: optional ``[batch, tgt_len]`` next tokens of ``tgt`` (a batch already
            split into decoder inputs and targets, as span corruption makes).
          src_mask: as ``__call__``.
          tgt_mask: target padding mask ``[batch, tgt_len]``: also drops padded targets.
          rng: as ``__call__``.
        """
        c = self.config
        tgt = jnp.asarray(tgt)
        where_shape = tgt.shape
        if targets is not None:
            targets = _common.check_labels(targets, tgt.shape, f"{_NAME}.loss", "targets")
            where = _common.check_where(where, where_shape, f"{_NAME}.loss")
            logits = self(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask, rng=rng)
            if tgt_mask is not None and jnp.ndim(tgt_mask) == 2:
                where = tgt_mask if where is None else jnp.logical_and(where, tgt_mask)
            return c.parametrization.cross_entropy(logits, targets, mult=c.loss_mult, where=where,
                                            check_ids=c.check_ids)
        if tgt.ndim != 2 or tgt.shape[1] < 2:
            raise ValueError(f"{_NAME}.loss: tgt must be [batch, tgt_len >= 2] "
                             f"(start token + targets), got {tgt.shape}.")
        where = _common.check_where(where, where_shape, f"{_NAME}.loss")
        in_mask = None
        if tgt_mask is not None:
            tgt_mask = jnp.asarray(tgt_mask)
            if tgt_mask.ndim != 2 or tgt_mask.shape != tgt.shape:
                raise ValueError(f"{_NAME}.loss: tgt_mask must be a padding mask of shape "
                                 f"{tgt.shape}, got {tgt_mask.shape}.")
            in_mask = tgt_mask[:, :-1]
        logits = self(src, tgt[:, :-1], src_mask=src_mask, tgt_mask=in_mask, rng=rng)
        scored = None if where is None else where[:, 1:]
        if tgt_mask is not None:
            real = jnp.logical_and(tgt_mask[:, 1:], tgt_mask[:, :-1])
            scored = real if scored is None else jnp.logical_and(scored, real)
        return c.parametrization.cross_entropy(logits, tgt[:, 1:], mult=c.loss_mult, where=scored,
                                        check_ids=c.check_ids)

    def init_cache(self, context: jax.Array, length: int) -> dict:
        """KV cache: empty self-attention cache and the cross-attention keys/values of
        ``context`` for every decoder layer."""
        cross = self.decoder.map_layers(lambda layer: layer.cross_attn.context_kv(context))
        return {"self": empty_cache(self.config, self.decoder.n_layers, context.shape[0], length),
                "cross": cross}

    def decode_step(self, ids: jax.Array, cache: dict, index: Any, *,
                    src_mask: Optional[jax.Array] = None,
                    scale_seq_len: Optional[int] = None) -> tuple[jax.Array, dict]:
        """Decoder logits for ``ids`` ``[batch, n]`` at positions ``index ...`` (cached)."""
        cm = None if src_mask is None else src_mask[:, None, None, :]
        x = self.embed(ids)
        x, cache = self.decoder(x, context_mask=cm, cache=cache, cache_index=index,
                                scale_seq_len=scale_seq_len)
        return self.readout(self.final_norm(x)), cache

    def generate(self, src: jax.Array, max_new_tokens: int, *, start_id: int = 0,
                 src_mask: Optional[jax.Array] = None, rng: Optional[jax.Array] = None,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 scale_seq_len: Optional[int] = None, return_logits: bool = False):
        """Generates targets for ``src`` with a KV cache (jitted).

        Args:
          src: integer ``[batch, src_len]``.
          max_new_tokens: number of tokens generated after the start token.
          start_id: the start token.
          src_mask: source padding mask.
          rng: PRNG key (required when ``temperature > 0``).
          temperature: 0 for greedy decoding, else softmax temperature.
          top_k: sample among the ``top_k`` most likely tokens.
          scale_seq_len: sequence length of the decoder's attention scaling rule; default
            ``1 + max_new_tokens``, so every step's logits equal a full forward pass over the
            returned targets.
          return_logits: also return the logits that chose each token.

        Returns:
          ``tokens [batch, 1 + max_new_tokens]`` (start token first), and ``logits [batch,
          max_new_tokens, vocab]`` if ``return_logits``.
        """
        c = self.config
        src = _common.check_ids(src, "src", c.max_seq_len, f"{_NAME}.generate")
        total = 1 + int(max_new_tokens)
        if int(max_new_tokens) < 1:
            raise ValueError(
                f"{_NAME}.generate: max_new_tokens must be >= 1, got {max_new_tokens}.")
        if total > c.max_seq_len:
            raise ValueError(f"{_NAME}.generate: 1 + max_new_tokens = {total} exceeds max_seq_len "
                             f"{c.max_seq_len}.")
        if not 0 <= int(start_id) < c.vocab_size:
            raise ValueError(f"{_NAME}.generate: start_id {start_id} outside [0, {c.vocab_size}).")
        _common.key_padding_mask(src_mask, *src.shape, _NAME, "src_mask")
        _common.check_sampling(temperature, top_k, rng, c.vocab_size, _NAME)
        if c.dropout > 0 and not self.decoder.deterministic:
            raise ValueError(f"{_NAME}.generate: dropout is on; call model.eval() first.")
        tokens, logits = _generate(self, src, src_mask, rng, start_id=int(start_id),
                                   max_new_tokens=int(max_new_tokens),
                                   temperature=float(temperature), top_k=top_k,
                                   scale_seq_len=scale_seq_len or total,
                                   return_logits=bool(return_logits))
        return (tokens, logits) if return_logits else tokens


def _check_batch(src_batch: int, tgt_batch: int) -> None:
    if src_batch != tgt_batch:
        raise ValueError(f"{_NAME}: source batch size {src_batch} != target batch size "
                         f"{tgt_batch}; pass one target sequence per source sequence.")


@functools.partial(nnx.jit, static_argnames=("start_id", "max_new_tokens", "temperature", "top_k",
                                              "scale_seq_len", "return_logits"))
def _generate(model, src, src_mask, rng, *, start_id, max_new_tokens, temperature, top_k,
              scale_seq_len, return_logits):
    batch = src.shape[0]
    context = model.encode(src, src_mask=src_mask)
    cache = model.init_cache(context, 1 + max_new_tokens)
    keys = jax.random.split(rng, max_new_tokens) if rng is not None else None
    start = jnp.full((batch,), start_id, jnp.int32)

    def step(carry, key):
        tok, cache, pos = carry
        logits, cache = model.decode_step(tok[:, None], cache, pos, src_mask=src_mask,
                                          scale_seq_len=scale_seq_len)
        nxt = _common.sample(logits[:, 0], key, temperature, top_k)
        return (nxt, cache, pos + 1), (nxt, logits[:, 0] if return_logits else None)

    _, (new, logits) = jax.lax.scan(step, (start, cache, jnp.int32(0)), keys, length=max_new_tokens)
    tokens = jnp.concatenate([start[:, None], new.T], axis=1)
    return tokens, (jnp.swapaxes(logits, 0, 1) if return_logits else None)
