"""A griffe extension (mkdocs.yml, mkdocstrings ``extensions:``) for the reStructuredText that
the docstrings use inside otherwise Markdown-compatible Google-style text.

* Simple tables (``====  ====`` borders, with or without a header row; a row whose first cell
  is empty continues the row above) become Markdown tables.
* A paragraph ending in ``::`` before an indented literal block ends in ``:`` instead (the
  indented block already renders as code).
"""

from __future__ import annotations

import re

import griffe

BORDER = re.compile(r"^(?P<indent> *)=+( +=+)+ *$")


def _spans(border: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"=+", border)]


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    starts = [s for s, _ in spans] + [None]
    return [line[starts[i]:starts[i + 1]].strip() for i in range(len(spans))]


def _rows(lines: list[str], spans: list[tuple[int, int]]) -> list[list[str]]:
    rows: list[list[str]] = []
    for line in lines:
        if not line.strip():
            continue
        cells = _cells(line, spans)
        if rows and not cells[0]:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    return rows


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def simple_tables_to_markdown(text: str) -> str:
    """Rewrites every reStructuredText simple table in ``text`` as a Markdown table.

    Args:
      text: a docstring.

    Returns:
      ``text`` with each table replaced (other lines unchanged).
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = BORDER.match(lines[i])
        borders = [j for j in range(i + 1, len(lines)) if BORDER.match(lines[j])][:2] if m else []
        if not borders:
            out.append(lines[i])
            i += 1
            continue
        spans = _spans(lines[i])
        j = borders[0]
        after = lines[j + 1] if j + 1 < len(lines) else ""
        if after.strip() and len(borders) == 2:  # a header row between the first two borders
            header, body, end = _rows(lines[i + 1:j], spans), lines[j + 1:borders[1]], borders[1]
        else:
            header, body, end = [], lines[i + 1:j], j
        head = header[0] if header else [""] * len(spans)
        indent = m.group("indent")
        out.append(indent + _markdown_row(head))
        out.append(indent + "|" + "---|" * len(spans))
        out.extend(indent + _markdown_row(r) for r in _rows(body, spans))
        i = end + 1
    return "\n".join(out)


def literal_markers_to_markdown(text: str) -> str:
    """``text::`` before an indented block -> ``text:`` (`` ::`` alone is dropped).

    Args:
      text: a docstring.

    Returns:
      ``text`` with the reStructuredText literal-block markers removed.
    """
    text = re.sub(r" ::$", "", text, flags=re.M)
    return re.sub(r"(?<=\S)::$", ":", text, flags=re.M)


class RstToMarkdown(griffe.Extension):
    """Applies both rewrites to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            value = simple_tables_to_markdown(obj.docstring.value)
            obj.docstring.value = literal_markers_to_markdown(value)
