"""chex-checked invariants of the unit-scaling / u-muP optimizer transforms.

Each ``assert_*`` function is built from chex's value assertions, so it works eagerly (in tests)
and, wrapped in ``chex.chexify``, inside ``jax.jit`` at run time::

    check = chex.chexify(jax.jit(unitscale_jax.optim.checks.assert_unit_rms))
    check(updates)
    chex.block_until_chexify_assertions_complete()

or, synchronously and with every failure raised as ``AssertionError``,
``unitscale_jax.optim.checks.jit_checked(assert_unit_rms)(updates)``.

The invariants (issue 4):

* after ``unit_scale()`` every non-zero leaf has RMS 1 (``assert_unit_rms``);
* multiplying the loss by 2^k, k in [-20, 20], gives the same updates
  (``assert_loss_scale_invariant``);
* at step 1 of u-muP Adam with ``eps -> 0`` each tensor's update RMS is ``eta * factor``
  (``assert_umup_first_step``): Adam's first step is a sign step;
* updates are finite whenever the gradients are (``assert_finite_updates``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import optax

from unitscale_jax.optim import _pow2
from unitscale_jax.optim._tree import InfoLookup, array_keys, is_leaf, is_passthrough, map_arrays
from unitscale_jax.optim.umup import umup_factor

DEFAULT_EXPONENTS = tuple(range(-20, 21))


_FALSE_EXIT_WARNING = "Some of chexify assertion statuses were not inspected"


class _DropFalseExitWarning(logging.Filter):
    """Drops chex's exit warning about uninspected asynchronous assertion statuses.

    chex registers a wait callback for every chexified function and, at interpreter exit, logs
    that warning whenever any is registered, even for ``async_check=False`` functions such as
    ``jit_checked``'s, whose checks raise before the call returns. chex has no public way to
    unregister the callback, so the warning is filtered from the ``absl`` logger instead (through
    the standard ``logging`` API). Side effect: the warning is also dropped for a user's own
    asynchronous ``chex.chexify`` functions in the same process; call
    ``chex.block_until_chexify_assertions_complete()`` for those.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return _FALSE_EXIT_WARNING not in str(record.msg)


_EXIT_FILTER = _DropFalseExitWarning()


def jit_checked(fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """``fn`` jitted with its chex assertions live (``chex.chexify``), checked synchronously.

    Failures raise ``AssertionError``. (chex converts checkify's error to ``AssertionError``
    only for single-line messages; a failing array comparison prints a multi-line message and
    would otherwise surface as a checkify ``FailedCheckError``.)
    """
    checked = chex.chexify(jax.jit(fn, **jit_kwargs), async_check=False)
    logging.getLogger("absl").addFilter(_EXIT_FILTER)  # idempotent

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return checked(*args, **kwargs)
        except AssertionError:
            raise
        except Exception as exc:  # checkify's FailedCheckError
            if "[Chex]" in str(exc):
                raise AssertionError(str(exc)) from exc
            raise

    return run


def tree_rms(tree: Any) -> Any:
    """The float32 RMS of every array leaf (exact under power-of-two scaling; see ``_pow2``).

    ``nnx.Variable`` leaves are unwrapped; ``None`` / ``MaskedNode`` leaves pass through.
    """
    return jax.tree_util.tree_map(
        lambda x: x if is_passthrough(x) else _pow2.rms(getattr(x, "get_value", lambda: x)()),
        tree, is_leaf=is_leaf)


def nonzero_rms(x: jax.Array) -> jax.Array:
    """RMS over the non-zero elements of ``x`` (0 if there are none)."""
    nnz = jnp.sum(x != 0).astype(jnp.float32)
    return jnp.where(nnz > 0, _pow2.rms(x) * jnp.sqrt(x.size / jnp.maximum(nnz, 1.0)), 0.0)


def _arrays(tree: Any) -> list:
    return [getattr(x, "get_value", lambda: x)()
            for x in jax.tree_util.tree_leaves(tree, is_leaf=is_leaf) if not is_passthrough(x)]


def assert_unit_rms(updates: Any, *, rtol: float = 1e-6, atol: float = 0.0) -> None:
    """Asserts that every non-zero leaf of ``updates`` has RMS 1 (within ``rtol``/``atol``).

    Use the default (a few float32 ulps) right after ``unit_scale(decay=0)`` or at its first
    step; with ``decay > 0`` later steps drift, so pass a tolerance.
    """
    rms = [_pow2.rms(x) for x in _arrays(updates)]
    expected = [jnp.where(r == 0, 0.0, 1.0) for r in rms]
    chex.assert_trees_all_close(rms, expected, rtol=rtol, atol=atol)


def assert_finite_updates(grads: Any, updates: Any) -> None:
    """Asserts that ``updates`` are finite whenever all of ``grads`` are."""
    g = _arrays(grads)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in g])) if g else jnp.bool_(True)
    chex.assert_tree_all_finite([jnp.where(finite, u, 0) for u in _arrays(updates)])


def expected_first_step_rms(updates: Any, param_info: Any, learning_rate: float, *,
                            optimizer: str = "adam", readout_constraint: Optional[str] = None,
                            default: Any = None, allow_missing: bool = False) -> list:
    """``learning_rate * umup_factor`` for each leaf of ``updates`` (flattening order)."""
    lookup = InfoLookup(param_info, default=default, allow_missing=allow_missing)
    infos = lookup.resolve(array_keys(updates))
    return [learning_rate * (1.0 if i is None else umup_factor(i, optimizer, readout_constraint))
            for i in infos.values()]


