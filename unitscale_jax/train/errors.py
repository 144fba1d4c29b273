"""Errors the trainer reports as one line (no traceback): the user's input was wrong."""

from __future__ import annotations


class UsageError(Exception):
    """A bad option, config value or data source; the message says what and how to fix it."""


class TrainingStopped(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept.

    The subclasses say why, for a caller that treats the reasons differently (a sweep records
    a diverged run and goes on, but must stop when it is interrupted): ``Diverged``,
    ``Interrupted``, ``PeerLost``.
    """


class Diverged(TrainingStopped):
    """The training loss (or, with the precision guard's skips used up, the gradients) became
    non-finite."""


class Interrupted(TrainingStopped):
    """SIGTERM, SIGINT or Ctrl-C stopped the run (rerun the same command to resume)."""


class PeerLost(TrainingStopped):
    """A process of a multi-process run died (a collective failed); the others stop at once,
    the last complete checkpoint is kept (``unitscale_jax.train.distributed``)."""
