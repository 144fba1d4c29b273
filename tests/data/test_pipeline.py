"""The grain pipeline: packing, cropping, shuffling, epochs, determinism, exact resume."""

import json

import numpy as np
import pytest

from unitscale_jax import data

from .conftest import write_corpus

TOK = data.ByteTokenizer()


@pytest.fixture
def source(corpus_files, data_dir):
    return data.resolve_source([str(p) for p in corpus_files], data_dir=data_dir,
                               validation_fraction=0.1)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_lm_batches_shapes_and_shift(source):
    it = data.make_lm_iterator(source, "train", seq_len=32, batch_size=4, seed=1)
    b = next(it)
    assert b["inputs"].shape == b["targets"].shape == b["where"].shape == (4, 32)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32 and b["where"].dtype == bool
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert b["where"].all()  # packed rows are full
    assert it.tokens_per_batch == 128


def test_packing_one_pass_reproduces_the_split(source):
    """Unshuffled, one epoch: rows joined = records (text + eos) joined; the tail is padding."""
    seq_len = 20
    it = data.make_lm_iterator(source, "validation", seq_len, 3, shuffle=False, num_epochs=1)
    batches = list(it)
    rows = np.concatenate([np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1)
                           for b in batches])  # each row: seq_len + 1 tokens
    flat = rows.reshape(-1)
    expected = np.concatenate([np.append(TOK.encode(t), TOK.eos_id)
                               for t in source.documents("validation")])
    n = len(expected)
    np.testing.assert_array_equal(flat[:n], expected)
    assert (flat[n:] == TOK.pad_id).all() and len(flat) - n < 3 * (seq_len + 1) + seq_len + 1
    where = np.concatenate([b["where"] for b in batches])
    assert where.sum() == ((rows[:, 1:] != TOK.pad_id)).sum()


def test_shuffle_seed_and_epochs(tmp_path, data_dir):
    paths = write_corpus(tmp_path / "small", n_files=2, lines_per_file=8)
    source = data.resolve_source([str(p) for p in paths], data_dir=data_dir)

    def first_tokens(seed, n_batches=40):
        it = data.make_lm_iterator(source, "train", 16, 8, seed=seed)
        return np.concatenate([b["inputs"] for b in _take(it, n_batches)])

    a, b, c = first_tokens(0), first_tokens(0), first_tokens(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Several epochs in 40 batches (the train split is ~1.5 kB): epochs are reshuffled.
    n_train_tokens = sum(len(TOK.encode(t)) + 1 for t in source.documents("train"))
    rows_per_epoch = n_train_tokens // 17
    assert 40 * 8 > 2 * rows_per_epoch
    e0, e1 = a[:rows_per_epoch - 1], a[rows_per_epoch + 1: 2 * rows_per_epoch - 1]
    assert not np.array_equal(e0[:len(e1)], e1)


@pytest.mark.parametrize("task,packing", [("lm", "pack"), ("lm", "crop"), ("mlm", "pack"),
                                          ("mlm", "crop"), ("seq2seq", "pack")])
def test_resume_is_exact(source, task, packing):
    """State after k batches, through JSON (a checkpoint), restores the next batches exactly,
    across epoch boundaries and mid-document."""
    kw = dict(seq_len=24, batch_size=3, seed=7, task=task, packing=packing)
    ref = data.make_iterator(source, "train", **kw)
    _take(ref, 5)
    state = json.loads(json.dumps(ref.get_state()))
    expected = _take(ref, 30)
    resumed = data.make_iterator(source, "train", **kw)
    resumed.set_state(state)
    _assert_same(_take(resumed, 30), expected)
    # And a fresh iterator replays from the start.
    _assert_same(_take(data.make_iterator(source, "train", **kw), 5),
                 _take(data.make_iterator(source, "train", **kw), 5))


def test_resume_with_remainder_in_packing_state(source):
    """The packer's state holds a partly used document; JSON turns its slices into lists."""
    it = data.make_lm_iterator(source, "train", 8, 1, seed=3)
    for _ in range(50):
        next(it)
        state = it.get_state()
        if state["grain"]["remainder_slices"]["tokens"][0] > 0:
            break
    assert state["grain"]["remainder_slices"]["tokens"][0] > 0
    expected = _take(it, 10)
    again = data.make_lm_iterator(source, "train", 8, 1, seed=3)
    again.set_state(json.loads(json.dumps(state)))
    _assert_same(_take(again, 10), expected)


def test_state_from_other_settings_is_refused(source):
    it = data.make_lm_iterator(source, "train", 16, 2, seed=0)
    next(it)
    state = it.get_state()
    other = data.make_lm_iterator(source, "train", 32, 2, seed=1)
    with pytest.raises(ValueError, match=r"other settings.*'seed': \(0, 1\).*'seq_len': "
                                         r"\(16, 32\)"):
        other.set_state(state)
    with pytest.raises(ValueError, match="not a data-pipeline state"):
        other.set_state({"next_index": 3})


def test_crop_rows(source):
    it = data.make_iterator(source, "validation", seq_len=4000, batch_size=2, packing="crop",
                            num_epochs=1)
    b = next(it)
    rows = np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1)
    assert (rows[:, 0] == TOK.bos_id).all()
    docs = list(source.documents("validation"))
    for row, doc in zip(rows, docs):  # whole document: bos + text + eos, then padding
        n = len(TOK.encode(doc)) + 2
        assert row[n - 1] == TOK.eos_id and (row[n:] == TOK.pad_id).all()
        assert TOK.decode(row) == doc
    assert b["where"].sum() == sum(len(TOK.encode(d)) + 1 for d in docs[:2])
    short = data.make_iterator(source, "train", seq_len=16, batch_size=4, packing="crop")
    rows = np.concatenate([next(short)["inputs"] for _ in range(5)])
    assert (rows != TOK.pad_id).all()  # long records: random full windows


