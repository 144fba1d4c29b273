"""``TransformerDecoder``: a causal language model (embedding -> stack -> norm -> readout)."""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax.nn import _common
from unitscale_jax.nn.config import TransformerConfig, resolve_config
from unitscale_jax.nn.layers import make_embedding, make_norm, make_readout
from unitscale_jax.nn.sharding import constrain
from unitscale_jax.nn.transformer import TransformerStack, cache_layout
from unitscale_jax.ops import plain
from unitscale_jax.taps import tap

STREAM = ("batch", "sequence", "embed")
LOGITS = ("batch", "sequence", "vocab")


def embed_and_readout(model: nnx.Module, c: TransformerConfig, rngs: nnx.Rngs, n_out: int) -> None:
    """Adds ``embed``, ``final_norm`` and ``readout`` (to ``n_out`` classes) to ``model``."""
    model.embed = make_embedding(c, rngs)
    model.final_norm = make_norm(c, depth=None)
    model.readout = make_readout(c, rngs, n_out)


def stack_outputs(model: nnx.Module, ids: jax.Array, mask: Optional[jax.Array],
                  rng: Optional[jax.Array], name: str) -> jax.Array:
    """``final_norm(stack(embed(ids)))`` of a decoder or encoder (``name`` for errors)."""
    ids = _common.check_ids(ids, "ids", model.config.max_seq_len, name)
    m = _common.attention_mask(mask, *ids.shape, name, model.config.attention_kind)
    x = tap("embed", constrain(model.embed(ids), STREAM))
    x = model.stack(x, mask=m, rng=rng)
    return tap("final_norm", model.final_norm(x))


def self_cache_length(windows: Sequence[Optional[int]], length: int) -> int:
    """Slots of a self-attention KV cache shared by layers with sliding ``windows`` (None:
    global) for sequences of ``length`` tokens: a ring of ``min(W, length)`` (the largest
    ``W``) when every one has a window, else ``length``."""
    if any(w is None for w in windows):
        return length
    return min(max(windows), length)


def empty_cache(c: TransformerConfig, n_layers: int, batch: int, length: int) -> dict:
    """Zero self-attention keys and values ``[n_layers, batch, slots, kv_heads, head_dim]``
    (``slots``: ``self_cache_length``); a pattern that mixes local and global layers keeps one
    such stack per ``cache_layout`` group, ``{"global": {"k", "v"}, "local": {"k", "v"}}``
    (``[n_global, batch, length, ...]`` and ``[n_local, batch, min(W, length), ...]``);
    linear attention: its recurrent state per layer."""
    if c.attention_kind == "linear":  # the recurrent state: sum phi(k) v^T and sum phi(k)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (n_layers, *a.shape)),
                            plain.linear_attention_state(batch, c.kv_heads, c.head_dim))
    windows = c.layer_windows(n_layers)

    def zeros(ws):
        shape = (len(ws), batch, self_cache_length(ws, length), c.kv_heads, c.head_dim)
        return {"k": jnp.zeros(shape, c.dtype), "v": jnp.zeros(shape, c.dtype)}

    layout = cache_layout(windows)
    if layout is None:
        return zeros(windows)
    groups: dict = {}
    for w, (group, _) in zip(windows, layout):
        groups.setdefault(group, []).append(w)
    return {group: zeros(ws) for group, ws in groups.items()}


