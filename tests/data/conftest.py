"""Fixtures for the data tests: tiny text corpora in tmp_path."""

import pytest

LINE = "Ünïcödé line {i}: the quick brown fox jumps over the lazy dog — ✓ 日本語 {i}\n"


def write_corpus(directory, n_files=3, lines_per_file=40):
    """Writes n_files small UTF-8 files (non-ASCII included); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(n_files):
        text = "".join(LINE.format(i=f * 1000 + i) for i in range(lines_per_file))
        path = directory / f"part{f}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture
def corpus_files(tmp_path):
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "tfds")
