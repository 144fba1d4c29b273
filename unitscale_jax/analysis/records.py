"""CSV files for record tables (lists of flat dicts), without pandas."""

from __future__ import annotations

import csv
import math
import os
from typing import Iterable, Optional, Sequence


def write_csv(records: Sequence[dict], path: str, fields: Optional[Sequence[str]] = None) -> str:
    """Writes ``records`` to ``path`` (parent folders created); returns ``path``.

    Args:
      records: dicts of str / int / float / bool values.
      path: output file.
      fields: column order; default: the keys of the records in first-seen order.
    """
    records = list(records)
    if not records:
        raise ValueError(f"write_csv: no records to write to {path}.")
    if fields is None:
        fields = list(dict.fromkeys(k for r in records for k in r))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="raise")
        w.writeheader()
        for r in records:
            w.writerow({k: _fmt(r.get(k)) for k in fields})
    return path


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def _parse(s: str):
    if s == "":
        return None
    if s in ("True", "False"):
        return s == "True"
    try:
        return int(s)
    except ValueError:
        pass
    try:
        v = float(s)
    except ValueError:
        return s
    return v if math.isfinite(v) or s.lower() in ("nan", "inf", "-inf") else s


def read_csv(path: str) -> list[dict]:
    """Reads a file written by ``write_csv`` back (ints, floats and bools parsed)."""
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def select(records: Iterable[dict], **match) -> list[dict]:
    """The records whose fields equal every ``key=value`` given."""
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]