class TransformerDecoder(nnx.Module):
    """Causal Transformer language model in u-muP (default), SP or muP form.

    ``TransformerDecoder(config, rngs=nnx.Rngs(0))`` or
    ``TransformerDecoder(vocab_size=..., d_model=..., n_layers=..., n_heads=..., rngs=...)``;
    keyword arguments override the config's fields.

    Attributes:
      config: the ``TransformerConfig``.
      embed, stack, final_norm, readout: the submodules.
    """

    def __init__(self, config: Optional[TransformerConfig] = None, *, rngs: nnx.Rngs,
                 **overrides: Any):
        c = resolve_config(config, overrides)
        self.config = c
        self.deterministic = False
        embed_and_readout(self, c, rngs, c.vocab_size)
        self.stack = TransformerStack(c, n_layers=c.n_layers, rngs=rngs, causal=True)

    def hidden(self, ids: jax.Array, *, mask: Optional[jax.Array] = None,
               rng: Optional[jax.Array] = None) -> jax.Array:
        """Final-norm outputs ``[batch, seq, d_model]``."""
        return stack_outputs(self, ids, mask, rng, "TransformerDecoder")

    def __call__(self, ids: jax.Array, *, mask: Optional[jax.Array] = None,
                 rng: Optional[jax.Array] = None) -> jax.Array:
        """Next-token logits ``[batch, seq, vocab]``.

        Args:
          ids: integer ``[batch, seq]``, ``seq <= max_seq_len``.
          mask: optional padding mask ``[batch, seq]`` (True = real token) or a boolean
            attention mask ``[batch, heads, seq, seq]``; combined with the causal mask.
          rng: PRNG key, needed only for dropout in training mode.
        """
        x = self.hidden(ids, mask=mask, rng=rng)
        return tap("logits", constrain(self.readout(x, rng=_common.head_key(rng)), LOGITS))

    def loss(self, ids: jax.Array, where: Optional[jax.Array] = None, *,
             targets: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
             rng: Optional[jax.Array] = None) -> jax.Array:
        """Mean next-token cross-entropy (``ops.cross_entropy`` in u-muP, ``mult=loss_mult``).

        Args:
          ids: ``[batch, seq]``; position ``t`` predicts ``ids[:, t + 1]``, or ``targets[:, t]``
            when ``targets`` is given.
          where: optional boolean mask of the targets that count (e.g. False on a prompt):
            ``[batch, seq]`` aligned with ``ids`` (or with ``targets`` when given); the mean
            is over counted targets.
          targets: optional ``[batch, seq]`` next tokens of ``ids`` (a batch already split
            into inputs and targets, as ``unitscale_jax.data.lm_batch`` makes): every
            position of ``ids`` is then scored.
          mask: attention mask (see ``__call__``). A ``[batch, seq]`` padding mask also
            drops targets that are padding or are predicted from a padding position.
          rng: PRNG key for dropout.

        Returns:
          A float32 scalar.
        """
        c = self.config
        logits = self(ids, mask=mask, rng=rng)
        where = _common.check_where(where, ids.shape, "TransformerDecoder.loss")
        if targets is not None:
            targets = _common.check_labels(targets, ids.shape, "TransformerDecoder.loss", "targets")
            if mask is not None and jnp.ndim(mask) == 2:
                where = mask if where is None else jnp.logical_and(where, mask)
            return c.parametrization.cross_entropy(logits, targets, mult=c.loss_mult, where=where)
        if ids.shape[1] < 2:
            raise ValueError("TransformerDecoder.loss needs sequences of length >= 2.")
        scored = None if where is None else where[:, 1:]
        if mask is not None and jnp.ndim(mask) == 2:
            real = jnp.logical_and(mask[:, 1:], mask[:, :-1])
            scored = real if scored is None else jnp.logical_and(scored, real)
        return c.parametrization.cross_entropy(logits[:, :-1], ids[:, 1:], mult=c.loss_mult,
                                        where=scored)

    def init_cache(self, batch: int, length: int) -> dict:
        """An empty KV cache for ``batch`` sequences of up to ``length`` tokens (``empty_cache``:
        local layers keep rings of ``min(W, length)`` slots, global ones ``length``)."""
        return {"self": empty_cache(self.config, self.stack.n_layers, batch, length)}

    def decode_step(self, ids: jax.Array, cache: dict, index: Any, *,
                    scale_seq_len: Optional[int] = None) -> tuple[jax.Array, dict]:
        """Runs ``ids`` ``[batch, n]`` at positions ``index ...`` against the cache.

        Returns:
          ``(logits [batch, n, vocab], new_cache)``.
        """
        x = self.embed(ids)
        x, cache = self.stack(x, cache=cache, cache_index=index, scale_seq_len=scale_seq_len)
        return self.readout(self.final_norm(x)), cache

    def generate(self, prompt: jax.Array, max_new_tokens: int, *, rng: Optional[jax.Array] = None,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 scale_seq_len: Optional[int] = None, return_logits: bool = False):
        """Continues ``prompt`` with a KV cache (jitted).

        Args:
          prompt: integer ``[batch, prompt_len]`` (all prompts of one length).
          max_new_tokens: number of tokens to generate.
          rng: PRNG key (required when ``temperature > 0``).
          temperature: 0 for greedy decoding, else softmax temperature.
          top_k: sample among the ``top_k`` most likely tokens.
          scale_seq_len: sequence length used by u-muP's attention scaling rule; default the
            final length ``prompt_len + max_new_tokens``, so every step's logits equal those
            of a full forward pass over the returned sequence.
          return_logits: also return the logits that chose each new token.

        Returns:
          ``tokens [batch, prompt_len + max_new_tokens]`` (and ``logits [batch,
          max_new_tokens, vocab]`` if ``return_logits``).
        """
        c = self.config
        prompt = _common.check_ids(prompt, "prompt", c.max_seq_len, "TransformerDecoder.generate")
        total = prompt.shape[1] + int(max_new_tokens)
        if int(max_new_tokens) < 1:
            raise ValueError("TransformerDecoder.generate: max_new_tokens must be >= 1, "
                             f"got {max_new_tokens}.")
        if total > c.max_seq_len:
            raise ValueError(f"TransformerDecoder.generate: prompt length {prompt.shape[1]} + "
                             f"max_new_tokens {max_new_tokens} exceeds max_seq_len "
                             f"{c.max_seq_len}.")
        _common.check_sampling(temperature, top_k, rng, c.vocab_size, "TransformerDecoder")
        if c.dropout > 0 and not self.stack.deterministic:
            raise ValueError("TransformerDecoder.generate: dropout is on; call model.eval() first.")
        tokens, logits = _generate(self, prompt, rng, max_new_tokens=int(max_new_tokens),
                                   temperature=float(temperature), top_k=top_k,
                                   scale_seq_len=scale_seq_len or total,
                                   return_logits=bool(return_logits))
        return (tokens, logits) if return_logits else tokens


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k",
                                              "scale_seq_len", "return_logits"))
