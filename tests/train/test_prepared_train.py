"""``unitscale-jax prepare`` then ``train --data prepared:DIR``: the counts come from the
manifest, the run resumes (data position included), and another tokenizer is refused."""

import json

from tests.data.conftest import write_corpus
from tests.train.conftest import SMALL
from unitscale_jax import data
from unitscale_jax.cli import main


def test_prepare_then_train_and_resume(tmp_path, capsys):
    files = write_corpus(tmp_path / "corpus", n_files=3, lines_per_file=400)
    out = tmp_path / "prepared"
    assert main(["prepare", "--data", str(tmp_path / "corpus" / "*.txt"), "--out", str(out),
                 "--workers", "1", "--piece-mb", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert f"unitscale-jax train --data prepared:{out} --tokenizer bytes" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["pieces"]) > len(files)  # each file -> several pieces, shards
    train = manifest["splits"]["train"]

    run = tmp_path / "run"
    args = ["train", *SMALL, "--data", f"prepared:{out}", "--run-dir", str(run),
            "--eval-every", "4", "--checkpoint-every", "4"]
    assert main([*args, "--steps", "4"]) == 0
    log = capsys.readouterr().out
    assert (f"data: prepared:{out}, train {train['records']} documents "
            f"({train['bytes'] / 1e6:.2f} MB, {train['tokens']:,} tokens)") in log, log
    first = json.loads((run / "summary.json").read_text())
    assert first["start_step"] == 0 and first["steps"] == 4
    assert 0 < first["final_val_loss"] < 6  # finite; ln 260 = 5.56 at initialisation
    assert main([*args, "--steps", "6"]) == 0
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["start_step"] == 4 and resumed["steps"] == 6
    assert resumed["final_bits_per_byte"] is not None and resumed["final_bits_per_byte"] > 0

    tok = tmp_path / "tok.json"
    data.train_tokenizer([str(f) for f in files], kind="bpe", vocab_size=300, out_path=tok)
    rc = main(["train", *SMALL, "--data", f"prepared:{out}", "--tokenizer", f"hf:{tok}",
               "--run-dir", str(tmp_path / "other"), "--steps", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert (f"unitscale-jax: error: --data prepared:{out}: {out} was tokenized with bytes "
            f"(vocabulary 260), but this run's tokenizer is hf:{tok}") in err, err
    assert "pass --tokenizer bytes" in err
    assert not (tmp_path / "other").exists()
