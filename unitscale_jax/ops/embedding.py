"""Unit-scaled embedding lookup."""

from __future__ import annotations

import jax

from unitscale_jax.ops import plain


def embedding(ids: jax.Array, table: jax.Array, *, check_ids: bool = False) -> jax.Array:
    """Looks up rows of ``table[vocab, d]``; the table's gradient is unit-scaled.

    Scaling rule (Blake et al., 2023, table A.2): forward is the plain gather (the table is
    N(0, 1), so rows are unit scale); ``beta_table = sqrt(vocab / ids.size)``: each row's
    gradient sums over the ``ids.size / vocab`` tokens that use it on average.

    Args:
      ids: integer token ids of any shape.
      table: ``[vocab, d]`` embedding table.
      check_ids: raise if an id lies outside ``[0, vocab)`` (JAX would silently clamp the
        gather). Works eagerly and under ``jax.jit`` (via a host callback).

    Returns:
      ``[*ids.shape, d]`` in ``table``'s dtype.
    """
    # = take(scale_bwd(table, beta), ids), the row sums accumulated and scaled in float32
    return plain._gather(ids, table, check_ids, "unit")
