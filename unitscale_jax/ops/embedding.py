"""Unit-scaled embedding lookup."""

from __future__ import annotations

import jax

from unitscale_jax.ops import _wide
from unitscale_jax.ops._checks import check_ids_in_range, require_float, require_int, require_rank


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
    require_int(ids, "ids", "embedding")
    require_float(table, "table", "embedding")
    require_rank(table, 2, "table", "embedding")
    vocab = table.shape[0]
    if check_ids:
        check_ids_in_range(ids, vocab, "token ids", "embedding")
    # = take(scale_bwd(table, beta), ids), the row sums accumulated and scaled in float32
    return _wide.gather_rows(table, ids, (vocab / max(ids.size, 1)) ** 0.5)
