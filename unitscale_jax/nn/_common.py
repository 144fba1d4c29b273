"""Input validation, attention masks and sampling shared by the models."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def check_ids(ids, name: str, max_len: int, model: str) -> jax.Array:
    """Validates a ``[batch, seq]`` integer id array at trace time."""
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{model}: {name} must be integer token ids, got dtype {ids.dtype}; "
                        f"cast with .astype(jnp.int32).")
    if ids.ndim != 2:
        raise ValueError(f"{model}: {name} must have shape [batch, seq], got {ids.shape}.")
    if ids.shape[1] > max_len:
        raise ValueError(f"{model}: {name} has length {ids.shape[1]} > max_seq_len {max_len}; "
                         f"truncate the input or build the model with a larger max_seq_len.")
    if ids.shape[1] < 1:
        raise ValueError(f"{model}: {name} is empty (shape {ids.shape}).")
    return ids


def _bool(mask, name: str, model: str) -> jax.Array:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{model}: {name} must be boolean (True = real token / attend), "
                        f"got {mask.dtype}.")
    return mask


def self_attention_mask(mask, batch: int, seq: int, model: str,
                        name: str = "mask") -> Optional[jax.Array]:
    """``[batch, 1, seq, seq]`` mask from a padding mask ``[batch, seq]`` or a full mask.

    A padding mask (True = real token) hides padded keys; each position may always attend
    to itself so padded queries never see an empty row (their outputs are unused).
    """
    if mask is None:
        return None
    mask = _bool(mask, name, model)
    if mask.ndim == 2:
        if mask.shape != (batch, seq):
            raise ValueError(f"{model}: padding {name} must have shape {(batch, seq)}, "
                             f"got {mask.shape}.")
        return jnp.logical_or(mask[:, None, None, :], jnp.eye(seq, dtype=bool)[None, None])
    if mask.ndim == 4:
        try:
            jnp.broadcast_shapes(mask.shape, (batch, 1, seq, seq))
        except ValueError as e:
            raise ValueError(f"{model}: {name} of shape {mask.shape} does not broadcast to "
                             f"[batch, heads, {seq}, {seq}].") from e
        return mask
    raise ValueError(f"{model}: {name} must be a padding mask [batch, seq] or an attention mask "
                     f"[batch, heads, q, kv]; got shape {mask.shape}.")


def attention_mask(mask, batch: int, seq: int, model: str, kind: str,
                   name: str = "mask") -> Optional[jax.Array]:
    """The self-attention mask for ``attention_kind`` ``kind``: ``self_attention_mask``, or
    for linear attention (which takes key padding masks only) a ``[batch, seq]`` padding mask
    as ``key_padding_mask``'s ``[batch, 1, 1, seq]`` (other masks are passed on as they are)."""
    if kind == "linear" and mask is not None and jnp.ndim(mask) == 2:
        return key_padding_mask(mask, batch, seq, model, name)
    return self_attention_mask(mask, batch, seq, model, name)


def key_padding_mask(mask, batch: int, seq: int, model: str, name: str) -> Optional[jax.Array]:
    """``[batch, 1, 1, seq]`` from a ``[batch, seq]`` padding mask (cross attention)."""
    if mask is None:
        return None
    mask = _bool(mask, name, model)
    if mask.shape != (batch, seq):
        raise ValueError(f"{model}: {name} must have shape {(batch, seq)}, got {mask.shape}.")
    return mask[:, None, None, :]


def check_where(where, shape, model: str) -> Optional[jax.Array]:
    if where is None:
        return None
    where = _bool(where, "where", model)
    if where.shape != tuple(shape):
        raise ValueError(f"{model}: where must have shape {tuple(shape)}, got {where.shape}.")
    return where


def check_labels(labels, shape, where: str, name: str = "labels") -> jax.Array:
    """Validates integer ``labels`` (class ids, tags or next-token targets) of ``shape``."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{where}: {name} must be integers, got {labels.dtype}.")
    if labels.shape != tuple(shape):
        raise ValueError(f"{where}: {name} must have shape {tuple(shape)}, got {labels.shape}.")
    return labels


def sample(logits_BxV: jax.Array, key: Optional[jax.Array], temperature: float,
           top_k: Optional[int]) -> jax.Array:
    """Greedy (``temperature == 0``) or temperature / top-k sampling of the next ids."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_sampling(temperature: float, top_k, rng, vocab: int, model: str) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"{model}.generate: temperature must be >= 0 (0 = greedy), "
                         f"got {temperature}.")
    if temperature > 0.0 and rng is None:
        raise ValueError(f"{model}.generate: sampling (temperature > 0) needs "
                         "rng=jax.random.key(...).")
    if top_k is not None and not 1 <= int(top_k) <= vocab:
        raise ValueError(f"{model}.generate: top_k must be in [1, {vocab}], got {top_k}.")


def head_key(rng: Optional[jax.Array]) -> Optional[jax.Array]:
    """Key for a model's output head (stochastic-rounding policies quantise its inputs), derived
    by ``fold_in`` so the keys the stack splits from ``rng`` (dropout) are left as they were."""
    return None if rng is None else jax.random.fold_in(rng, 0x4EAD)
