"""Prepared corpora (``unitscale_jax.data.prepared``): tokenized once into ArrayRecord shards,
read back by index; parallel = serial, resumable, per-process shards, tokenizer identity, bad
directories, and start-up that reads a bounded number of records whatever the corpus size."""

import json
import os
import shutil

import numpy as np
import pytest

from unitscale_jax import data
from unitscale_jax.data import corpus, prepared

TOK = data.ByteTokenizer()
WORDS = ("the quick brown fox jumps over a lazy dog while Ünïcödé 日本語 text ✓ flows on "
         "and on").split()
QUIET = dict(log=lambda _: None)


def write_corpus(directory, n_files=4, lines=120, seed=0):
    """``n_files`` UTF-8 files of random lines (non-ASCII included); returns the directory."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        ends = np.cumsum(rng.integers(3, 15, lines))
        words = rng.choice(WORDS, ends[-1]).tolist()
        text = "".join(f"{f}.{i}: " + " ".join(words[a:b]) + "\n"
                       for i, (a, b) in enumerate(zip([0, *ends[:-1]], ends)))
        (directory / f"part{f}.txt").write_text(text, encoding="utf-8")
    return directory


def _prepare(corpus_dir, out, **kw):
    kw = {"workers": 1, "piece_bytes": 1500, **QUIET, **kw}
    return prepared.prepare_corpus(str(corpus_dir / "*.txt"), out, **kw)


def _shards(out):
    """Every shard's name and bytes."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.arrayrecord"))}


def _records(source, split):
    ds = source.split(split)
    return [source.token_ids(ds[i]) for i in range(len(ds))]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus and its reference preparation (one worker)."""
    base = tmp_path_factory.mktemp("prepared")
    text = write_corpus(base / "corpus")
    manifest = _prepare(text, base / "ref")
    return {"base": base, "corpus": text, "ref": base / "ref", "manifest": manifest}


def test_records_are_the_chunks_of_each_piece_tokenized(world):
    """Each piece is chunked and split by the local-text rule; each chunk is one record of its
    token ids; the manifest's counts are those of the records."""
    m = world["manifest"]
    assert m["complete"] and m["planned"] == m["prepared"] == len(m["pieces"]) > 4
    src = prepared.open_prepared(world["ref"], TOK)
    expected = {"train": [], "validation": []}
    for piece in m["pieces"]:
        with open(piece["file"], "rb") as f:
            f.seek(piece["start"])
            raw = f.read(piece["end"] - piece["start"])
        assert raw.endswith(b"\n")  # cut at line breaks
        text = raw.decode()
        try:
            chunks = list(corpus.iter_chunks([("x", text)], 4096, 0.05))
        except ValueError:  # a last piece too short to hold a validation chunk out
            assert len(text) <= corpus.MIN_CHUNK_CHARS and piece["end"] == os.path.getsize(
                piece["file"])
            chunks = list(corpus.iter_chunks([("x", text)], 4096, 0.0))
        for split, _, _, chunk in chunks:
            expected[split].append(TOK.encode(chunk))
    for split in ("train", "validation"):
        got = _records(src, split)
        assert len(got) == len(expected[split]) > 0
        for a, b in zip(got, expected[split]):
            np.testing.assert_array_equal(a, b)
        stats = data.corpus_stats(src, TOK, [split])[split]  # from the manifest: no pass
        assert stats.documents == len(got) == m["splits"][split]["records"]
        assert stats.tokens == sum(map(len, got)) == m["splits"][split]["tokens"]
    # the pieces cover every byte of every file, in order
    for path in sorted(world["corpus"].glob("*.txt")):
        spans = [(p["start"], p["end"]) for p in m["pieces"] if p["file"] == str(path)]
        assert spans[0][0] == 0 and spans[-1][1] == path.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert src.text(src.split("train")[0]) == TOK.decode(_records(src, "train")[0])


def test_parallel_gives_the_same_shards_as_serial(world):
    out = world["base"] / "parallel"
    manifest = _prepare(world["corpus"], out, workers=2)
    assert manifest == world["manifest"]
    assert _shards(out) == _shards(world["ref"])


