"""Corpora tokenized once into sharded ArrayRecord files, for text larger than memory.

``prepare_corpus(files, out_dir, tokenizer=...)`` (the ``unitscale-jax prepare`` command)
cuts every input file into *pieces* of about ``piece_bytes`` at line breaks (found by seeking,
so no file is read whole), and a process pool turns each piece into at most two shards,
``train-<id>.arrayrecord`` and ``validation-<id>.arrayrecord``: the piece is chunked and split
by the rule of local text (``corpus.iter_chunks``: evenly spaced validation chunks; a piece too
short to hold one out trains whole), and each chunk becomes one record, its token ids
(``tokenizer.encode``, no specials; ``uint16`` when the vocabulary fits, else ``int32``).

``manifest.json`` records the settings, the tokenizer's identity (``tokenizer_identity``: its
kind, the SHA-256 of its file, vocabulary, special ids and the ids of a probe text) and, per
finished piece, its shards with their records, tokens, UTF-8 bytes of text and size on disk.
Each shard is written under a temporary name and renamed when complete, and the manifest is
rewritten (atomically) as pieces finish, so a rerun of an interrupted ``prepare`` skips what is
recorded and writes the rest; the result does not depend on the number of workers or on the
order pieces finish in. Shard ids are digests of (file, size, modification time, byte range),
so a changed input file is prepared again, and shards no longer planned are removed.

``open_prepared(directory, tokenizer)`` (``train --data prepared:DIR``) reads the manifest
and returns a ``PreparedSource``: a ``TextSource`` whose splits are
``grain.sources.ArrayRecordDataSource`` s over the shards (random access; the record counts
come from the manifest, so start-up opens no shard and reads no record), whose records are
already token ids, and whose ``corpus_stats`` are the manifest's counts. The data pipeline
(``make_iterator``) shuffles, shards per process, packs and checkpoints it as any source.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from unitscale_jax import paths
from unitscale_jax.data import builders, corpus
from unitscale_jax.data.sources import SplitStats, TextSource
from unitscale_jax.data.tokenizers import ByteTokenizer, Tokenizer, get_tokenizer

__all__ = ["MANIFEST", "DEFAULT_PIECE_BYTES", "WRITER_OPTIONS", "PreparedSource", "prepare_corpus",
           "open_prepared", "read_manifest", "tokenizer_identity", "default_workers"]

MANIFEST = "manifest.json"
FORMAT = "unitscale_jax.prepared"
VERSION = 1
DEFAULT_PIECE_BYTES = 64 * 2**20
SPLITS = ("train", "validation")
PROBE = "The quick brown fox, 0123456789 (Ünïcödé, 日本語 ✓)\n\tends here."
"""Text whose ids are part of a tokenizer's identity: two tokenizers that encode it apart are
not the same one, whatever their files are called."""

_SHARD = re.compile(r"^(train|validation)-[0-9a-f]{12}\.arrayrecord$")
_TEMP = re.compile(r"^\.(train|validation)-[0-9a-f]{12}\.arrayrecord\..*\.tmp$")
WRITER_OPTIONS = "group_size:1,snappy"
"""ArrayRecord writer options: one record per group (what grain's random access wants), snappy
compression (measured on byte-level tokens: writes 2.7x as fast as the default zstd:3 and reads
at random 2.7x as fast, for 1.5x the disk)."""


# ------------------------------------------------------------------------------ identity


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """What identifies a tokenizer in a manifest: ``name`` (for messages; a copy of the same
    file under another path is the same tokenizer), ``kind`` (``bytes``, ``hf``,
    ``sentencepiece`` or the class name), ``file_sha256`` (of the ``hf:``/``sentencepiece:``
    file, else None), ``vocab_size``, ``special_ids`` (pad, bos, eos, mask) and
    ``probe_sha256`` (of the ids of ``PROBE``)."""
    name = str(getattr(tokenizer, "name", None) or repr(tokenizer))
    prefix, _, path = name.partition(":")
    if isinstance(tokenizer, ByteTokenizer):
        kind, digest = "bytes", None
    elif prefix in ("hf", "sentencepiece") and path and os.path.isfile(path):
        kind, digest = prefix, _file_sha256(path)
    else:
        kind, digest = type(tokenizer).__name__, None
    probe = np.asarray(tokenizer.encode(PROBE), "<i4").tobytes()
    return {"name": name, "kind": kind, "file_sha256": digest,
            "vocab_size": int(tokenizer.vocab_size),
            "special_ids": [int(tokenizer.pad_id), int(tokenizer.bos_id),
                            int(tokenizer.eos_id), int(tokenizer.mask_id)],
            "probe_sha256": hashlib.sha256(probe).hexdigest()}


def _same_tokenizer(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "name"} == {
        k: v for k, v in b.items() if k != "name"}


def _describe_tokenizer(ident: Mapping[str, Any]) -> str:
    sha = f", file sha256 {ident['file_sha256'][:12]}" if ident.get("file_sha256") else ""
    return f"{ident.get('name')} (vocabulary {ident.get('vocab_size')}{sha})"


def _dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 2**16 else "<i4"


# ------------------------------------------------------------------------------ manifest


class _Malformed(ValueError):
    pass


def _int_fields(d: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(d, dict):
        raise _Malformed(f"{where} is not an object")
    for k in keys:
        if not isinstance(d.get(k), int) or isinstance(d.get(k), bool) or d[k] < 0:
            raise _Malformed(f"{where} has no count {k!r}")


def _check_manifest(m: Any) -> dict:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _Malformed(f"not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise _Malformed(f"version {m.get('version')!r}, this package reads version {VERSION}")
    for key, kind in (("tokenizer", dict), ("settings", dict), ("pieces", list),
                      ("complete", bool), ("planned", int)):
        if not isinstance(m.get(key), kind):
            raise _Malformed(f"no {key!r} ({kind.__name__})")
    if m["settings"].get("dtype") not in ("<u2", "<i4"):
        raise _Malformed("no token dtype in 'settings'")
    for i, piece in enumerate(m["pieces"]):
        where = f"piece {i}"
        if not isinstance(piece, dict) or not isinstance(piece.get("id"), str) or \
                not isinstance(piece.get("shards"), list):
            raise _Malformed(f"{where} has no 'id' or 'shards'")
        for shard in piece["shards"]:
            _int_fields(shard, ("records", "tokens", "bytes", "size"), f"a shard of {where}")
            if shard.get("split") not in SPLITS or not _SHARD.match(str(shard.get("name"))):
                raise _Malformed(f"a shard of {where} has no valid 'name' and 'split'")
    return m


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a prepared directory, checked for shape (not for completeness).

    Raises:
      FileNotFoundError: there is no ``manifest.json``.
      ValueError: it is not a valid manifest (the message says what is wrong).
    """
    path = Path(directory) / MANIFEST
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a manifest file.")
    if not path.exists():
        raise FileNotFoundError(f"{directory} holds no {MANIFEST}; pass the --out directory of "
                                "'unitscale-jax prepare'.")
    try:
        return _check_manifest(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, _Malformed) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a valid prepared-corpus manifest ({reason}); prepare "
                         "the corpus again into a new --out directory.") from None