def test_final_eval_batch_is_padded(source):
    it = data.make_iterator(source, "validation", seq_len=16, batch_size=64, task="mlm")
    batches = list(it)
    assert all(b["ids"].shape == (64, 16) for b in batches)
    last = batches[-1]
    empty = ~last["valid"].any(axis=1)
    assert empty.any() and not last["where"][empty].any()


def test_sharding_is_disjoint(source):
    rows = []
    for shard in range(2):
        it = data.make_iterator(source, "train", seq_len=4000, batch_size=1, packing="crop",
                                shuffle=False, num_epochs=1, shard_index=shard, shard_count=2)
        rows.append({TOK.decode(b["inputs"][0]) for b in it})
    assert rows[0] and rows[1] and not rows[0] & rows[1]
    assert len(rows[0] | rows[1]) == len(source.split("train"))


def test_short_corpus_and_bad_arguments(tmp_path, data_dir):
    path = tmp_path / "short.txt"
    path.write_text("tiny corpus\n")
    src = data.resolve_source(str(path), data_dir=data_dir, validation_fraction=0)
    with pytest.raises(ValueError, match=r"has only 13 tokens in 1 document.*one sequence of "
                                         r"65 tokens; use a smaller seq_len"):
        data.make_lm_iterator(src, "train", 64, 2)
    assert next(data.make_lm_iterator(src, "train", 12, 2))["inputs"].shape == (2, 12)
    with pytest.raises(ValueError, match="unknown task"):
        data.make_iterator(src, "train", seq_len=4, batch_size=1, task="clm")
    with pytest.raises(ValueError, match="unknown packing"):
        data.make_iterator(src, "train", seq_len=4, batch_size=1, packing="bucket")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.make_iterator(src, "train", seq_len=4, batch_size=0)
    with pytest.raises(ValueError, match="shard_index"):
        data.make_iterator(src, "train", seq_len=4, batch_size=1, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="seed"):
        data.make_iterator(src, "train", seq_len=4, batch_size=1, seed=-1)
    with pytest.raises(ValueError, match="no split 'validation'"):
        data.make_iterator(src, "validation", seq_len=4, batch_size=1)


def test_builtin_corpus_pipeline(data_dir):
    src = data.resolve_source(None, data_dir=data_dir)
    it = data.make_lm_iterator(src, "train", 128, 8, seed=0)
    b = next(it)
    assert b["inputs"].shape == (8, 128) and b["where"].all()
    train_bytes = [t.encode() for t in src.documents("train")]
    for row in b["inputs"]:  # every piece between separators is text of one train record
        pieces = np.split(row, np.flatnonzero(row == TOK.eos_id))
        for piece in pieces:
            piece = bytes(piece[piece != TOK.eos_id].astype(np.uint8))
            assert any(piece in doc for doc in train_bytes)


def test_subword_tokenizer_in_pipeline(tmp_path, data_dir):
    paths = write_corpus(tmp_path / "c", n_files=1, lines_per_file=60)
    src = data.resolve_source([str(p) for p in paths], data_dir=data_dir)
    chars = data.SubwordTokenizer(_Chars(), vocab_size=0x30000)
    b = next(data.make_iterator(src, "train", seq_len=32, batch_size=2, task="mlm",
                                tokenizer=chars))
    assert b["labels"].max() < chars.vocab_size and (b["ids"] == chars.mask_id).any()


class _Chars:
    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_epoch_shuffle_is_a_new_permutation_each_epoch():
    import grain
    ds = data.pipeline.EpochShuffle(grain.MapDataset.range(10), seed=5).repeat(3)
    order = [ds[i] for i in range(30)]
    epochs = [order[i:i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(10))
    again = data.pipeline.EpochShuffle(grain.MapDataset.range(10), seed=5).repeat(3)
    assert [again[i] for i in range(30)] == order
    other = data.pipeline.EpochShuffle(grain.MapDataset.range(10), seed=6)
    assert [other[i] for i in range(10)] != epochs[0]


def test_state_round_trips_through_an_orbax_checkpoint(source, tmp_path):
    """What the trainer does: save get_state() with orbax's JsonSave, restore, resume."""
    import orbax.checkpoint as ocp
    kw = dict(seq_len=16, batch_size=2, seed=4, task="mlm")
    it = data.make_iterator(source, "train", **kw)
    _take(it, 7)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
        mngr.wait_until_finished()
    expected = _take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(7, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    again = data.make_iterator(source, "train", **kw)
    again.set_state(restored["data"])
    _assert_same(_take(again, 5), expected)