def test_an_interrupted_prepare_resumes_and_ends_identical(world, monkeypatch):
    out = world["base"] / "resumed"
    real, calls, crashed = prepared._prepare_piece, [], []

    def crash_on_the_third(job):
        calls.append(job["id"])
        if len(calls) == 3 and not crashed:
            crashed.append(job["id"])
            raise KeyboardInterrupt  # as a Ctrl-C (or a kill) mid-run would
        return real(job)

    monkeypatch.setattr(prepared, "_prepare_piece", crash_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _prepare(world["corpus"], out)
    partial = prepared.read_manifest(out)
    assert not partial["complete"] and partial["prepared"] == 2
    with pytest.raises(ValueError, match=r"only partly prepared \(2 of \d+ pieces\); rerun"):
        prepared.open_prepared(out, TOK)
    (out / ".train-0123456789ab.arrayrecord.99.ff.tmp").write_bytes(b"half")  # a killed write

    calls.clear()
    log = []
    manifest = _prepare(world["corpus"], out, log=log.append)
    assert len(calls) == manifest["planned"] - 2  # the two recorded pieces were skipped
    assert "2 already done" in log[0] and "removed 1 leftover file" in log[-1]
    assert manifest == world["manifest"] and _shards(out) == _shards(world["ref"])

    # a shard lost (or changed) after the fact: refused, and the rerun writes only its piece
    victim = manifest["pieces"][1]["shards"][0]["name"]
    (out / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {victim} is missing; rerun"):
        prepared.open_prepared(out, TOK)
    calls.clear()
    assert _prepare(world["corpus"], out) == world["manifest"] and len(calls) == 1
    (out / victim).write_bytes(b"x")
    with pytest.raises(ValueError, match=f"shard {victim} has 1 bytes, the manifest says"):
        prepared.open_prepared(out, TOK)
    assert _prepare(world["corpus"], out) == world["manifest"]
    assert _shards(out) == _shards(world["ref"])


def test_a_changed_file_is_prepared_again(world):
    text = world["base"] / "changing"
    shutil.copytree(world["corpus"], text)
    out = world["base"] / "changing_out"
    before = _prepare(text, out)
    with open(text / "part1.txt", "a", encoding="utf-8") as f:
        f.write("one more line at the end\n")
    log = []
    after = _prepare(text, out, log=log.append)
    redone = [p for p in after["pieces"] if p["file"].endswith("part1.txt")]
    kept = [p for p in before["pieces"] if not p["file"].endswith("part1.txt")]
    assert f"{len(kept)} already done, {len(redone)} to do" in log[0]
    assert {s["name"] for p in after["pieces"] for s in p["shards"]} == set(_shards(out))
    src = prepared.open_prepared(out, TOK)
    texts = [TOK.decode(r) for split in ("train", "validation") for r in _records(src, split)]
    assert sum(t.endswith("one more line at the end\n") for t in texts) == 1


def test_process_shards_are_disjoint_and_cover_the_split(world):
    """``shard_index::shard_count`` per process: the records each reads are its own, and
    together they are the whole split; a packed pass of one shard is its records + eos."""
    src = prepared.open_prepared(world["ref"], TOK)
    everything = [r.tobytes() for r in _records(src, "train")]
    seen = []
    for index in range(3):
        it = data.make_iterator(src, "train", seq_len=16, batch_size=2, shuffle=False,
                                num_epochs=1, shard_index=index, shard_count=3)
        rows = np.concatenate([np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1)
                               for b in it]).reshape(-1)
        rows = rows[rows != TOK.pad_id]
        ends = np.flatnonzero(rows == TOK.eos_id)
        mine = [rows[a + 1:b].astype(np.int32).tobytes()
                for a, b in zip(np.concatenate([[-1], ends[:-1]]), ends)]
        assert mine == everything[index::3]
        seen += mine
    assert sorted(seen) == sorted(everything)


def test_iterator_state_resumes_exactly(world):
    src = prepared.open_prepared(world["ref"], TOK)
    ref = data.make_iterator(src, "train", seq_len=24, batch_size=3, seed=5)
    for _ in range(4):
        next(ref)
    state = json.loads(json.dumps(ref.get_state()))
    want = [next(ref) for _ in range(5)]
    again = data.make_iterator(src, "train", seq_len=24, batch_size=3, seed=5)
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(5)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_tokenizer_identity_and_mismatch(world, tmp_path):
    tok_path = tmp_path / "tok.json"
    data.train_tokenizer([str(p) for p in world["corpus"].glob("*.txt")], kind="bpe",
                         vocab_size=300, out_path=tok_path, min_frequency=1)
    hf = data.get_tokenizer(f"hf:{tok_path}")
    with pytest.raises(ValueError, match=r"was tokenized with bytes \(vocabulary 260\), but "
                                         r"this run's tokenizer is hf:.*pass --tokenizer bytes"):
        prepared.open_prepared(world["ref"], hf)
    out = tmp_path / "hf_out"
    manifest = _prepare(world["corpus"], out, tokenizer=f"hf:{tok_path}")
    assert manifest["tokenizer"]["kind"] == "hf" and manifest["settings"]["dtype"] == "<u2"
    copy = tmp_path / "copy.json"  # the same file elsewhere is the same tokenizer
    shutil.copy(tok_path, copy)
    src = prepared.open_prepared(out, data.get_tokenizer(f"hf:{copy}"))
    np.testing.assert_array_equal(_records(src, "train")[0],
                                  hf.encode(TOK.decode(_records(
                                      prepared.open_prepared(world["ref"], TOK), "train")[0])))
    with pytest.raises(ValueError, match="was prepared with the tokenizer hf:"):
        _prepare(world["corpus"], out)  # resuming with another tokenizer


@pytest.mark.parametrize("damage, error, match", [
    ("missing", FileNotFoundError, "no such directory; prepare the corpus first"),
    ("a_file", ValueError, "is a file, not a directory; pass the --out directory"),
    ("no_manifest", FileNotFoundError, "holds no manifest.json"),
    ("manifest_is_a_dir", ValueError, "manifest.json is a directory"),
    ("empty_manifest", ValueError, r"not a valid prepared-corpus manifest \(Expecting value"),
    ("truncated_manifest", ValueError, "not a valid prepared-corpus manifest"),
    ("other_json", ValueError, r"manifest \(not a unitscale_jax.prepared manifest\)"),
    ("bad_count", ValueError, r"manifest \(a shard of piece 0 has no count 'tokens'\)"),
])
def test_bad_directories(world, tmp_path, damage, error, match):
    d = tmp_path / "d"
    if damage != "missing":
        shutil.copytree(world["ref"], d)
    m = d / prepared.MANIFEST
    if damage == "a_file":
        shutil.rmtree(d)
        d.write_text("x")
    elif damage == "no_manifest":
        m.unlink()
    elif damage == "manifest_is_a_dir":
        m.unlink()
        m.mkdir()
    elif damage == "empty_manifest":
        m.write_text("")
    elif damage == "truncated_manifest":
        m.write_text(m.read_text()[:200])
    elif damage == "other_json":
        m.write_text('{"hello": 1}')
    elif damage == "bad_count":
        doc = json.loads(m.read_text())
        doc["pieces"][0]["shards"][0]["tokens"] = "many"
        m.write_text(json.dumps(doc))
    with pytest.raises(error, match=match):
        prepared.open_prepared(d, TOK)


def test_bad_prepare_inputs(world, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no manifest.json"):
        _prepare(world["corpus"], tmp_path / "notes")
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["a.txt"]
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n" * 10)
    with pytest.raises(ValueError, match=r"bad.txt is not UTF-8 text \(invalid byte at offset 3"):
        prepared.prepare_corpus(str(tmp_path / "bad.txt"), tmp_path / "o1", **QUIET)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        prepared.prepare_corpus(str(tmp_path / "empty.txt"), tmp_path / "o2", **QUIET)
    assert not (tmp_path / "o2").exists()  # nothing left behind
    with pytest.raises(ValueError, match="other settings .*chunk_chars"):
        _prepare(world["corpus"], world["ref"], chunk_chars=1000)


def _startup_reads(corpus_dir, out, monkeypatch):
    """Records read from opening a prepared corpus to the first batch of the
    training and validation iterators, as the trainer starts."""
    prepared.prepare_corpus(str(corpus_dir / "*.txt"), out, workers=1, **QUIET)
    from array_record.python import array_record_data_source as ards
    reads = []
    real_get, real_many = ards.ArrayRecordDataSource.__getitem__, \
        ards.ArrayRecordDataSource.__getitems__
    monkeypatch.setattr(ards.ArrayRecordDataSource, "__getitem__",
                        lambda self, k: (reads.append(1), real_get(self, k))[1])
    monkeypatch.setattr(ards.ArrayRecordDataSource, "__getitems__",
                        lambda self, ks: (reads.extend([1] * len(ks)), real_many(self, ks))[1])
    src = prepared.open_prepared(out, TOK)
    train = data.make_iterator(src, "train", seq_len=64, batch_size=4, seed=0, num_threads=1)
    val = data.make_iterator(src, "validation", seq_len=64, batch_size=4, num_threads=1)
    next(train), next(val)
    n = len(reads)
    monkeypatch.undo()
    return n, len(src.split("train"))


def test_startup_does_not_scale_with_corpus_size(tmp_path, monkeypatch):
    """100 kB and 5 MB corpora: the start-up reads are bounded by the pipeline's read-ahead,
    not the corpus. Counted, not timed: a wall-clock bound failed under a loaded machine, and
    the start-up time itself is measured by ``benchmarks/streaming.py``."""
    small = write_corpus(tmp_path / "small", n_files=2, lines=1000, seed=1)
    big = write_corpus(tmp_path / "big", n_files=10, lines=9600, seed=2)
    sizes = [sum(p.stat().st_size for p in d.glob("*.txt")) for d in (small, big)]
    assert sizes[0] < 120e3 and sizes[1] > 4.5e6
    n_small, _ = _startup_reads(small, tmp_path / "ps", monkeypatch)
    n_big, records_big = _startup_reads(big, tmp_path / "pb", monkeypatch)
    assert records_big > 1000 and n_big < records_big / 5, (n_big, records_big)
    assert n_big <= 2 * n_small + 50, (n_small, n_big)
