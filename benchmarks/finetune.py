"""Fine-tuning throughput (examples/s) of ``unitscale-jax finetune`` against a plain NNX step.

Side by side in one process, timed round-robin (``benchmarks._timing.interleaved_times``):

- ``finetune``: the ``FineTuner``'s own train step (``Trainer.step``: the batch put on the
  mesh, forward, backward, u-muP AdamW update, gradient norm) of a sequence-classification
  u-muP ``TransformerEncoder`` (RoPE, SwiGLU, non-parametric RMSNorm, mean pooling,
  ``cls_head``), on batches of its own ``make_batch_iterator``;
- ``finetune_data``: the same plus drawing the batch from the run's data iterator (what the
  training loop does);
- ``plain``: the same model written below with ``flax.nnx`` only (embedding, pre-norm RMSNorm
  without gain, fused q/k/v with RoPE, padded bidirectional ``jax.nn.dot_product_attention``,
  SwiGLU MLP, final norm, masked mean pooling, linear head, mean cross-entropy) and
  ``optax.adamw``, one jitted step with the state donated, on the same batches.

The labelled data is synthetic (random byte strings filling most of ``--seq``, two labels),
written to a temporary directory. Target: finetune / plain <= 1.05.

    python benchmarks/finetune.py [--quick] [--runs 30] [--no-write]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import interleaved_times, paired_ratios, write_result  # noqa: E402


# -- a plain encoder classifier, without unitscale_jax ----------------------------------------
def _rms(x, eps=1e-5):
    ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return x / jnp.sqrt(ms + eps).astype(x.dtype)


def _rope(x, theta=10000.0):
    """Rotary positions on ``[batch, seq, heads, d_head]`` (halves rotated)."""
    s, d = x.shape[1], x.shape[-1]
    freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)
    angle = jnp.arange(s, dtype=jnp.float32)[:, None] * freq[None]
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x.dtype)


class PlainLayer(nnx.Module):
    def __init__(self, d, heads, d_ff, rngs):
        init = nnx.initializers.normal(0.02)
        self.heads = heads
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.up = nnx.Linear(d, d_ff, use_bias=False, kernel_init=init, rngs=rngs)
        self.gate = nnx.Linear(d, d_ff, use_bias=False, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(d_ff, d, use_bias=False, kernel_init=init, rngs=rngs)

    def __call__(self, x, mask):
        b, s, d = x.shape
        qkv = self.qkv(_rms(x)).reshape(b, s, self.heads, 3, d // self.heads)
        q, k, v = _rope(qkv[..., 0, :]), _rope(qkv[..., 1, :]), qkv[..., 2, :]
        a = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        x = x + self.out(a.reshape(b, s, d))
        h = _rms(x)
        return x + self.down(self.up(h) * jax.nn.silu(self.gate(h)))


class PlainClassifier(nnx.Module):
    def __init__(self, vocab, d, n_layers, heads, d_ff, n_classes, rngs):
        self.embed = nnx.Embed(vocab, d, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([PlainLayer(d, heads, d_ff, rngs) for _ in range(n_layers)])
        self.head = nnx.Linear(d, n_classes, use_bias=False,
                               kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    def loss(self, ids, mask, labels):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, mask)
        w = mask.astype(x.dtype)[..., None]
        pooled = jnp.sum(_rms(x) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        return optax.softmax_cross_entropy_with_integer_labels(self.head(pooled), labels).mean()


def plain_runner(model, tx, batches):
    graphdef, params = nnx.split(model, nnx.Param)

    def step(state, batch):
        def loss_fn(p):
            return nnx.merge(graphdef, p).loss(batch["ids"], batch["mask"], batch["labels"])

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state},
                {"loss": loss, "grad_norm": optax.global_norm(grads)})

    step = jax.jit(step, donate_argnums=(0,))
    box = {"state": {"params": params, "opt_state": tx.init(params)}}
    cycle = itertools.cycle(batches)

    def run():
        box["state"], metrics = step(box["state"], next(cycle))
        return metrics["loss"]

    return run


def _write_data(root: Path, n: int, seq: int) -> None:
    r = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    for name, count in (("train", n), ("dev", 64)):
        lines = ["sentence\tlabel"]
        for _ in range(count):
            text = "".join(r.choice(letters) for _ in range(r.randint(seq // 2, seq - 2)))
            lines.append(f"{text.strip() or 'a'}\t{r.randint(0, 1)}")
        (root / f"{name}.tsv").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    from unitscale_jax.train import build
    from unitscale_jax.train.finetune import FineTuner
    from unitscale_jax.train.flags import parse_finetune_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="5 runs of a d_model 64, 2-layer model "
                   "at batch 8 (a smoke check)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.batch, args.d_model, args.layers, args.seq = 5, 8, 64, 2, 64
    with tempfile.TemporaryDirectory() as tmp:
        _write_data(Path(tmp), 4 * args.batch, args.seq)
        cfg = parse_finetune_args([
            "--data", tmp, "--d-model", str(args.d_model), "--n-layers", str(args.layers),
            "--n-heads", str(args.heads), "--seq-len", str(args.seq), "--batch-size",
            str(args.batch), "--steps", "1000", "--eval-every", "0", "--no-checkpoint",
            "--no-progress", "--no-tensorboard", "--no-plot", "--pooling", "mean",
            "--run-dir", str(Path(tmp) / "run")])
        tuner = FineTuner(cfg, quiet=True)
        tuner.build_state()
        batches = [next(tuner.train_it) for _ in range(4)]
        d_ff = build.transformer_config(tuner.cfg, tuner.data.vocab_size).ffn_dim
        plain = PlainClassifier(tuner.data.vocab_size, args.d_model, args.layers, args.heads,
                                d_ff, len(tuner.data.vocab), nnx.Rngs(0))
        n_plain = sum(x.size for x in jax.tree.leaves(nnx.state(plain, nnx.Param)))
        assert n_plain == tuner.n_params, f"models differ in size: {n_plain} vs {tuner.n_params}"
        plain_batches = [{k: jnp.asarray(b[k]) for k in ("ids", "mask", "labels")}
                         for b in batches]
        cycle = itertools.cycle(batches)

        def finetune_step():
            return tuner.step(next(cycle))["loss"]

        def finetune_data():
            return tuner.step(next(tuner.train_it))["loss"]

        fns = {"plain": plain_runner(plain, optax.adamw(1e-3), plain_batches),
               "finetune": finetune_step, "finetune_data": finetune_data}
        times = interleaved_times(fns, args.runs)
        tuner.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    ratios = {k: med[k] / med["plain"] for k in med}
    ratios_min = {k: best[k] / best["plain"] for k in best}
    paired = paired_ratios(times, "plain")
    eps = {k: args.batch / med[k] for k in med}
    print(f"fine-tuning train step (sequence classification, fwd + bwd + AdamW): d_model "
          f"{args.d_model}, {args.layers} layers, {args.heads} heads, batch {args.batch} x "
          f"{args.seq}, {n_plain / 1e6:.2f}M params, {jax.default_backend()}, median of "
          f"{args.runs}")
    print(f"  {'':14s} {'median':>9s}  {'examples/s':>11s}   ratio  paired    {'min':>9s}   ratio")
    for k in ("plain", "finetune", "finetune_data"):
        print(f"  {k:14s} {med[k] * 1e3:9.2f} ms  {eps[k]:11.0f}   {ratios[k]:.3f}   "
              f"{paired[k]:.3f}  {best[k] * 1e3:9.2f} ms  {ratios_min[k]:.3f}")
    print(f"  finetune / plain = {ratios['finetune']:.3f} (median), {paired['finetune']:.3f} "
          f"(paired), {ratios_min['finetune']:.3f} (min); with its data iterator "
          f"{ratios['finetune_data']:.3f}  (target <= 1.05)")
    result = {"benchmark": "finetune", "d_model": args.d_model, "layers": args.layers,
              "heads": args.heads, "batch": args.batch, "seq": args.seq, "params": n_plain,
              "runs": args.runs, "quick": args.quick, "median_s": med, "min_s": best,
              "examples_per_s": eps, "ratio_to_plain": ratios, "ratio_to_plain_min": ratios_min,
              "ratio_to_plain_paired": paired, "target_finetune_over_plain": 1.05,
              "load_average": list(os.getloadavg()),
              "command": "python benchmarks/finetune.py" + (" --quick" if args.quick else "")}
    if not args.no_write:
        print(f"wrote {write_result('finetune', result)}")
    return result


if __name__ == "__main__":
    main()
