"""Small labelled files for the fine-tuning tests, and the flags of a tiny encoder."""

import random
from pathlib import Path

from unitscale_jax.cli import main

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--seq-len", "24",
        "--batch-size", "8", "--no-progress", "--no-tensorboard", "--no-plot"]
"""A model small enough that a fine-tuning step takes milliseconds on one CPU core."""

_POS, _NEG = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
_FILLER = ["the", "film", "was", "a", "plot", "it"]


def write_classification(root: Path, *, n_train: int = 64, n_dev: int = 24, seed: int = 0,
                         test: bool = True) -> Path:
    """train/dev(/test).tsv of an easy sentiment task (a positive or negative word) in
    ``root``; returns ``root``."""
    r = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "dev": n_dev, **({"test": n_dev} if test else {})}
    for name, n in sizes.items():
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = r.randint(0, 1)
            words = [r.choice(_FILLER) for _ in range(r.randint(1, 3))]
            words.insert(r.randint(0, len(words)), r.choice(_POS if label else _NEG))
            lines.append(f"{' '.join(words)}\t{label}")
        (root / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_tagging(root: Path, *, n_train: int = 48, n_dev: int = 16, seed: int = 1) -> Path:
    """train/dev.conll (tab-separated, IOB2, PER and LOC entities, -DOCSTART- lines)."""
    r = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        lines = ["-DOCSTART-\tO", ""]
        for _ in range(n):
            for _ in range(r.randint(2, 5)):
                k = r.random()
                if k < 0.25:
                    lines.append(f"{r.choice(['ann', 'bob', 'cy'])}\tB-PER")
                elif k < 0.4:
                    lines += [f"{r.choice(['rome', 'oslo'])}\tB-LOC", "city\tI-LOC"]
                else:
                    lines.append(f"{r.choice(['went', 'to', 'saw', 'and'])}\tO")
            lines.append("")
        (root / f"{name}.conll").write_text("\n".join(lines) + "\n")
    return root


def fails(capsys, argv, *needles) -> str:
    """Runs ``unitscale-jax ARGV`` in-process and asserts it failed with exit 2 and one error
    line (no traceback) holding every needle; returns that line."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