def _totals(pieces: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    out = {s: {"shards": 0, "records": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    for piece in pieces:
        for shard in piece["shards"]:
            t = out[shard["split"]]
            t["shards"] += 1
            for k in ("records", "tokens", "bytes"):
                t[k] += shard[k]
    return out


def _write_manifest(out: Path, head: Mapping[str, Any], done: Mapping[str, dict],
                    plan: Sequence[dict], complete: bool) -> dict:
    pieces = [done[p["id"]] for p in plan if p["id"] in done]  # plan order, not finish order
    manifest = {**head, "complete": complete, "planned": len(plan), "prepared": len(pieces),
                "splits": _totals(pieces), "pieces": pieces}
    paths.write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


# ------------------------------------------------------------------------------ pieces


def _piece_bounds(path: str, size: int, piece_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about ``piece_bytes`` each, cut after a line break (a file without one
    is one piece)."""
    bounds = [0]
    with open(path, "rb") as f:
        pos = piece_bytes
        while pos < size:
            f.seek(pos)
            while True:
                block = f.read(1 << 16)
                if not block:
                    pos = size
                    break
                i = block.find(b"\n")
                if i >= 0:
                    pos += i + 1
                    break
                pos += len(block)
            if pos >= size:
                break
            bounds.append(pos)
            pos += piece_bytes
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:]))


def _read_piece(path: str, start: int, end: int) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if start == 0 and data.startswith(b"\xef\xbb\xbf"):
        data, start = data[3:], 3
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} is not UTF-8 text (invalid byte at offset "
                         f"{start + e.start}); convert it to UTF-8 first.") from None


def _chunks(name: str, text: str, chunk_chars: int, fraction: float):
    """``corpus.iter_chunks`` of one piece; a piece too short to hold out a validation chunk
    (or with no text) goes to train whole."""
    try:
        return list(corpus.iter_chunks([(name, text)], chunk_chars, fraction))
    except ValueError:
        return list(corpus.iter_chunks([(name, text)], chunk_chars, 0.0))


_TOKENIZERS: dict[str, Tokenizer] = {}


def _worker_tokenizer(spec: str | Tokenizer) -> Tokenizer:
    if not isinstance(spec, str):
        return spec
    if spec not in _TOKENIZERS:
        _TOKENIZERS[spec] = get_tokenizer(spec)
    return _TOKENIZERS[spec]


def _prepare_piece(job: Mapping[str, Any]) -> dict:
    """Tokenizes one piece and writes its shards (temporary name, renamed when complete);
    returns its manifest entry. Runs in a worker process."""
    tok = _worker_tokenizer(job["tokenizer"])
    s = job["settings"]
    text = _read_piece(job["file"], job["start"], job["end"])
    records: dict[str, list[bytes]] = {split: [] for split in SPLITS}
    counts = {split: [0, 0] for split in SPLITS}  # tokens, UTF-8 bytes
    for split, _, _, chunk in _chunks(job["file"], text, s["chunk_chars"],
                                      s["validation_fraction"]):
        ids = np.asarray(tok.encode(chunk))
        records[split].append(ids.astype(s["dtype"]).tobytes())
        counts[split][0] += len(ids)
        counts[split][1] += len(chunk.encode("utf-8"))
    from array_record.python.array_record_module import ArrayRecordWriter
    shards = []
    for split in SPLITS:
        if not records[split]:
            continue
        name = f"{split}-{job['id']}.arrayrecord"
        final = Path(job["out"]) / name
        with paths.atomic_path(final) as tmp:
            writer = ArrayRecordWriter(str(tmp), s["writer_options"])
            for record in records[split]:
                writer.write(record)
            writer.close()
        shards.append({"name": name, "split": split, "records": len(records[split]),
                       "tokens": counts[split][0], "bytes": counts[split][1],
                       "size": final.stat().st_size})
    return {"id": job["id"], "file": job["file"], "start": job["start"], "end": job["end"],
            "shards": shards}


def _plan(files: Sequence[str], piece_bytes: int) -> list[dict]:
    plan = []
    for path in files:
        st = os.stat(path)
        for start, end in _piece_bounds(path, st.st_size, piece_bytes):
            pid = corpus.fingerprint([path, st.st_size, st.st_mtime_ns, start, end])
            plan.append({"id": pid, "file": path, "start": start, "end": end})
    return plan


def _recorded(out: Path, piece: Mapping[str, Any]) -> bool:
    """Whether a recorded piece's shards are all on disk with their recorded sizes."""
    for shard in piece["shards"]:
        p = out / shard["name"]
        if not p.is_file() or p.stat().st_size != shard["size"]:
            return False
    return True


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _existing(out: Path, head: Mapping[str, Any]) -> dict[str, dict]:
    """The pieces recorded by an earlier run into ``out`` (empty for a new directory).

    Raises:
      ValueError: ``out`` holds other files, an invalid manifest, or one written with other
        settings or another tokenizer.
    """
    if not (out / MANIFEST).exists():
        if any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty and holds no {MANIFEST}; pass a new or "
                             "empty directory (or that of an earlier prepare to resume it).")
        return {}
    old = read_manifest(out)
    if not _same_tokenizer(old["tokenizer"], head["tokenizer"]):
        raise ValueError(f"--out {out} was prepared with the tokenizer "
                         f"{_describe_tokenizer(old['tokenizer'])}, not "
                         f"{_describe_tokenizer(head['tokenizer'])}; pass that --tokenizer to "
                         "resume it, or another --out.")
    if old["settings"] != head["settings"]:
        diff = {k: (old["settings"].get(k), v) for k, v in head["settings"].items()
                if old["settings"].get(k) != v}
        raise ValueError(f"--out {out} was prepared with other settings (there, now): {diff}; "
                         "pass the same ones to resume it, or another --out.")
    return {p["id"]: p for p in old["pieces"] if _recorded(out, p)}


def _remove_leftovers(out: Path, manifest: Mapping[str, Any]) -> int:
    """Deletes shards no longer in the manifest and temporary files of interrupted writes."""
    keep = {s["name"] for p in manifest["pieces"] for s in p["shards"]}
    removed = 0
    for p in out.iterdir():
        if (_SHARD.match(p.name) and p.name not in keep) or _TEMP.match(p.name):
            p.unlink()
            removed += 1
    return removed


def prepare_corpus(data: str | Sequence[str], out_dir: str | os.PathLike, *,
                   tokenizer: str | Tokenizer = "bytes", workers: int | None = None,
                   validation_fraction: float = builders.DEFAULT_VALIDATION_FRACTION,
                   chunk_chars: int = builders.DEFAULT_CHUNK_CHARS,
                   piece_bytes: int = DEFAULT_PIECE_BYTES,
                   log: Callable[[str], None] = print) -> dict:
    """Tokenizes text files into sharded ArrayRecord files and a manifest (see the module).

    Args:
      data: text files or globs (``corpus.expand_paths``).
      out_dir: the directory to write (created; an earlier run's is resumed).
      tokenizer: a ``get_tokenizer`` spec or a ``Tokenizer`` (which must pickle when
        ``workers > 1``).
      workers: processes (default ``default_workers()``, at most one per piece); 1 works in
        this process.
      validation_fraction: share of each piece's chunks held out (``corpus.split_chunks``).
      chunk_chars: chunk (record) size in characters, at most.
      piece_bytes: input bytes per piece (a worker holds one piece in memory).
      log: progress messages.

    Returns:
      The manifest written (``complete`` True).

    Raises:
      FileNotFoundError / ValueError: as ``corpus.expand_paths``; an empty or non-UTF-8 file;
        bad settings; an ``out_dir`` holding something else or a run with other settings.
      PathError: ``out_dir`` is a file or cannot be written (``unitscale_jax.paths``).
    """
    t0 = time.perf_counter()
    files = corpus.expand_paths(data)
    for f in files:
        if os.path.getsize(f) == 0:
            raise ValueError(f"data file {f} is empty (0 bytes); pass a file with text.")
    builders.check_settings(validation_fraction, chunk_chars)
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}.")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    tok = get_tokenizer(tokenizer)
    spec = tokenizer if isinstance(tokenizer, str) else tok
    head = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer_identity(tok),
            "settings": {"validation_fraction": float(validation_fraction),
                         "chunk_chars": int(chunk_chars), "piece_bytes": int(piece_bytes),
                         "dtype": _dtype(tok.vocab_size), "writer_options": WRITER_OPTIONS}}
    created = paths.first_missing(out_dir)
    with paths.removed_if_left_empty(created):
        out = paths.output_dir(out_dir, "--out", "pass a new directory, or that of an earlier "
                               "prepare to resume it")
        done = _existing(out, head)
        plan = _plan(files, piece_bytes)
        planned = {q["id"] for q in plan}
        done = {pid: p for pid, p in done.items() if pid in planned}
        todo = [p for p in plan if p["id"] not in done]
        _write_manifest(out, head, done, plan, complete=False)
    n_bytes = sum(p["end"] - p["start"] for p in todo)
    workers = max(1, min(workers or default_workers(), len(todo)))
    log(f"prepare: {len(files)} file(s), {len(plan)} piece(s); {len(plan) - len(todo)} already "
        f"done, {len(todo)} to do ({n_bytes / 1e6:.1f} MB) with {workers} worker(s) -> {out}")
    jobs = [{**p, "tokenizer": spec, "settings": head["settings"], "out": str(out)}
            for p in todo]
    t_work, last_write = time.perf_counter(), time.perf_counter()
    try:
        for i, piece in enumerate(_run(jobs, workers), 1):
            done[piece["id"]] = piece
            if time.perf_counter() - last_write >= 1.0:
                _write_manifest(out, head, done, plan, complete=False)
                last_write = time.perf_counter()
                log(f"prepare: {i}/{len(jobs)} piece(s) written")
    finally:  # an error or an interrupt: what finished is recorded, a rerun resumes there
        manifest = _write_manifest(out, head, done, plan, complete=len(done) == len(plan))
    work_s = time.perf_counter() - t_work
    if manifest["splits"]["train"]["records"] == 0:
        raise ValueError(f"the data ({len(files)} file(s)) holds no text to train on.")
    removed = _remove_leftovers(out, manifest)
    sp = manifest["splits"]
    log(f"prepared {out}: train {sp['train']['records']:,} records "
        f"({sp['train']['tokens']:,} tokens, {sp['train']['shards']} shards), validation "
        f"{sp['validation']['records']:,} records ({sp['validation']['tokens']:,} tokens); "
        f"{n_bytes / 1e6:.1f} MB in {work_s:.1f} s ({n_bytes / 1e6 / max(work_s, 1e-9):.1f} "
        f"MB/s), {time.perf_counter() - t0:.1f} s in all"
        + (f"; removed {removed} leftover file(s)" if removed else ""))
    return manifest


def _run(jobs: Sequence[dict], workers: int):
    """Results of ``_prepare_piece`` as they finish: in this process, or a pool of fresh
    (``spawn``) processes."""
    if workers == 1:
        for job in jobs:
            yield _prepare_piece(job)
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [pool.submit(_prepare_piece, job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            try:
                result = future.result()
            except concurrent.futures.BrokenExecutor:
                raise RuntimeError(f"a prepare worker process died (out of memory? {workers} "
                                   "workers each hold one piece); rerun with fewer --workers "
                                   "or a smaller --piece-mb: it resumes where it stopped."
                                   ) from None
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------ reading


@dataclasses.dataclass(frozen=True)
class _Span:
    """A whole shard as array_record's ``FileInstruction`` (its record count from the
    manifest: the data source need not open the file to count them)."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedSource(TextSource):
    """A prepared directory as a ``TextSource`` whose records are stored token ids.

    Attributes:
      tokenizer: the tokenizer it was prepared with (``text`` decodes with it).
      directory: the prepared directory.
      manifest: its manifest.
    """

    tokenizer: Tokenizer
    directory: Path
    manifest: Mapping[str, Any]

    def token_ids(self, record: bytes, tokenizer: Tokenizer | None = None) -> np.ndarray:
        """The stored ids of one record (int32; the tokenizer was checked at opening)."""
        del tokenizer
        return np.frombuffer(record, self.manifest["settings"]["dtype"]).astype(np.int32)

    def text(self, record: bytes) -> str:
        """The text of one record, decoded back from its ids."""
        return self.tokenizer.decode(self.token_ids(record))

    def counted_stats(self, split: str) -> SplitStats | None:
        """The manifest's counts of ``split`` (records, UTF-8 bytes, tokens)."""
        t = self.manifest["splits"].get(split)
        return None if t is None else SplitStats(t["records"], t["bytes"], t["tokens"])


def open_prepared(directory: str | os.PathLike, tokenizer: Tokenizer) -> PreparedSource:
    """Opens a directory written by ``prepare_corpus`` for ``make_iterator``.

    Args:
      directory: the prepared directory.
      tokenizer: the run's tokenizer; it must be the one the corpus was prepared with.

    Raises:
      FileNotFoundError: no such directory, no manifest, a shard missing.
      ValueError: a file instead of a directory; an invalid manifest; a prepare that did not
        finish; a shard of another size than recorded; another tokenizer.
    """
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"{d}: no such directory; prepare the corpus first "
                                f"(unitscale-jax prepare --data FILES --out {d}).")
    if not d.is_dir():
        raise ValueError(f"{d} is a file, not a directory; pass the --out directory of "
                         "'unitscale-jax prepare'.")
    m = read_manifest(d)
    if not m["complete"]:
        raise ValueError(f"{d} is only partly prepared ({len(m['pieces'])} of {m['planned']} "
                         "pieces); rerun the same 'unitscale-jax prepare' command to finish it.")
    ident = tokenizer_identity(tokenizer)
    if not _same_tokenizer(m["tokenizer"], ident):
        raise ValueError(f"{d} was tokenized with {_describe_tokenizer(m['tokenizer'])}, but "
                         f"this run's tokenizer is {_describe_tokenizer(ident)}; pass "
                         f"--tokenizer {m['tokenizer'].get('name')}, or prepare the corpus "
                         "again with this tokenizer.")
    spans: dict[str, list[_Span]] = {split: [] for split in SPLITS}
    for piece in m["pieces"]:
        for shard in piece["shards"]:
            p = d / shard["name"]
            if not p.is_file():
                raise FileNotFoundError(f"{d}: shard {shard['name']} is missing; rerun "
                                        "'unitscale-jax prepare' to write it again.")
            if p.stat().st_size != shard["size"]:
                raise ValueError(f"{d}: shard {shard['name']} has {p.stat().st_size} bytes, the "
                                 f"manifest says {shard['size']}; rerun 'unitscale-jax "
                                 "prepare' to write it again.")
            spans[shard["split"]].append(_Span(str(p), 0, shard["records"], shard["records"]))
    splits = {split: grain.sources.ArrayRecordDataSource(s) for split, s in spans.items() if s}
    return PreparedSource(f"prepared:{d}", splits, tokenizer=tokenizer, directory=d,
                          manifest=m)
