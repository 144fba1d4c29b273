"""Masked-LM and span-corruption objectives: proportions, specials, determinism, inversion."""

import numpy as np
import pytest

from unitscale_jax import data
from unitscale_jax.data import objectives

TOK = data.ByteTokenizer()


def _rows(rng, b, l, n_special=0):
    ids = rng.integers(0, 256, size=(b, l)).astype(np.int32)
    if n_special:
        ids[:, :n_special] = TOK.eos_id
        ids[:, -n_special:] = TOK.pad_id
    return ids


def test_mlm_proportions():
    rng = np.random.default_rng(0)
    ids = _rows(rng, 64, 512, n_special=8)
    out = data.mask_tokens(ids, np.random.default_rng(1), TOK)
    candidates = (ids < 256)
    n = candidates.sum()
    where = out["where"]
    assert not where[~candidates].any()  # specials (eos, pad) are never selected
    np.testing.assert_array_equal(out["labels"], ids)
    np.testing.assert_array_equal(out["ids"][~where], ids[~where])  # unselected: untouched
    p = where.sum() / n
    assert abs(p - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n), p
    k = where.sum()
    new = out["ids"][where]
    old = ids[where]
    frac_mask = np.mean(new == TOK.mask_id)
    frac_random = np.mean((new != TOK.mask_id) & (new != old))
    frac_same = np.mean(new == old)
    tol = lambda q: 4 * np.sqrt(q * (1 - q) / k)  # noqa: E731
    assert abs(frac_mask - 0.8) < tol(0.8), frac_mask
    # A random token equals the original with probability 1/256.
    assert abs(frac_random - 0.1 * 255 / 256) < tol(0.1), frac_random
    assert abs(frac_same - (0.1 + 0.1 / 256)) < tol(0.1), frac_same
    assert new[(new != TOK.mask_id)].max() < 256  # random tokens are regular tokens
    np.testing.assert_array_equal(out["valid"], ids != TOK.pad_id)
    assert out["ids"].dtype == out["labels"].dtype == np.int32


def test_mlm_deterministic_given_seed():
    ids = _rows(np.random.default_rng(0), 4, 64)
    a = data.mask_tokens(ids, np.random.default_rng(3), TOK)
    b = data.mask_tokens(ids, np.random.default_rng(3), TOK)
    c = data.mask_tokens(ids, np.random.default_rng(4), TOK)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["where"], c["where"])
    with pytest.raises(ValueError, match="masking probabilities"):
        data.mask_tokens(ids, np.random.default_rng(0), TOK, mask_prob=0)


def test_mlm_pipeline_proportions(tmp_path):
    """Through the pipeline: ~15% of real tokens scored, masked batches reproducible by seed."""
    path = tmp_path / "t.txt"
    path.write_text("".join(f"line {i} with some text\n" for i in range(400)))
    src = data.resolve_source(str(path), data_dir=str(tmp_path / "tfds"))
    batches = [b for b, _ in zip(data.make_iterator(src, "train", seq_len=64, batch_size=8,
                                                    task="mlm", seed=2), range(20))]
    where = np.concatenate([b["where"] for b in batches])
    special = np.isin(np.concatenate([b["labels"] for b in batches]), data.special_ids(TOK))
    n = (~special).sum()
    assert abs(where.sum() / n - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n)
    again = [b for b, _ in zip(data.make_iterator(src, "train", seq_len=64, batch_size=8,
                                                  task="mlm", seed=2), range(20))]
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["ids"], b["ids"])


def _reconstruct(enc_row, tgt_row):
    """Inverse of span corruption: fill each mask of the encoder row with its target span."""
    enc = list(enc_row[enc_row != TOK.pad_id])
    tgt = list(tgt_row[tgt_row != TOK.pad_id])
    assert tgt[-1] == TOK.eos_id
    spans, cur = [], None
    for t in tgt[:-1]:
        if t == TOK.mask_id:
            cur = []
            spans.append(cur)
        else:
            cur.append(t)
    out, k = [], 0
    for t in enc:
        if t == TOK.mask_id:
            out.extend(spans[k])
            k += 1
        else:
            out.append(t)
    assert k == len(spans)
    return np.asarray(out)


def test_span_corruption_inverts_and_has_t5_statistics():
    rng = np.random.default_rng(0)
    L = 128
    ids = _rows(rng, 16, L)
    ids[3, 100:] = TOK.pad_id  # a shorter row
    ids[5, :] = TOK.pad_id  # an all-padding row (eval filler)
    out = data.span_corruption(ids, np.random.default_rng(1), TOK)
    T = objectives.seq2seq_target_len(L)
    assert out["encoder_ids"].shape == (16, L) and out["decoder_target_ids"].shape == (16, T)
    np.testing.assert_array_equal(out["encoder_mask"], out["encoder_ids"] != TOK.pad_id)
    np.testing.assert_array_equal(out["decoder_where"], out["decoder_target_ids"] != TOK.pad_id)
    np.testing.assert_array_equal(out["decoder_input_ids"][:, 0], TOK.bos_id)
    np.testing.assert_array_equal(out["decoder_input_ids"][:, 1:],
                                  out["decoder_target_ids"][:, :-1])
    assert not out["decoder_where"][5].any() and not out["encoder_mask"][5].any()
    for b in range(16):
        if b == 5:
            continue
        n = 100 if b == 3 else L
        np.testing.assert_array_equal(_reconstruct(out["encoder_ids"][b],
                                                   out["decoder_target_ids"][b]), ids[b, :n])
        num_noise, num_spans = objectives.span_corruption_lengths(n, 0.15, 3.0)
        assert (out["encoder_ids"][b] == TOK.mask_id).sum() == num_spans
        assert out["decoder_where"][b].sum() == num_noise + num_spans + 1
    assert (objectives.span_corruption_lengths(128, 0.15, 3.0)) == (19, 6)


def test_seq2seq_pipeline_batches(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"sentence number {i}.\n" for i in range(300)))
    src = data.resolve_source(str(path), data_dir=str(tmp_path / "tfds"))
    it = data.make_iterator(src, "train", seq_len=48, batch_size=4, task="seq2seq", seed=0)
    b = next(it)
    T = objectives.seq2seq_target_len(48)
    assert b["encoder_ids"].shape == (4, 48) and b["decoder_input_ids"].shape == (4, T)
    assert b["encoder_ids"].dtype == np.int32 and b["decoder_where"].dtype == bool
    assert (b["encoder_ids"] == TOK.mask_id).any(axis=1).all()
