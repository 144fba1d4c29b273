"""``unit_scale()``: an Optax transform that unit-scales the gradient stream.

Unit scaling (Blake, Orr & Luschi, ICML 2023, arXiv 2303.11257) keeps every tensor of a model
near RMS 1 so that low-precision formats represent it well. This transform applies the same idea
to the gradients that reach an optimizer: each leaf is divided by a running estimate of its RMS,
so whatever follows in the chain receives tensors of RMS ~ 1, whatever the loss scale and however
the gradient magnitudes drift during training.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unitscale_jax.optim import _pow2
from unitscale_jax.optim._tree import is_leaf, is_passthrough, value_of


class UnitScaleState(NamedTuple):
    """State of ``unit_scale``.

    Attributes:
      count: number of updates seen (int32 scalar).
      rms: float32 vector with one entry per array leaf of the parameters (in flattening order,
        ``None`` / ``MaskedNode`` leaves skipped): the bias-corrected running RMS estimate
        ``sqrt(ms_hat_t)`` (see ``unit_scale``). One vector rather than a tree parallel to the
        parameters, so that tools which find the parameter-shaped parts of an optimizer state
        by structure (``optax.tree.map_params``, used to derive state shardings) treat it as the
        small non-parameter state it is.
    """

    count: jax.Array
    rms: jax.Array


def _check_decay(decay: Any) -> None:
    if isinstance(decay, (int, float)) and not 0.0 <= decay < 1.0:
        raise ValueError(
            f"unit_scale: decay must be in [0, 1) (0 = exact per-step normalisation), got {decay}.")


def unit_scale(decay: float = 0.0, eps: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """Divides each gradient leaf by a running estimate of its RMS.

    For a leaf ``g_t`` with ``n`` elements, step ``t = 1, 2, ...``::

        x_t    = mean(g_t^2)                                     # mean square of the leaf
        ms_t   = decay * ms_{t-1} + (1 - decay) * x_t,  ms_0 = 0  # EMA of the mean square
        ms_hat = ms_t / (1 - decay^t)                            # bias correction (as in Adam)
        out_t  = g_t / (sqrt(ms_hat) + eps)

    ``decay = 0`` is exact per-step normalisation: every non-zero leaf leaves with RMS 1. With
    ``decay > 0`` the output RMS is 1 at step 1 and follows the drift of gradient magnitudes
    smoothly afterwards. The state holds one float32 scalar per leaf (``sqrt(ms_hat)``, in one
    vector, kept bias-corrected through the equivalent recursion
    ``ms_hat_t = w_t ms_hat_{t-1} + (1 - w_t) x_t``,
    ``w_t = decay (1 - decay^(t-1)) / (1 - decay^t)``) and a step count.

    Loss-scale invariance: the mean square is computed after normalising the leaf by a power of
    two, the one just above its max-abs at step 1 and, from step 2 on, the one just above the
    previous RMS estimate (one read of the leaf instead of two; the max-abs pass returns only if
    the leaf's RMS moved by more than ~2^30 in one step, or it is zero or not finite: see
    ``unitscale_jax.optim._pow2``), and the state is kept as an RMS (not a mean square), so no
    square underflows or overflows float32 and, for gradients
    multiplied by any 2^k that stay finite and normal, the outputs are bit-for-bit identical
    (with the default ``eps = 0``). Zero leaves stay zero (no 0/0). ``None`` and
    ``optax.MaskedNode`` leaves pass through, ``nnx.Variable`` leaves keep their wrappers. A leaf
    is one array: the layers of a scanned stack (stacked on a leading axis) share one RMS.

    Why put it in front of an optimizer:

    * Adam (and Adafactor, Lion, sign-SGD ...) normalises each coordinate by its own second-moment
      estimate, so multiplying a whole tensor's gradient stream by a positive constant ``c``
      multiplies ``m`` by ``c`` and ``sqrt(v)`` by ``c``: the update direction and size are
      unchanged (up to Adam's ``eps``). With ``decay = 0`` the per-step factor varies from step to
      step, which reweights the history in Adam's moments by the inverse RMS of each step; with
      ``decay`` close to Adam's ``b2`` the factor is nearly constant over Adam's window and
      Adam's direction is unchanged. In either case what changes is the *representation*: ``m``
      and ``v`` now hold values of order 1 instead of, say, 1e-6 and 1e-12, so they can be
      stored in bfloat16/float16/float8 without underflow, and Adam's ``eps`` acts at a known
      relative size instead of one that depends on the loss scale.
    * SGD's update is proportional to the gradient, so its effective learning rate is the
      gradient scale times the learning rate: unit-scaled gradients give SGD a learning rate
      that means the same thing for every tensor, every loss scale and every stage of training,
      which is what u-muP's SGD rules (``scale_by_umup(..., optimizer="sgd")``) assume.

    Args:
      decay: EMA decay of the mean square, in [0, 1). 0 (default) normalises every step exactly.
      eps: added to the RMS estimate in the denominator. The default 0 keeps the transform exactly
        invariant to power-of-two loss scales; a positive value bounds the amplification of
        leaves whose gradients are tiny in absolute terms, at the price of that invariance for
        leaves with RMS near or below ``eps``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra args are accepted and ignored).
    """
    _check_decay(decay)

    def arrays(tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_leaf)
        return leaves, treedef, [i for i, x in enumerate(leaves) if not is_passthrough(x)]

    def init_fn(params):
        _, _, idx = arrays(params)
        return UnitScaleState(count=jnp.zeros((), jnp.int32),
                              rms=jnp.zeros((len(idx),), jnp.float32))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves, treedef, idx = arrays(updates)
        if len(idx) != state.rms.shape[0]:
            raise ValueError(
                f"unit_scale: the updates have {len(idx)} array leaves but the state was "
                f"initialised for {state.rms.shape[0]}; call init with a tree of the same "
                "structure.")
        count = optax.safe_increment(state.count)
        d = jnp.asarray(decay, jnp.float32)
        t = count.astype(jnp.float32)
        # Weight of the previous bias-corrected estimate; exactly 0 at t = 1 and for decay = 0.
        w = d * (1.0 - d ** (t - 1.0)) / (1.0 - d ** t)
        w = jnp.where((count <= 1) | (d == 0), 0.0, w)
        e = jnp.asarray(eps, jnp.float32)

        new_rms, out = [], list(leaves)
        for j, i in enumerate(idx):
            r_old = state.rms[j]
            g = value_of(leaves[i])
            # one read of g for its statistics from step 2 on (previous RMS as the guess)
            x = _pow2.rms_with_guess(g, r_old, count > 1)
            r = jnp.where(w == 0, x, _pow2.weighted_rms(r_old, x, w))
            denom = r + e
            # One reciprocal per leaf (exact under 2^k scaling like the division it replaces);
            # denom == 0 only for an all-zero leaf, which stays zero; NaN/inf propagate.
            inv = jnp.where(denom == 0, 0.0, 1.0 / jnp.where(denom == 0, 1.0, denom))
            u = (g.astype(jnp.float32) * inv).astype(g.dtype)
            out[i] = leaves[i].replace(u) if isinstance(leaves[i], nnx.Variable) else u
            new_rms.append(r)
        return (jax.tree_util.tree_unflatten(treedef, out),
                UnitScaleState(count=count, rms=jnp.stack(new_rms) if new_rms else state.rms))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
