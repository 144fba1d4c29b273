"""Training objectives on batches of token rows: next-token LM, masked LM, span corruption.

All functions are NumPy, take a ``[batch, length]`` int array whose padding is ``tokenizer.pad_id``
and return a dict of ``[batch, ...]`` arrays (ids int32, masks bool). The random ones take a
``np.random.Generator``; in the pipeline grain's ``random_map`` supplies it, seeded from the
pipeline seed and the batch counter, so they are deterministic and resume exactly.
"""

from __future__ import annotations

import numpy as np

from unitscale_jax.data.tokenizers import Tokenizer, regular_ids, special_ids

__all__ = ["lm_batch", "mask_tokens", "span_corruption", "span_corruption_lengths"]


def lm_batch(tokens_BxT: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Next-token LM: rows of ``T = seq_len + 1`` tokens -> inputs/targets of ``seq_len``.

    Returns:
      ``inputs`` = tokens[:, :-1], ``targets`` = tokens[:, 1:] (int32, [B, seq_len]) and
      ``where`` (bool): targets that are not padding, the positions to score.
    """
    tokens_BxT = np.asarray(tokens_BxT, np.int32)
    targets = tokens_BxT[:, 1:]
    return {"inputs": tokens_BxT[:, :-1], "targets": targets, "where": targets != pad_id}


def mask_tokens(ids_BxL: np.ndarray, rng: np.random.Generator, tokenizer: Tokenizer, *,
                mask_prob: float = 0.15, mask_token_prob: float = 0.8,
                random_token_prob: float = 0.1) -> dict[str, np.ndarray]:
    """BERT's masked-LM corruption (Devlin et al. 2019, section 3.1).

    Each non-special position is selected independently with probability ``mask_prob``; a selected
    position becomes the mask token with probability ``mask_token_prob``, a uniformly drawn
    non-special token with probability ``random_token_prob``, and stays unchanged otherwise
    (80/10/10 by default).

    Returns:
      ``ids`` (corrupted inputs, int32), ``labels`` (the original ids, int32), ``where`` (bool,
      the selected positions: the only ones to score) and ``valid`` (bool, non-padding, for the
      attention mask); all ``[B, L]``.
    """
    if not 0 < mask_prob < 1 or mask_token_prob + random_token_prob > 1:
        raise ValueError(f"bad masking probabilities: mask_prob={mask_prob}, "
                         f"mask_token_prob={mask_token_prob}, "
                         f"random_token_prob={random_token_prob}")
    labels = np.asarray(ids_BxL, np.int32)
    regular = regular_ids(tokenizer)
    candidates = ~np.isin(labels, special_ids(tokenizer))
    where = candidates & (rng.random(labels.shape) < mask_prob)
    u = rng.random(labels.shape)
    to_mask = where & (u < mask_token_prob)
    to_random = where & (u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)
    random_tokens = regular[rng.integers(0, len(regular), size=labels.shape)]
    ids = np.where(to_mask, tokenizer.mask_id, np.where(to_random, random_tokens, labels))
    return {"ids": ids.astype(np.int32), "labels": labels, "where": where,
            "valid": labels != tokenizer.pad_id}


def span_corruption_lengths(n: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """``(num_noise_tokens, num_spans)`` for a row of ``n`` tokens (T5's rounding, at least 1)."""
    num_noise = min(max(round(n * noise_density), 1), n - 1)
    num_spans = min(max(round(num_noise / mean_span), 1), num_noise, n - num_noise)
    return num_noise, num_spans


def _segments(total: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random composition of ``total`` into ``k`` positive parts."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=k - 1, replace=False)) if k > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def span_corruption(ids_BxL: np.ndarray, rng: np.random.Generator, tokenizer: Tokenizer, *,
                    noise_density: float = 0.15, mean_span: float = 3.0) -> dict[str, np.ndarray]:
    """T5's span corruption (Raffel et al. 2020, section 3.1.4) with one sentinel token.

    In each row's non-padding prefix of ``n`` tokens, ``round(n * noise_density)`` tokens in
    ``round(noise / mean_span)`` spans are chosen at random (span and gap lengths are random
    compositions, the row starts with a kept gap, as in T5's ``random_spans_noise_mask``). The
    encoder sees the row with each span replaced by ``mask_id``; the decoder must output, for each
    span in order, ``mask_id`` followed by the span, then ``eos_id``. T5 numbers its sentinels;
    here one mask id serves all of them, since spans appear in order on both sides (the byte
    vocabulary has a single mask id).

    Returns:
      ``encoder_ids`` [B, L] and ``encoder_mask`` (non-padding) [B, L];
      ``decoder_input_ids`` (``bos_id`` then the targets shifted right), ``decoder_target_ids`` and
      ``decoder_where`` (non-padding targets), all [B, T] with ``T`` from ``seq2seq_target_len``.
    """
    ids_BxL = np.asarray(ids_BxL, np.int32)
    B, L = ids_BxL.shape
    T = seq2seq_target_len(L, noise_density, mean_span)
    pad = tokenizer.pad_id
    enc = np.full((B, L), pad, np.int32)
    tgt = np.full((B, T), pad, np.int32)
    for b in range(B):
        row = ids_BxL[b]
        n = int(np.sum(np.cumprod(row != pad)))  # non-padding prefix
        if n < 2:  # nothing to corrupt; an all-padding row (eval filler) stays unscored
            enc[b, :n] = row[:n]
            tgt[b, 0] = tokenizer.eos_id if n else pad
            continue
        num_noise, num_spans = span_corruption_lengths(n, noise_density, mean_span)
        noise = _segments(num_noise, num_spans, rng)
        keep = _segments(n - num_noise, num_spans, rng)
        e, t, pos = [], [], 0
        for k, s in zip(keep, noise):
            e.append(row[pos:pos + k])
            pos += k
            e.append([tokenizer.mask_id])
            t.append([tokenizer.mask_id])
            t.append(row[pos:pos + s])
            pos += s
        e, t = np.concatenate(e), np.concatenate(t + [[tokenizer.eos_id]])
        enc[b, :len(e)], tgt[b, :len(t)] = e, t
    dec_in = np.concatenate([np.full((B, 1), tokenizer.bos_id, np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_ids": enc, "encoder_mask": enc != pad, "decoder_input_ids": dec_in,
            "decoder_target_ids": tgt, "decoder_where": tgt != pad}


def seq2seq_target_len(seq_len: int, noise_density: float = 0.15, mean_span: float = 3.0) -> int:
    """Decoder length for encoder rows of ``seq_len``: the most any row needs (noise + one mask
    per span + eos), maximised over row lengths up to ``seq_len``."""
    if seq_len < 2:
        return 1
    return max(sum(span_corruption_lengths(n, noise_density, mean_span)) + 1
               for n in range(2, seq_len + 1))

