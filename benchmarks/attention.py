"""Chunked (memory-efficient) against dense XLA attention, forward + backward.

``ops.plain.dot_product_attention`` with ``implementation="chunked"`` and ``"xla"``, causal,
batch 1, 8 heads of 64, float32, at each sequence length: median wall time (the two timed
round-robin in one process), the time ratio chunked / dense, and the compiled program's
temporary memory (``memory_analysis().temp_size_in_bytes``), next to the size of one float32
``[batch, heads, S, S]`` score tensor. The longest length runs the chunked path only (dense
would need several score tensors of that size); there the chunked path also runs with a
sliding window (``--window``, default 512; ``chunked_window``), timed round-robin with the
full chunked pass: ``time_ratio_window_over_full`` (the window skips the key blocks outside
it, so the ratio approaches the visited-block fraction: 63 of 528 blocks at S = 16k,
W = 512, blocks of 512).

Linear attention (``ops.plain.linear_attention``, causal prefix sums, O(S)) against dense XLA
attention at ``--linear-vs-dense`` lengths (4096: a dense 16k run needs several 8 GiB score
tensors, more than this machine has) and against the chunked backend at
``--linear-vs-chunked`` lengths (16384), same batch, heads and timing; the rows are
``linear_results``.

    python benchmarks/attention.py [--lengths 1024 4096] [--chunked-only 16384] [--runs 3]
        [--linear-vs-dense 4096] [--linear-vs-chunked 16384]
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
    (``"linear"``: linear attention; ``"chunked_window"``: chunked with a sliding ``window``)."""
    kw = dict(window=window) if impl == "chunked_window" else {}
    impl = "chunked" if impl == "chunked_window" else impl

    def attend(q, k, v):
        if impl == "linear":
            return plain.linear_attention(q, k, v, is_causal=True)
        return plain.dot_product_attention(q, k, v, logit_scale=q.shape[-1] ** -0.5,
                                           is_causal=True, implementation=impl, **kw)

    def step(q, k, v, g):
        y, vjp = jax.vjp(attend, q, k, v)
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
    if "linear" in impls:
        base = impls[1]
        out[f"time_ratio_linear_over_{base}"] = paired_ratios(times, base)["linear"]
        out[f"temp_ratio_linear_over_{base}"] = temp["linear"] / temp[base]
    elif "xla" in impls:
        out["time_ratio_chunked_over_xla"] = paired_ratios(times, "xla")["chunked"]
        out["temp_ratio_chunked_over_xla"] = temp["chunked"] / temp["xla"]
    if "chunked_window" in impls:
        out["window"] = args.window
        out["time_ratio_window_over_full"] = paired_ratios(times, "chunked")["chunked_window"]
    line = "  ".join(f"{i} {out['median_s'][i] * 1e3:9.1f} ms, temp {temp[i] / 2**20:8.1f} MiB"
                     for i in impls)
    name = f"{impls[0]}/{impls[-1]}"
    ratio = out.get(f"time_ratio_{impls[0]}_over_{impls[-1]}")
    w_ratio = out.get("time_ratio_window_over_full")
    print(f"S={seq:6d}  {line}" + (f"  time {name} {ratio:.2f}" if ratio else "")
          + (f"  time window/full {w_ratio:.2f}" if w_ratio else ""), flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096])
    p.add_argument("--chunked-only", type=int, nargs="*", default=[16384])
    p.add_argument("--linear-vs-dense", type=int, nargs="*", default=[4096])
    p.add_argument("--linear-vs-chunked", type=int, nargs="*", default=[16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--window", type=int, default=512,
                   help="sliding window of the chunked_window rows (the --chunked-only lengths)")
    p.add_argument("--quick", action="store_true",
                   help="smoke sizes (256, 512; 1024 chunked; linear 256 vs dense, 512 vs chunked)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.chunked_only, args.runs, args.window = [256, 512], [1024], 1, 128
        args.linear_vs_dense, args.linear_vs_chunked = [256], [512]
    print(f"causal attention fwd+bwd, batch {args.batch}, {args.heads} heads x {args.head_dim}, "
          f"float32, {jax.default_backend()}, median of {args.runs}", flush=True)
    rows = [measure(s, ("chunked", "xla"), args) for s in args.lengths]
    rows += [measure(s, ("chunked", "chunked_window"), args) for s in args.chunked_only]
    linear = [measure(s, ("linear", "xla"), args) for s in args.linear_vs_dense]
    linear += [measure(s, ("linear", "chunked"), args) for s in args.linear_vs_chunked]
    result = {"benchmark": "attention", "batch": args.batch, "heads": args.heads,
              "head_dim": args.head_dim, "dtype": "float32", "causal": True,
              "runs": args.runs, "block_q": 512, "block_kv": 512, "results": rows,
              "linear_chunk": plain.LINEAR_ATTENTION_CHUNK, "linear_results": linear}
    if not args.no_write:
        print(f"  written to {write_result('attention', result)}")
    return result


if __name__ == "__main__":
    main()
