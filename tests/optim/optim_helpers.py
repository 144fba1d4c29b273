"""Helpers for the optimizer tests: a tiny unit-scaled LM built by hand with umup_param."""

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax import ops
from unitscale_jax.nn import ParamInfo, param_info, umup_param


class TinyLM(nnx.Module):
    """Embedding -> depth x residual MLP (norm gain, hidden weights, bias) -> readout."""

    def __init__(self, vocab=32, d=16, hidden=24, depth=2, *, rngs: nnx.Rngs):
        self.depth = depth
        self.embed = umup_param(jax.random.normal(rngs.params(), (vocab, d)), "embedding", d)
        self.layers = nnx.List([_Block(d, hidden, depth, rngs) for _ in range(depth)])
        self.final_norm = umup_param(jnp.ones((d,)), "norm", d)
        self.readout = umup_param(jax.random.normal(rngs.params(), (d, vocab)), "output", d)

    def __call__(self, ids):
        x = ops.embedding(ids, self.embed[...])
        for i, layer in enumerate(self.layers):
            x = ops.residual_apply(layer, x, 1.0 / (1.0 + i) ** 0.5)
        x = ops.rms_norm(x, self.final_norm[...])
        return ops.linear_readout(x, self.readout[...])


class _Block(nnx.Module):
    def __init__(self, d, hidden, depth, rngs):
        self.norm = umup_param(jnp.ones((d,)), "norm", d, depth)
        self.up = umup_param(jax.random.normal(rngs.params(), (d, hidden)), "weight", d, depth)
        self.up_bias = umup_param(jnp.zeros((hidden,)), "bias", hidden, depth)
        self.down = umup_param(jax.random.normal(rngs.params(), (hidden, d)), "weight", hidden, depth)

    def __call__(self, x):
        h = ops.linear(ops.rms_norm(x, self.norm[...]), self.up[...], self.up_bias[...])
        return ops.linear(ops.gelu(h), self.down[...])


#: The exact u-muP Adam factor of every TinyLM(d=16, hidden=24, depth=2) parameter.
TINY_ADAM_FACTORS = {
    ("embed",): 16 ** -0.5,
    ("final_norm",): 1.0,
    ("readout",): 1.0,
    **{("layers", str(i), "norm"): 2 ** -0.5 for i in range(2)},
    **{("layers", str(i), "up"): 2 ** -0.5 * 16 ** -0.5 for i in range(2)},
    **{("layers", str(i), "up_bias"): 2 ** -0.5 for i in range(2)},
    **{("layers", str(i), "down"): 2 ** -0.5 * 24 ** -0.5 for i in range(2)},
}


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return ops.cross_entropy(logits, ids[:, 1:])
