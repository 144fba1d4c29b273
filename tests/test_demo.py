"""`make demo`, shortened: the Makefile's own recipe (train --preset demo, then sample
--report-words) run for a few steps, and the word check of its sample recomputed from the
printed text. The full demo's loss, time and sample are in the README."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from unitscale_jax import data

ROOT = Path(__file__).resolve().parents[1]
REPORT = re.compile(r"^\[words found in the training text: (\d+) of (\d+) \((\d+)%\)\]$")


def _demo_commands(run_dir: Path, demo_args: str) -> list[list[str]]:
    """The `demo` recipe of the Makefile, with its variables filled in."""
    lines, inside = [], False
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("demo:"):
            inside = True
        elif inside and line.startswith("\t"):
            lines.append(line.strip())
        elif inside:
            break
    assert len(lines) == 2, lines
    bin_dir = str(Path(sys.executable).parent)
    subst = {"$(BIN)": bin_dir, "$(DEMO_RUN)": str(run_dir), "$(DEMO_ARGS)": demo_args}
    out = []
    for line in lines:
        for k, v in subst.items():
            line = line.replace(k, v)
        assert "$(" not in line, line
        out.append(shlex.split(line))
    return out


def test_shortened_demo_prints_a_sample_and_its_word_check(tmp_path):
    train_cmd, sample_cmd = _demo_commands(
        tmp_path / "demo", "--steps 40 --eval-every 20 --eval-batches 2 --no-progress")
    assert "--preset" in train_cmd and train_cmd[train_cmd.index("--preset") + 1] == "demo"
    trained = subprocess.run(train_cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "validation loss" in trained.stdout + trained.stderr
    sampled = subprocess.run(sample_cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    lines = sampled.stdout.rstrip("\n").split("\n")
    match = REPORT.match(lines[-1])
    assert match, lines[-3:]
    text = "\n".join(lines[:-1])
    assert text.startswith("The ")
    continuation = text[len("The "):]
    vocabulary = data.word_set(data.resolve_source(None).documents("train"))
    known, total = data.known_words(continuation, vocabulary)
    assert (known, total) == (int(match[1]), int(match[2]))
    assert total > 0 and int(match[3]) == round(100 * known / total)
    # the demo's bar: at least half the words are real; a 40-step model already gets part way
    assert 0 < known <= total
