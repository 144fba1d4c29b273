"""Streaming data: ``unitscale-jax prepare`` throughput, and ``train --data prepared:DIR``
start-up against corpus size.

For each size (default 1 MB and 200 MB of text; ``--quick``: 0.1 and 5 MB) it writes a corpus
of files of at most 20 MB (random lines of the built-in corpus's words), then:

- prepares it (``prepare_corpus``, byte tokenizer, ``--workers`` processes, at most one per
  64 MiB piece): wall time (with the workers' start), MB/s and tokens/s of text in;
- ``data_startup_s``: in this process, from ``open_prepared`` to the first batch of the
  training and validation iterators (what ``Trainer`` does with the data), with the number of
  records read meanwhile (counted at ``ArrayRecordDataSource``; bounded by the pipeline's
  read-ahead, not by the corpus);
- ``to_first_step_s``: ``unitscale-jax train --data prepared:DIR --steps 1`` in a fresh process
  (a d_model 64, 2-layer decoder; the compilation cache warmed by one discarded run, sizes
  interleaved ``--runs`` times): the run's ``startup_s`` (configuration, data, mesh, model
  shapes) plus ``time_to_first_step_s`` (initialisation, compilation, first step), medians.

The ratio largest / smallest of each start-up time is reported side by side: ~1 means start-up
does not depend on the corpus size. The corpora and prepared directories are temporary (deleted
at the end). Results: ``benchmarks/results/streaming.json``.

    python benchmarks/streaming.py [--quick] [--sizes-mb 1 200] [--workers 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._timing import write_result  # noqa: E402

FILE_MB = 20
MODEL = ["--d-model", "64", "--n-layers", "2", "--n-heads", "2", "--seq-len", "128",
         "--batch-size", "8", "--eval-every", "0", "--eval-batches", "1", "--no-checkpoint",
         "--no-progress", "--no-tensorboard", "--no-plot", "--steps", "1"]


def write_corpus(directory: Path, megabytes: float, seed: int = 0) -> int:
    """Files of random lines (5-20 words of the built-in corpus) totalling ``megabytes``;
    returns the bytes written."""
    from unitscale_jax.data import builtin_documents
    words = sorted({w for _, text in builtin_documents() for w in text.split()})
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    total, target, f = 0, int(megabytes * 1e6), 0
    while target - total > 1000:  # (each file ends at a line break, a little short)
        want = min(FILE_MB * 10**6, target - total)
        n = max(8, want // 6)  # words of ~6 bytes with their separator
        picked = rng.integers(0, len(words), n)
        seps = np.where(rng.random(n) < 1 / 12, "\n", " ")
        text = "".join(words[i] + s for i, s in zip(picked.tolist(), seps.tolist()))
        data = text.encode("utf-8")[:want]
        data = data[:data.rfind(b"\n") + 1] or data + b"\n"
        (directory / f"part{f:04d}.txt").write_bytes(data)
        total, f = total + len(data), f + 1
    return total


def data_startup(out: Path) -> tuple[float, int]:
    """Seconds and records read from opening ``out`` to the first training and validation
    batches (the trainer's data start-up)."""
    from array_record.python import array_record_data_source as ards

    from unitscale_jax import data
    cls, reads = ards.ArrayRecordDataSource, [0]
    get, many = cls.__getitem__, cls.__getitems__

    def counted_get(self, key):
        reads[0] += 1
        return get(self, key)

    def counted_many(self, keys):
        reads[0] += len(keys)
        return many(self, keys)

    cls.__getitem__, cls.__getitems__ = counted_get, counted_many
    try:
        t0 = time.perf_counter()
        src = data.open_prepared(out, data.ByteTokenizer())
        train = data.make_iterator(src, "train", seq_len=128, batch_size=8)
        val = data.make_iterator(src, "validation", seq_len=128, batch_size=8, num_epochs=1)
        next(train), next(val)
        return time.perf_counter() - t0, reads[0]
    finally:
        cls.__getitem__, cls.__getitems__ = get, many


def train_startup(out: Path, run_dir: Path, cache: Path) -> dict:
    """``startup_s`` and ``time_to_first_step_s`` of a one-step run in a fresh process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "unitscale_jax.cli", "train", *MODEL, "--data",
                        f"prepared:{out}", "--run-dir", str(run_dir), "--overwrite"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"train failed ({p.returncode}): {p.stderr[-2000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    return {"startup_s": s["startup_s"], "first_step_s": s["time_to_first_step_s"],
            "to_first_step_s": s["startup_s"] + s["time_to_first_step_s"], "process_s": wall}


def main(argv=None) -> dict:
    from unitscale_jax.data import prepare_corpus

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[1.0, 200.0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="train start-ups per size")
    p.add_argument("--quick", action="store_true", help="0.1 and 5 MB, one run each")
    p.add_argument("--tmp", default=None, help="where the corpora go (default: the system's)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes_mb, args.runs = [0.1, 5.0], 1
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="streaming-bench-") as tmp:
        tmp = Path(tmp)
        for mb in args.sizes_mb:
            text, out = tmp / f"corpus-{mb:g}MB", tmp / f"prepared-{mb:g}MB"
            t0 = time.perf_counter()
            n_bytes = write_corpus(text, mb)
            gen_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            m = prepare_corpus(str(text / "*.txt"), out, workers=args.workers,
                               log=lambda msg: print("  " + msg, flush=True))
            prep_s = time.perf_counter() - t0
            tokens = m["splits"]["train"]["tokens"] + m["splits"]["validation"]["tokens"]
            disk = sum(f.stat().st_size for f in out.iterdir())
            workers = min(args.workers, m["planned"])
            rows.append({"megabytes": n_bytes / 1e6, "files": len(list(text.iterdir())),
                         "pieces": m["planned"], "workers": workers,
                         "generate_s": gen_s, "prepare_s": prep_s,
                         "prepare_mb_per_s": n_bytes / 1e6 / prep_s,
                         "prepare_tokens_per_s": tokens / prep_s, "tokens": tokens,
                         "records": {k: v["records"] for k, v in m["splits"].items()},
                         "shards": sum(v["shards"] for v in m["splits"].values()),
                         "prepared_mb_on_disk": disk / 1e6, "out": out})
            print(f"{n_bytes / 1e6:.1f} MB: prepared in {prep_s:.1f} s "
                  f"({n_bytes / 1e6 / prep_s:.1f} MB/s, {tokens / prep_s / 1e6:.2f} M tokens/s, "
                  f"{workers} worker(s)), {disk / 1e6:.1f} MB on disk", flush=True)
        for row in rows:
            ds = [data_startup(row["out"]) for _ in range(max(args.runs, 3))]
            row["data_startup_s"] = statistics.median(t for t, _ in ds)
            row["records_read_at_startup"] = max(n for _, n in ds)
        cache = tmp / "jax_cache"
        train_startup(rows[0]["out"], tmp / "warmup", cache)  # compiles into the cache
        runs = {i: [] for i in range(len(rows))}
        for _ in range(args.runs):
            for i, row in enumerate(rows):
                runs[i].append(train_startup(row["out"], tmp / f"run{i}", cache))
        for i, row in enumerate(rows):
            for k in ("startup_s", "first_step_s", "to_first_step_s", "process_s"):
                row[f"train_{k}"] = statistics.median(x[k] for x in runs[i])
            del row["out"]
    keys = ("data_startup_s", "records_read_at_startup", "train_startup_s",
            "train_to_first_step_s", "train_process_s")
    ratio = {k: rows[-1][k] / rows[0][k] for k in keys}
    print(f"\nstart-up of train --data prepared:DIR ({jax_backend()}; medians of {args.runs} "
          "fresh processes)")
    print(f"  {'corpus':>9s} {'prepare MB/s':>12s} {'data s':>8s} {'reads':>6s} "
          f"{'startup s':>10s} {'to 1st step s':>14s}")
    for row in rows:
        print(f"  {row['megabytes']:7.1f}MB {row['prepare_mb_per_s']:12.1f} "
              f"{row['data_startup_s']:8.3f} {row['records_read_at_startup']:6d} "
              f"{row['train_startup_s']:10.2f} {row['train_to_first_step_s']:14.2f}")
    print(f"  {'ratio':>9s} {'':12s} {ratio['data_startup_s']:8.2f} "
          f"{ratio['records_read_at_startup']:6.2f} {ratio['train_startup_s']:10.2f} "
          f"{ratio['train_to_first_step_s']:14.2f}   "
          f"(corpus {rows[-1]['megabytes'] / rows[0]['megabytes']:.0f}x)")
    result = {"benchmark": "streaming", "sizes": rows, "ratio_largest_to_smallest": ratio,
              "workers": args.workers, "runs": args.runs, "quick": args.quick,
              "model": MODEL, "load_average": list(os.getloadavg()),
              "command": "python benchmarks/streaming.py" + (" --quick" if args.quick else "")}
    if not args.no_write:
        print("wrote", write_result("streaming", result))
    return result


def jax_backend() -> str:
    import jax
    return jax.default_backend()


if __name__ == "__main__":
    main()