def _generate(model, prompt, rng, *, max_new_tokens, temperature, top_k, scale_seq_len,
              return_logits):
    batch, p_len = prompt.shape
    cache = model.init_cache(batch, p_len + max_new_tokens)
    keys = (jax.random.split(rng, max_new_tokens) if rng is not None
            else [None] * max_new_tokens)
    logits, cache = model.decode_step(prompt, cache, 0, scale_seq_len=scale_seq_len)
    last = logits[:, -1]
    first = _common.sample(last, keys[0], temperature, top_k)

    def step(carry, key):
        tok, cache, pos = carry
        logits, cache = model.decode_step(tok[:, None], cache, pos, scale_seq_len=scale_seq_len)
        nxt = _common.sample(logits[:, 0], key, temperature, top_k)
        return (nxt, cache, pos + 1), (nxt, logits[:, 0] if return_logits else None)

    if max_new_tokens > 1:
        xs = keys[1:] if rng is not None else None
        _, (rest, rest_logits) = jax.lax.scan(step, (first, cache, jnp.int32(p_len)), xs,
                                              length=max_new_tokens - 1)
        new = jnp.concatenate([first[:, None], rest.T], axis=1)
        all_logits = (jnp.concatenate([last[:, None], jnp.swapaxes(rest_logits, 0, 1)], axis=1)
                      if return_logits else None)
    else:
        new = first[:, None]
        all_logits = last[:, None] if return_logits else None
    return jnp.concatenate([prompt, new], axis=1), all_logits
