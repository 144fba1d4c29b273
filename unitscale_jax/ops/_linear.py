"""Kernelised linear attention (Katharopoulos et al., 2020): the kernel of
``ops.plain.linear_attention``, its only caller (the maths' checks live there).

With the feature map ``phi(x) = elu(x) + 1`` (positive, so every weight is positive), the
output of query ``t`` is the weighted mean of the values it sees,
``o_t = sum_s (phi(q_t) . phi(k_s)) v_s / sum_s phi(q_t) . phi(k_s)``, which reassociates as
``phi(q_t)^T KV / phi(q_t)^T z`` with the state ``KV = sum_s phi(k_s) v_s^T`` ``[D, D]`` and
``z = sum_s phi(k_s)`` ``[D]``: time and memory linear in the sequence length.

- Bidirectional: one state over all (unmasked) keys.
- Causal (prefix sums): the sequence is cut into chunks of ``chunk`` positions; a
  ``jax.lax.scan`` over the chunks carries the state of every earlier chunk, and within a
  chunk a lower-triangular ``[chunk, chunk]`` block of weights adds the chunk's own keys. No
  ``[S, S]`` tensor exists; the scan keeps ``S / chunk`` states of ``D x D`` for the backward
  pass (``S D^2 / chunk``: ``S D`` with the default chunk of 64 and ``D = 64``).

Everything is computed in float32 (states are sums over the whole sequence); the output has
q's dtype. A query that sees no key (all masked) gets a zero output and zero gradients.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

F32 = jnp.float32


def feature_map(x: jax.Array) -> jax.Array:
    """``phi(x) = elu(x) + 1`` (> 0 everywhere)."""
    return jax.nn.elu(x) + 1.0


def _ratio(num, den):
    """``num / den[..., None]``, zero where ``den == 0`` (a query that sees no key)."""
    seen = den > 0
    return jnp.where(seen[..., None], num / jnp.where(seen, den, 1.0)[..., None], 0.0)


def _features(q, k, v, key_mask):
    """``phi(q)`` ``[B, T, K, G, D]``, ``phi(k)`` and ``v`` ``[B, S, K, D]`` in float32, masked
    keys zeroed (they then add nothing to either sum)."""
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    fq = feature_map(q.astype(F32)).reshape(b, t, n_kv, h // n_kv, d)
    fk, v = feature_map(k.astype(F32)), v.astype(F32)
    if key_mask is not None:
        keep = key_mask.astype(F32)[:, :, None, None]
        fk, v = fk * keep, v * keep
    return fq, fk, v


def bidirectional(q, k, v, key_mask: Optional[jax.Array]) -> jax.Array:
    """Every query sees every (unmasked) key: ``[B, T, H, D]`` in q's dtype."""
    fq, fk, vf = _features(q, k, v, key_mask)
    kv = jnp.einsum("bskd,bske->bkde", fk, vf)
    z = jnp.sum(fk, axis=1)                                             # [B, K, D]
    num = jnp.einsum("btkgd,bkde->btkge", fq, kv)
    den = jnp.einsum("btkgd,bkd->btkg", fq, z)
    return _ratio(num, den).reshape(q.shape).astype(q.dtype)


def empty_state(batch: int, kv_heads: int, head_dim: int) -> dict:
    """The state before any key: ``{"kv": [B, K, D, D], "z": [B, K, D]}`` zeros (float32)."""
    return {"kv": jnp.zeros((batch, kv_heads, head_dim, head_dim), F32),
            "z": jnp.zeros((batch, kv_heads, head_dim), F32)}


def causal(q, k, v, key_mask: Optional[jax.Array], state: Optional[dict],
           chunk: int) -> tuple[jax.Array, dict]:
    """Query ``t`` sees keys ``s <= t`` (and every key summed in ``state``).

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, T, K, D]`` (the same positions).
      key_mask: optional ``[B, T]`` (True = the key counts).
      state: the sums over earlier positions (``empty_state``), or None for none.
      chunk: positions per chunk (clipped to ``T``).

    Returns:
      ``(output [B, T, H, D] in q's dtype, state after the last position)``.
    """
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    g = h // n_kv
    c = max(1, min(int(chunk), t))
    n = math.ceil(t / c)
    fq, fk, vf = _features(q, k, v, key_mask)
    pad = n * c - t
    if pad:  # padded keys have phi(k) = v = 0: they add nothing; padded queries are dropped
        fq = jnp.pad(fq, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        fk = jnp.pad(fk, ((0, 0), (0, pad), (0, 0), (0, 0)))
        vf = jnp.pad(vf, ((0, 0), (0, pad), (0, 0), (0, 0)))
    # chunk-major: [N, B, C, K, (G,) D]
    fq = jnp.moveaxis(fq.reshape(b, n, c, n_kv, g, d), 1, 0)
    fk = jnp.moveaxis(fk.reshape(b, n, c, n_kv, d), 1, 0)
    vf = jnp.moveaxis(vf.reshape(b, n, c, n_kv, d), 1, 0)
    below = jnp.tril(jnp.ones((c, c), bool))                            # key e <= query c

    def step(carry, xs):
        kv, z = carry
        fq_c, fk_c, v_c = xs
        w = jnp.einsum("bckgd,bekd->bkgce", fq_c, fk_c)                # [B, K, G, C, C]
        w = jnp.where(below, w, 0.0)
        num = (jnp.einsum("bkgce,bekd->bckgd", w, v_c)
               + jnp.einsum("bckgd,bkde->bckge", fq_c, kv))
        den = jnp.einsum("bkgce->bckg", w) + jnp.einsum("bckgd,bkd->bckg", fq_c, z)
        kv = kv + jnp.einsum("bckd,bcke->bkde", fk_c, v_c)
        z = z + jnp.sum(fk_c, axis=1)
        return (kv, z), _ratio(num, den)

    if state is None:
        state = empty_state(b, n_kv, d)
    (kv, z), out = jax.lax.scan(step, (state["kv"].astype(F32), state["z"].astype(F32)),
                                (fq, fk, vf))
    out = jnp.moveaxis(out, 0, 1).reshape(b, n * c, h, d)[:, :t]
    return out.astype(q.dtype), {"kv": kv, "z": z}
