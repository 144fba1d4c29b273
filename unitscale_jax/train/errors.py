"""Errors the trainer reports as one line (no traceback): the user's input was wrong."""

from __future__ import annotations


class UsageError(Exception):
    """A bad option, config value or data source; the message says what and how to fix it."""


class TrainingStopped(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
