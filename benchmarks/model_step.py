"""Train-step time of the u-muP decoder against its SP twin and a plain NNX decoder.

One jitted step of the trainer's ``make_train_step`` (forward, backward, ``optax.adamw``
update, gradient norm; ``benchmarks._timing.train_step_runner``) of:

- ``umup``: ``unitscale_jax.nn.TransformerDecoder`` (u-muP, scanned layers: the default);
- ``umup_unrolled``: the same with ``scan_layers=False``;
- ``sp``: the same module code with ``parametrization="sp"``;
- ``plain``: a decoder of the same shape written below with ``flax.nnx`` only (no
  ``unitscale_jax``): embedding, pre-norm RMSNorm without gain, fused q/k/v, causal
  ``jax.nn.dot_product_attention``, SwiGLU MLP, no biases, final norm, readout, mean
  cross-entropy.

Timed round-robin in one process (so machine drift hits all alike); median and minimum of
``--runs`` (the minimum is the least disturbed by other processes on a shared machine).
Target: umup / plain <= 1.03.

    python benchmarks/model_step.py [--quick] [--runs 30] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import interleaved_times, train_step_runner, write_result  # noqa: E402
from unitscale_jax import nn as unn  # noqa: E402


# -- a plain decoder, without unitscale_jax -------------------------------------------------
def _rms(x, eps=1e-5):
    ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return x / jnp.sqrt(ms + eps).astype(x.dtype)


class PlainLayer(nnx.Module):
    def __init__(self, d, heads, d_ff, rngs):
        init = nnx.initializers.normal(0.02)
        self.heads = heads
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.up = nnx.Linear(d, d_ff, use_bias=False, kernel_init=init, rngs=rngs)
        self.gate = nnx.Linear(d, d_ff, use_bias=False, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(d_ff, d, use_bias=False, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        b, s, d = x.shape
        qkv = self.qkv(_rms(x)).reshape(b, s, self.heads, 3, d // self.heads)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.reshape(b, s, d))
        h = _rms(x)
        return x + self.down(self.up(h) * jax.nn.silu(self.gate(h)))


class PlainDecoder(nnx.Module):
    def __init__(self, vocab, d, n_layers, heads, d_ff, rngs):
        self.embed = nnx.Embed(vocab, d, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([PlainLayer(d, heads, d_ff, rngs) for _ in range(n_layers)])
        self.readout = nnx.Linear(d, vocab, use_bias=False,
                                  kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    def loss(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.readout(_rms(x))[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="5 runs at batch 4 (a smoke check)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.batch = 5, 4
    cfg = unn.TransformerConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                                n_heads=args.heads, max_seq_len=args.seq)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, args.vocab)
    models = {
        "umup": unn.TransformerDecoder(cfg, rngs=nnx.Rngs(0)),
        "umup_unrolled": unn.TransformerDecoder(cfg, scan_layers=False, rngs=nnx.Rngs(0)),
        "sp": unn.TransformerDecoder(cfg, parametrization="sp", rngs=nnx.Rngs(0)),
        "plain": PlainDecoder(args.vocab, args.d_model, args.layers, args.heads, cfg.ffn_dim,
                              nnx.Rngs(0)),
    }
    counts = {k: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
              for k, m in models.items()}
    assert len(set(counts.values())) == 1, f"models differ in size: {counts}"
    fns = {k: train_step_runner(m, optax.adamw(1e-3), ids, lr=1e-3) for k, m in models.items()}
    times = interleaved_times(fns, args.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    ratios = {k: med[k] / med["plain"] for k in med}
    ratios_min = {k: best[k] / best["plain"] for k in best}
    tokens = args.batch * args.seq
    print(f"decoder train step (fwd + bwd + AdamW): d_model {args.d_model}, {args.layers} layers, "
          f"{args.heads} heads, vocab {args.vocab}, batch {args.batch} x {args.seq}, "
          f"{counts['plain'] / 1e6:.2f}M params, {jax.default_backend()}, median of {args.runs}")
    print(f"  {'':14s} {'median':>9s}     {'tok/s':>9s}        ratio    {'min':>9s}     ratio")
    for k in ("plain", "umup", "umup_unrolled", "sp"):
        print(f"  {k:14s} {med[k] * 1e3:9.1f} ms  {tokens / med[k]:9.0f} tok/s  {ratios[k]:.3f}  "
              f"{best[k] * 1e3:9.1f} ms  {ratios_min[k]:.3f}")
    print(f"  u-muP / plain = {ratios['umup']:.3f} (median), {ratios_min['umup']:.3f} (min)  "
          f"(target <= 1.03)")
    result = {"benchmark": "model_step", "d_model": args.d_model, "layers": args.layers,
              "heads": args.heads, "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
              "params": counts["plain"], "runs": args.runs, "quick": args.quick,
              "median_s": med, "min_s": best, "ratio_to_plain": ratios,
              "ratio_to_plain_min": ratios_min, "target_umup_over_plain": 1.03,
              "load_average": list(os.getloadavg()),
              "notes": ("umup and sp run their projections through the one linear core of "
                        "unitscale_jax.ops (a custom_vjp in ops/_wide.py, scales at 1 for SP) "
                        "whose explicit backward is faster on XLA:CPU than autodiff of the plain "
                        "nnx.Linear, so both come out below 1; the cost of unit scaling itself "
                        "is umup vs sp (same module code)."),
              "command": "python benchmarks/model_step.py" + (" --quick" if args.quick else "")}
    if not args.no_write:
        print(f"wrote {write_result('model_step', result)}")
    return result


if __name__ == "__main__":
    main()
