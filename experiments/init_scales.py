"""Scales at initialisation: which tensors of the u-muP models sit at unit scale, which do not,
and a prediction that accounts for the ones that do not.

The u-muP rules (``../shared/design/unit-scaling.md``, matched value for value by the authors'
``unit-scaling``) put every tensor at RMS ~1 at init under their modelling assumptions, with
two deviations written into the rules themselves and one that comes from the assumptions:

1. Logits: ``linear_readout`` has ``alpha = 1/fan_in``, so the logits' std is ``d_model^-1/2``.
2. q and k gradients: attention has one scale ``s`` for its output and the gradients of q, k
   and v. At init the logits ``mult q.k / d_head`` are ~``d_head^-1/2`` and the softmax is
   nearly flat, so the gradient reaching q and k is about ``mult / sqrt(d_head)`` of the
   output gradient (the rule fixes v's gradient, not q's and k's).
3. Attention outputs: ``s`` is derived for values that are independent across key positions
   (a mean of ``S`` independent unit vectors has std ``S^-1/2``). After a first
   bidirectional layer with flat attention every position has received the same sequence
   mean, so the next layer's values share a component across positions that averaging does
   not shrink and ``s ~ sqrt(S)`` amplifies; causal prefixes share less. Encoder outputs
   feed cross attention with the same effect, and a larger residual stream shrinks the
   gradients behind the final norm.

For every attention layer the script compares the measured std of the output and of the q / k
gradients with a *flat-softmax prediction* computed from the model's own tensors: the output
``s * mean_{j in keys(i)} v_j`` and the gradients that a uniform attention matrix would pass
to q and k given the measured output gradient. Agreement says the deviations are what flat
attention at init does to these values, not an error in the scales.

Writes ``experiments/results/init_scales.csv`` (one row per tensor and setting),
``init_scales_summary.csv`` (per model and setting) and ``init_scales.png``.

    python experiments/init_scales.py           # d_model 64 / 256, S 32 / 128, 2 / 8 layers
    python experiments/init_scales.py --quick   # one small setting per model (to results/quick/)
    python experiments/init_scales.py --residual-attn-ratio 0.25 --tag init_scales_rho0.25
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from unitscale_jax import nn as unn  # noqa: E402
from unitscale_jax.analysis import forward_backward  # noqa: E402
from unitscale_jax.analysis.activations import named_params  # noqa: E402
from unitscale_jax.ops import attention_scale  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 4096
LO, HI = 0.5, 2.0


def _ids(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def build(kind: str, d_model: int, n_layers: int, seq: int, batch: int, rho: float = 1.0):
    """A u-muP model with unrolled layers (per-layer taps) and its loss on random tokens."""
    cfg = unn.TransformerConfig(vocab_size=VOCAB, d_model=d_model, n_layers=n_layers,
                                n_heads=d_model // 16, max_seq_len=seq, residual_attn_ratio=rho)
    rngs = nnx.Rngs(0)
    if kind == "decoder":
        return (unn.TransformerDecoder(cfg, scan_layers=False, rngs=rngs),
                lambda m, a: m.loss(a), (_ids(1, (batch, seq)),))
    if kind == "encoder":
        return (unn.TransformerEncoder(cfg, scan_layers=False, rngs=rngs),
                lambda m, a: m.mlm_loss(a, a), (_ids(1, (batch, seq)),))
    return (unn.TransformerEncoderDecoder(cfg, scan_layers=False, rngs=rngs),
            lambda m, a, b: m.loss(a, b), (_ids(1, (batch, seq)), _ids(2, (batch, seq // 2 + 1))))


def _rms(x) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(x, jnp.float32)))))


def flat_prediction(q, k, v, d_out, *, causal: bool, mult: float):
    """What a uniform attention matrix gives: (output std, q grad std, k grad std).

    ``q, k, v``: ``[B, T, H, D]`` / ``[B, S, H, D]``; ``d_out``: gradient at the attention output
    (before the output projection), ``[B, T, H, D]``. Same ``s`` as the op (rule's S = keys).
    """
    t, s_len, d = q.shape[1], k.shape[1], q.shape[-1]
    s = attention_scale(s_len, d, mult=mult, is_causal=causal)
    keep = jnp.tril(jnp.ones((t, s_len), bool)) if causal else jnp.ones((t, s_len), bool)
    p = keep / keep.sum(-1, keepdims=True)                                   # [T, S] uniform
    out = s * jnp.einsum("ts,bshd->bthd", p, v)
    # softmax backward with P uniform: dlogit = P * (dP - sum_j P dP), dP = d_out . v
    d_p = jnp.einsum("bthd,bshd->bhts", d_out, v)
    d_logit = p * (d_p - jnp.sum(p * d_p, -1, keepdims=True))
    scale = s * mult / d                                    # logits' mult/d_head, then s (bwd)
    d_q = scale * jnp.einsum("bhts,bshd->bthd", d_logit, k)
    d_k = scale * jnp.einsum("bhts,bthd->bshd", d_logit, q)
    return _rms(out), _rms(d_q), _rms(d_k)


def measure(kind: str, d_model: int, n_layers: int, seq: int, batch: int,
            rho: float = 1.0) -> list[dict]:
    model, fn, args = build(kind, d_model, n_layers, seq, batch, rho)
    _, values, grads, params, g_params = nnx.jit(
        lambda m: forward_backward(m, args, lambda m, b: fn(m, *b)))(model)
    names = sorted(values)
    values, grads = dict(values), dict(grads)
    for name, value, grad in named_params(params, g_params):
        values[name], grads[name] = value, grad
        names.append(name)
    base = {"model": kind, "d_model": d_model, "d_head": 16, "n_layers": n_layers, "seq_len": seq,
            "residual_attn_ratio": rho}
    rows, by_name = [], {}
    for name in names:
        row = {**base, "tensor": name, "std": _rms(values[name]) if name.startswith("param/")
               else float(jnp.std(values[name])), "grad_std": float(jnp.std(grads[name]))}
        row["in_range"] = int(LO <= row["std"] <= HI and LO <= row["grad_std"] <= HI)
        rows.append(row)
        by_name[name] = row
    # attention layers: q, k, v, out taps are consecutive ("NNN.<role>.q", ... "<role>.out")
    for i, name in enumerate(names):
        if not name.endswith((".attn.out", ".cross_attn.out")):
            continue
        qn, kn, vn = names[i - 3], names[i - 2], names[i - 1]
        role = name.split(".", 1)[1].rsplit(".", 1)[0]
        # the decoder stacks (decoder-only and the encoder-decoder's) are causal; cross
        # attention and the encoder are not
        causal = role == "attn" and (kind == "decoder" or (kind == "encoder_decoder"
                                                            and _in_decoder(names, i)))
        out, d_q, d_k = flat_prediction(values[qn], values[kn], values[vn], grads[name],
                                        causal=causal, mult=1.0)
        by_name[name]["flat_prediction"] = out
        by_name[qn]["flat_prediction_grad"] = d_q
        by_name[kn]["flat_prediction_grad"] = d_k
    return rows


def _in_decoder(names, i) -> bool:
    """Whether tap ``names[i]`` comes after the encoder-decoder's encoder output."""
    return any(n.endswith(".encoder_norm") for n in names[:i])


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["model"], r["n_layers"], r["seq_len"], r["d_model"]) for r in rows})
    for model, layers, seq, d in keys:
        rs = [r for r in rows if (r["model"], r["n_layers"], r["seq_len"], r["d_model"])
              == (model, layers, seq, d)]
        acts = [r for r in rs if not r["tensor"].startswith("param/")]
        hidden = [r for r in acts if not r["tensor"].endswith("logits")]
        not_qk = [r for r in acts if not r["tensor"].endswith((".q", ".k"))]
        pred = [(r["std"], r["flat_prediction"]) for r in rs if "flat_prediction" in r]
        pred_g = [(r["grad_std"], r["flat_prediction_grad"]) for r in rs
                  if "flat_prediction_grad" in r]
        ratios = [m / p for m, p in pred + pred_g]
        out.append({
            "model": model, "d_model": d, "n_layers": layers, "seq_len": seq,
            "residual_attn_ratio": rs[0]["residual_attn_ratio"],
            "tensors": len(rs), "in_[0.5,2]": sum(r["in_range"] for r in rs),
            "hidden_act_std_min": min(r["std"] for r in hidden),
            "hidden_act_std_max": max(r["std"] for r in hidden),
            "grad_std_min_excl_qk": min(r["grad_std"] for r in not_qk),
            "grad_std_max_excl_qk": max(r["grad_std"] for r in not_qk),
            "qk_grad_std_min": min((r["grad_std"] for r in acts
                                    if r["tensor"].endswith((".q", ".k"))), default=float("nan")),
            "param_grad_std_min": min(r["grad_std"] for r in rs
                                      if r["tensor"].startswith("param/")),
            "param_grad_std_max": max(r["grad_std"] for r in rs
                                      if r["tensor"].startswith("param/")),
            "attn_out_std_max": max((m for m, _ in pred), default=float("nan")),
            "measured_over_flat_prediction_min": min(ratios, default=float("nan")),
            "measured_over_flat_prediction_max": max(ratios, default=float("nan")),
        })
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows: list[dict], path: Path, rho: float = 1.0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = {"decoder": ("C0", "o"), "encoder": ("C1", "s"), "encoder_decoder": ("C2", "^")}
    for model, (c, marker) in colours.items():
        rs = [r for r in rows if r["model"] == model]
        m = [(r["flat_prediction"], r["std"]) for r in rs if "flat_prediction" in r]
        g = [(r["flat_prediction_grad"], r["grad_std"]) for r in rs if "flat_prediction_grad" in r]
        if m:
            axes[0].scatter(*zip(*m), s=18, marker=marker, facecolors="none", edgecolors=c,
                            label=model)
        if g:
            axes[1].scatter(*zip(*g), s=18, marker=marker, facecolors="none", edgecolors=c,
                            label=model)
    for ax, title in zip(axes, ("attention output std", "q / k gradient std")):
        lo, hi = ax.get_xlim()
        lo, hi = min(lo, ax.get_ylim()[0]), max(hi, ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = prediction")
        ax.axhspan(LO, HI, color="0.9", zorder=0, label="[0.5, 2]")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("flat-softmax prediction from the model's own q, k, v")
        ax.set_ylabel("measured at init")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"u-muP models at init on random tokens (d_head 16, residual_attn_ratio {rho:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small setting per model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--residual-attn-ratio", type=float, default=1.0,
                   help="u-muP's rho (residual_attn_ratio) for every model (default 1)")
    p.add_argument("--tag", default="init_scales", help="file name stem of the outputs")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default experiments/results, or its quick/ with --quick)")
    args = p.parse_args(argv)
    args.out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    settings = ([(64, 2, 32)] if args.quick else
                [(64, 2, 32), (64, 2, 128), (64, 8, 32), (64, 8, 128), (256, 2, 128)])
    rows = []
    for kind in ("decoder", "encoder", "encoder_decoder"):
        for d, layers, seq in settings:
            rows += measure(kind, d, layers, seq, args.batch, args.residual_attn_ratio)
            print(f"{kind:16s} d_model {d:4d} layers {layers} S {seq:4d}: measured")
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.tag + ("_quick" if args.quick else "")
    write_csv(args.out / f"{stem}.csv", rows)
    write_csv(args.out / f"{stem}_summary.csv", summary)
    plot(rows, args.out / f"{stem}.png", args.residual_attn_ratio)
    cols = ["model", "d_model", "n_layers", "seq_len", "tensors", "in_[0.5,2]",
            "hidden_act_std_max", "grad_std_min_excl_qk", "qk_grad_std_min",
            "measured_over_flat_prediction_min", "measured_over_flat_prediction_max"]
    print(" | ".join(cols))
    for s in summary:
        print(" | ".join(f"{s[c]:.3g}" if isinstance(s[c], float) else str(s[c]) for c in cols))
    print(f"wrote {args.out}/{stem}.csv, _summary.csv, .png")
    return rows


if __name__ == "__main__":
    main()
