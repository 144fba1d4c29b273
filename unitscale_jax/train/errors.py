"""Errors the trainer reports as one line (no traceback): the user's input was wrong."""

from __future__ import annotations


class UsageError(Exception):
    """A bad option, config value or data source; the message says what and how to fix it."""


class TrainingStopped(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class PeerLost(TrainingStopped):
    """A process of a multi-process run died (a collective failed); the others stop at once,
    the last complete checkpoint is kept (``unitscale_jax.train.distributed``)."""