def assert_umup_first_step(updates: Any, param_info: Any, learning_rate: float, *,
                           optimizer: str = "adam", readout_constraint: Optional[str] = None,
                           rtol: float = 2e-5, **lookup_kwargs: Any) -> None:
    """Asserts ``RMS(update) = learning_rate * factor`` for every tensor.

    Holds for the first update of u-muP Adam/AdamW without weight decay and with ``eps`` far
    below the gradients (``eps -> 0``): Adam's first step is ``sign(g)``, so each update is
    ``-eta * factor * sign(g)``. The check is element-wise, hence exact: the largest and the
    smallest non-zero ``|update|`` of each tensor must both equal ``eta * factor`` (so the RMS
    over its non-zero elements does). Elements whose gradient is exactly zero (embedding rows of
    tokens absent from the batch) get no update and are left out.

    Tolerance: Adam's float32 bias corrections make its first step ``(1 - 7e-6) sign(g)`` for
    the default ``b1 = 0.9, b2 = 0.999``, hence the default ``rtol``; with betas whose
    complements are powers of two (e.g. ``b1 = 1 - 2**-3, b2 = 1 - 2**-10``) the step is
    exactly ``sign(g)`` and ``rtol = 1e-6`` (float32 rounding of ``eta * factor``) holds.
    """
    arrays = _arrays(updates)
    mags = [jnp.abs(u.astype(jnp.float32)) for u in arrays]
    hi = [jnp.max(m) if m.size else jnp.float32(0) for m in mags]
    lo = [jnp.min(jnp.where(m > 0, m, jnp.inf)) if m.size else jnp.float32(0) for m in mags]
    want = [jnp.float32(w) for w in expected_first_step_rms(
        updates, param_info, learning_rate, optimizer=optimizer,
        readout_constraint=readout_constraint, **lookup_kwargs)]
    chex.assert_trees_all_close(hi, want, rtol=rtol, atol=0.0)
    chex.assert_trees_all_close(lo, want, rtol=rtol, atol=0.0)


def loss_scaled_updates(tx: optax.GradientTransformation, grads: Any, params: Any, *,
                        exponents: Sequence[int] = DEFAULT_EXPONENTS, num_steps: int = 1,
                        **extra_args: Any):
    """Runs ``tx`` for ``num_steps`` on gradients multiplied by ``2^k`` for each ``k``.

    Multiplying gradients by ``2^k`` is exactly what scaling the loss by ``2^k`` does to them
    (back-propagation is linear in the incoming cotangent and rounding commutes with powers of
    two), barring underflow and overflow.

    Args:
      tx: the transformation.
      grads: a gradient tree, or a list of ``num_steps`` gradient trees (one per step).
      params: the initial parameters; each step applies its updates to them.
      exponents: the ``k`` values.
      num_steps: number of updates.
      **extra_args: passed to ``tx.update``.

    Returns:
      ``(updates, params)`` after the last step, each leaf stacked over ``exponents``.
    """
    seq = grads if isinstance(grads, (list, tuple)) else [grads] * num_steps
    if len(seq) != num_steps:
        raise ValueError(f"Got {len(seq)} gradient trees for num_steps={num_steps}.")
    scales = _pow2.scale_pow2(jnp.ones((len(exponents),), jnp.float32),
                              jnp.asarray(exponents, jnp.int32))

    def run(scale):
        state, p, u = tx.init(params), params, None
        for g in seq:
            g = map_arrays(lambda k, x: (x * scale).astype(x.dtype), g)
            u, state = tx.update(g, state, p, **extra_args)
            p = optax.apply_updates(p, u)
        return u, p

    return jax.jit(jax.vmap(run))(scales)


def assert_loss_scale_invariant(tx: optax.GradientTransformation, grads: Any, params: Any, *,
                                exponents: Sequence[int] = DEFAULT_EXPONENTS, num_steps: int = 1,
                                rtol: float = 1e-6, atol: float = 0.0, **extra_args: Any) -> None:
    """Asserts that ``tx`` gives the same updates and parameters for every loss scale ``2^k``.

    ``unit_scale()`` (with ``eps = 0``) and anything after it are bit-for-bit invariant; the
    u-muP Adam family alone is invariant to float32 rounding when ``eps`` is far below the
    scaled gradients. Arguments as in ``loss_scaled_updates``. All scales run in one batched
    computation and are compared with its ``k = 0`` member (added if absent), so that the
    comparison sees only the effect of the scale, not differences between compilations.

    ``rtol = 0`` (bit-for-bit) is safe when this runs eagerly. Inside a jitted program (e.g.
    through ``chex.chexify``) XLA may fuse the comparison with a recomputed copy of the
    updates whose rounding differs by an ulp, so keep the default few-ulp ``rtol`` there.
    """
    exponents = list(exponents)
    if 0 not in exponents:
        exponents.append(0)
    ref = exponents.index(0)
    updates, new_params = loss_scaled_updates(tx, grads, params, exponents=exponents,
                                              num_steps=num_steps, **extra_args)
    got = _arrays(updates) + _arrays(new_params)
    want = [jnp.broadcast_to(x[ref], x.shape) for x in got]
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


__all__ = [
    "DEFAULT_EXPONENTS", "jit_checked", "assert_finite_updates", "assert_loss_scale_invariant",
    "assert_umup_first_step", "assert_unit_rms", "expected_first_step_rms",
    "loss_scaled_updates", "nonzero_rms", "tree_rms",
]
