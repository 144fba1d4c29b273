"""A u-muP Transformer written directly with ``unitscale_jax.ops``, and its scales at init.

Unit scaling gives every op a forward scale and separate backward scales, fixed by static
shapes, so that with unit-variance inputs every activation, weight and gradient of the model
starts near standard deviation 1. u-muP adds muP's readout rule, its attention scale and its
residual weights. This example builds a small causal decoder from the functional ops alone
(no ``unitscale_jax.nn``):

    embedding -> [rms_norm -> linear (qkv) -> scaled_dot_product_attention -> linear] x
    residual_split / residual_add  -> [rms_norm -> linear (up, gate) -> silu_glu -> linear]
    x residual_split / residual_add  -> ... (n_layers) -> rms_norm -> linear_readout
    -> cross_entropy

with every weight drawn from N(0, 1) (u-muP's init: the scales live in the ops, not in the
weights) and the residual weights ``tau`` from ``ops.transformer_residual_scaling_rule``.
It then runs one forward and backward pass (``jax.grad``, through
``unitscale_jax.analysis.activation_stats``, which reads the activations the model marks
with ``unitscale_jax.taps.tap``) and prints the standard deviation of every activation,
weight and gradient next to the value the scaling rules predict for it:

* 1 for every tensor, except
* the logits, whose readout multiplier is muP's ``1/fan_in`` (not ``fan_in^-1/2``): std
  ``d_model^-1/2``;
* the gradients of q and k, for which the rules make no unit-scale claim: u-muP gives q, k
  and v one attention scale, set for v, and at init the attention softmax is nearly flat,
  so only about ``d_head^-1/2`` of the output gradient reaches q and k (less once the keys
  share a component; ``experiments/results/init_scales.md`` checks this against a
  flat-softmax prediction). They are printed with "-" as the expectation.

Every other std lies within a factor of 2 of its expectation (the script exits non-zero if
not). The activations and gradients behind the attention layers drift most (up to 1.75 and
1.5 here); they grow with depth and sequence length. Run ``python examples/umup_from_ops.py``
(a few seconds; ``--d-model``, ``--n-layers``, ``--seq-len`` ... change the model).
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

from unitscale_jax import ops
from unitscale_jax.analysis import activation_stats
from unitscale_jax.taps import tap


class TinyUMuPDecoder(nnx.Module):
    """A pre-norm causal decoder built from ``unitscale_jax.ops`` (u-muP).

    Args:
      vocab: vocabulary size.
      d_model: model width.
      n_heads: attention heads (``d_model`` must be a multiple).
      n_layers: Transformer layers.
      ffn_dim: hidden width of the SwiGLU MLP.
      rngs: ``nnx.Rngs`` for the N(0, 1) weights.
    """

    def __init__(self, vocab: int, d_model: int, n_heads: int, n_layers: int, ffn_dim: int, *,
                 rngs: nnx.Rngs):
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}.")
        normal = lambda *shape: nnx.Param(jax.random.normal(rngs.params(), shape))  # noqa: E731
        self.n_heads = n_heads
        self.embed = normal(vocab, d_model)
        self.layers = nnx.List([nnx.Dict(
            qkv=normal(d_model, 3 * d_model), out=normal(d_model, d_model),
            up=normal(d_model, ffn_dim), gate=normal(d_model, ffn_dim),
            down=normal(ffn_dim, d_model)) for _ in range(n_layers)])
        self.readout = normal(d_model, vocab)
        rule = ops.transformer_residual_scaling_rule()  # u-muP's taus, defaults
        self.taus = tuple(rule(i, 2 * n_layers) for i in range(2 * n_layers))

    def attention(self, x_bsd: jax.Array, w, name: str) -> jax.Array:
        b, s, d = x_bsd.shape
        qkv_bs3hk = ops.linear(x_bsd, w["qkv"][...]).reshape(b, s, 3, self.n_heads, -1)
        q, k, v = (tap(f"{name}.{n}", qkv_bs3hk[:, :, i]) for i, n in enumerate("qkv"))
        out_bshk = tap(f"{name}.out", ops.scaled_dot_product_attention(q, k, v, is_causal=True))
        return ops.linear(out_bshk.reshape(b, s, d), w["out"][...])

    def mlp(self, x_bsd: jax.Array, w, name: str) -> jax.Array:
        # constraint=None: the up/gate scales mirror the down projection's (as in u-muP)
        up = tap(f"{name}.up", ops.linear(x_bsd, w["up"][...], constraint=None))
        gate = tap(f"{name}.gate", ops.linear(x_bsd, w["gate"][...], constraint=None))
        act = tap(f"{name}.act", ops.silu_glu(up, gate))
        return ops.linear(act, w["down"][...], constraint=None)

    def __call__(self, ids_bs: jax.Array) -> jax.Array:
        x_bsd = tap("embed", ops.embedding(ids_bs, self.embed[...]))
        for l, w in enumerate(self.layers):
            for j, branch in enumerate((self.attention, self.mlp)):
                name = f"layer{l}.{'attn' if j == 0 else 'mlp'}"
                tau = self.taus[2 * l + j]
                residual, skip = ops.residual_split(x_bsd, tau)
                y = tap(f"{name}.branch_out",
                        branch(tap(f"{name}.norm", ops.rms_norm(residual)), w, name))
                x_bsd = tap(f"{name}.resid", ops.residual_add(y, skip, tau))
        x_bsd = tap("final_norm", ops.rms_norm(x_bsd))
        return tap("logits", ops.linear_readout(x_bsd, self.readout[...]))

    def loss(self, ids_bs: jax.Array, labels_bs: jax.Array) -> jax.Array:
        return ops.cross_entropy(self(ids_bs), labels_bs)


def expected_stds(name: str, d_model: int, d_head: int) -> tuple[float, float | None]:
    """What the scaling rules predict for ``(std of the tensor, std of its gradient)``.

    None: no unit-scale prediction (q and k gradients, see the module docstring; a flat
    softmax makes them roughly ``d_head^-1/2`` of the output gradient, less once the keys share
    a component).
    """
    if name == "logits":
        return d_model ** -0.5, 1.0
    if name.endswith((".q", ".k")):
        return 1.0, None
    return 1.0, 1.0


LO, HI = 0.5, 2.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    args = parser.parse_args(argv)
    if min(args.d_model, args.n_layers, args.n_heads, args.seq_len, args.batch) < 1 or \
            args.vocab < 2 or args.d_model % args.n_heads:
        parser.error("sizes must be positive, --vocab >= 2, --d-model a multiple of --n-heads")

    model = TinyUMuPDecoder(args.vocab, args.d_model, args.n_heads, args.n_layers,
                            4 * args.d_model, rngs=nnx.Rngs(0))
    ids_bs = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len + 1), 0,
                                args.vocab)
    ids_bs, labels_bs = ids_bs[:, :-1], ids_bs[:, 1:]
    stats = activation_stats(lambda m, i, y: m.loss(i, y), model, ids_bs, labels_bs,
                             include_params=True)

    d_head = args.d_model // args.n_heads
    print(f"u-muP decoder from unitscale_jax.ops: d_model {args.d_model}, {args.n_layers} "
          f"layers, {args.n_heads} heads, {args.batch} x {args.seq_len} random tokens of "
          f"{args.vocab}; std at init and the value the rules expect (exp)")
    print(f"{'tensor':<26} {'std':>8} {'(exp)':>8} {'grad std':>9} {'(exp)':>8}")
    checked = outside = 0
    for tapped, (value_std, grad_std) in stats.items():
        name = tapped.split(".", 1)[1] if not tapped.startswith("param/") else tapped
        want_v, want_g = expected_stds(name, args.d_model, d_head)
        for got, want in ((value_std, want_v), (grad_std, want_g)):
            if want is not None:
                checked += 1
                outside += not LO <= got / want <= HI
        note = f"  q/k: flat softmax, ~d_head^-1/2 = {d_head ** -0.5:.2f}" if want_g is None else ""
        want_g_text = "-" if want_g is None else f"{want_g:.4f}"
        print(f"{name:<26} {value_std:8.4f} {want_v:8.4f} {grad_std:9.4f} {want_g_text:>8}{note}")
    print(f"{checked - outside} of {checked} stds within [{LO:g}, {HI:g}] x their expected "
          "value")
    if outside:
        raise SystemExit(f"{outside} std(s) outside [{LO:g}, {HI:g}] x the expected value")


if __name__ == "__main__":
    main()
