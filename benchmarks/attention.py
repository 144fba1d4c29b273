"""Chunked (memory-efficient) against dense XLA attention, forward + backward.

``ops.plain.dot_product_attention`` with ``implementation="chunked"`` and ``"xla"``, causal,
batch 1, 8 heads of 64, float32, at each sequence length: median wall time (the two timed
round-robin in one process), the time ratio chunked / dense, and the compiled program's
temporary memory (``memory_analysis().temp_size_in_bytes``), next to the size of one float32
``[batch, heads, S, S]`` score tensor. The longest length runs the chunked path only (dense
would need several score tensors of that size); there the chunked path also runs with a
sliding window (``--window``, default 512; ``chunked_window``), timed round-robin with the
full chunked pass: ``time_ratio_window_over_full`` (the window skips the key blocks outside
it, so the ratio approaches ``W / S``-ish block counts: 63 of 528 blocks at S = 16k,
W = 512, blocks of 512).

    python benchmarks/attention.py [--lengths 1024 4096] [--chunked-only 16384] [--runs 3]
    python benchmarks/attention.py --quick --no-write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import interleaved_times, paired_ratios, write_result  # noqa: E402
from unitscale_jax.ops import plain  # noqa: E402


def fwd_bwd(impl: str, window=None):
    """Jitted output and q, k, v gradients of causal attention with backend ``impl``
    (``"chunked_window"``: chunked with a sliding ``window``)."""
    kw = dict(window=window) if impl == "chunked_window" else {}
    impl = "chunked" if impl == "chunked_window" else impl

    def step(q, k, v, g):
        y, vjp = jax.vjp(lambda q, k, v: plain.dot_product_attention(
            q, k, v, logit_scale=q.shape[-1] ** -0.5, is_causal=True, implementation=impl,
            **kw), q, k, v)
        return y, vjp(g)
    return jax.jit(step)


def measure(seq: int, impls: tuple, args) -> dict:
    keys = jax.random.split(jax.random.key(seq), 4)
    shape = (args.batch, seq, args.heads, args.head_dim)
    q, k, v, g = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    out = {"seq_len": seq, "score_tensor_bytes": args.batch * args.heads * seq * seq * 4}
    fns, temp = {}, {}
    for impl in impls:
        step = fwd_bwd(impl, args.window)
        compiled = step.lower(q, k, v, g).compile()
        temp[impl] = compiled.memory_analysis().temp_size_in_bytes
        fns[impl] = lambda c=compiled: c(q, k, v, g)
    runs = 1 if len(impls) == 1 else args.runs
    times = interleaved_times(fns, runs, warmup=1)
    out["median_s"] = {i: sorted(t)[len(t) // 2] for i, t in times.items()}
    out["temp_bytes"] = temp
    if "xla" in impls:
        out["time_ratio_chunked_over_xla"] = paired_ratios(times, "xla")["chunked"]
        out["temp_ratio_chunked_over_xla"] = temp["chunked"] / temp["xla"]
    if "chunked_window" in impls:
        out["window"] = args.window
        out["time_ratio_window_over_full"] = paired_ratios(times, "chunked")["chunked_window"]
    line = "  ".join(f"{i} {out['median_s'][i] * 1e3:9.1f} ms, temp {temp[i] / 2**20:8.1f} MiB"
                     for i in impls)
    ratio = out.get("time_ratio_chunked_over_xla")
    w_ratio = out.get("time_ratio_window_over_full")
    print(f"S={seq:6d}  {line}" + (f"  time chunked/xla {ratio:.2f}" if ratio else "")
          + (f"  time window/full {w_ratio:.2f}" if w_ratio else ""), flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096])
    p.add_argument("--chunked-only", type=int, nargs="*", default=[16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--window", type=int, default=512,
                   help="sliding window of the chunked_window rows (the --chunked-only lengths)")
    p.add_argument("--quick", action="store_true", help="smoke sizes (256, 512; 1024 chunked)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.chunked_only, args.runs, args.window = [256, 512], [1024], 1, 128
    print(f"causal attention fwd+bwd, batch {args.batch}, {args.heads} heads x {args.head_dim}, "
          f"float32, {jax.default_backend()}, median of {args.runs}", flush=True)
    rows = [measure(s, ("chunked", "xla"), args) for s in args.lengths]
    rows += [measure(s, ("chunked", "chunked_window"), args) for s in args.chunked_only]
    result = {"benchmark": "attention", "batch": args.batch, "heads": args.heads,
              "head_dim": args.head_dim, "dtype": "float32", "causal": True,
              "runs": args.runs, "block_q": 512, "block_kv": 512, "results": rows}
    if not args.no_write:
        print(f"  written to {write_result('attention', result)}")
    return result


if __name__ == "__main__":
    main()
