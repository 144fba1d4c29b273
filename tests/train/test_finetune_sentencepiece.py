"""``finetune --tokenizer sentencepiece:M.model``: a SentencePiece model (trained here on the
task's own sentences, no download) drives sentence and token classification end to end; for
tagging, each word's tag sits on its first piece and the predictions map back to words."""

import json

import numpy as np
import sentencepiece as spm  # a dev dependency (pyproject): trains the model locally

from tests.train.finetune_helpers import TINY, write_classification, write_tagging
from unitscale_jax.cli import main
from unitscale_jax.data import get_tokenizer
from unitscale_jax.data.tokenizers import encode_words


def _train_spm(texts, prefix, vocab_size=60) -> str:
    corpus = f"{prefix}.txt"
    with open(corpus, "w") as f:
        f.write("\n".join(texts) + "\n")
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0,
                                   minloglevel=2, hard_vocab_limit=False)
    return f"sentencepiece:{prefix}.model"


def _words(path) -> list[list[str]]:
    sents, cur = [], []
    for line in open(path):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if cur:
                sents.append(cur)
            cur = []
        else:
            cur.append(line.split("\t")[0])
    return sents + ([cur] if cur else [])


def test_classify_with_a_sentencepiece_model(tmp_path, capsys):
    data = write_classification(tmp_path / "sst", test=False)
    texts = [ln.split("\t")[0] for ln in (data / "train.tsv").read_text().splitlines()[1:]]
    spec = _train_spm(texts, str(tmp_path / "sp"))
    tok = get_tokenizer(spec)
    assert tok.decode(tok.encode("the film was good")) == "the film was good"
    run = tmp_path / "ft"
    assert main(["finetune", "--task", "classify", "--data", str(data), "--tokenizer", spec,
                 *TINY, "--steps", "4", "--eval-every", "2", "--run-dir", str(run)]) == 0
    report = json.loads((run / "dev_report.json").read_text())
    assert report["n_examples"] == 24 and 0.0 <= report["accuracy"] <= 1.0
    assert json.loads((run / "config.json").read_text())["data"]["tokenizer"] == spec


def test_tag_with_a_sentencepiece_model(tmp_path, capsys):
    data = write_tagging(tmp_path / "ner")
    sents = _words(data / "train.conll")
    spec = _train_spm([" ".join(s) for s in sents], str(tmp_path / "sp"), vocab_size=40)
    tok = get_tokenizer(spec)
    pieces = encode_words(tok, sents[0])
    assert len(pieces) == len(sents[0]) and all(len(p) >= 1 for p in pieces)
    assert "".join(tok.decode(p) for p in pieces) == "".join(sents[0])
    run = tmp_path / "ft"
    assert main(["finetune", "--task", "tag", "--data", str(data), "--tokenizer", spec, *TINY,
                 "--steps", "4", "--eval-every", "2", "--run-dir", str(run)]) == 0
    out = tmp_path / "pred.conll"
    assert main(["predict", "--run-dir", str(run), "--data", str(data / "dev.conll"), "--out",
                 str(out)]) == 0
    src = (data / "dev.conll").read_text().splitlines()
    got = out.read_text().splitlines()
    assert len(got) == len(src)  # one tag per word line; blank and -DOCSTART- lines kept
    for a, b in zip(src, got):
        if a.strip() and not a.startswith("-DOCSTART-"):
            assert b.startswith(a + "\t") and b.split("\t")[-1] in ("O", "B-PER", "B-LOC",
                                                                     "I-PER", "I-LOC")
        else:
            assert b == a
    assert np.isfinite(json.loads((run / "dev_report.json").read_text())["f1"])
