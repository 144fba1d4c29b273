"""``unitscale-jax sample`` for encoder (fill-mask) and encoder-decoder (span infilling) runs.

The runs are the tiny 50-step ones of ``conftest.trained_run`` (shared with
``test_train_models.py``); decoder sampling is tested in ``test_train_e2e.py``.
"""

import ast
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.test_bad_input import _one_line
from unitscale_jax import nn
from unitscale_jax.cli import main
from unitscale_jax.data import ByteTokenizer
from unitscale_jax.train.sample import (
    fill_mask,
    generate_seq2seq,
    generate_text,
    load_run,
    render,
    seq2seq_target_limit,
)

PAD, BOS, EOS, MASK_ID = 256, 257, 258, 259  # ByteTokenizer's special ids
SEQ_LEN = 32
FILL_PROMPT = "Th<mask> end of th<mask> file"
SPAN_PROMPT = "The <mask> of the <mask>."


def _run_dir(trained_run, kind):
    return trained_run(kind)[0].training.run_dir


def _row(prompt, head=EOS):
    """The training row of a byte-level prompt, built here independently of sample.py."""
    ids = []
    for i, piece in enumerate(prompt.split("<mask>")):
        ids += ([MASK_ID] if i else []) + list(piece.encode())
    row = np.full((1, SEQ_LEN), PAD, np.int32)
    row[0, :len(ids) + 2] = [head, *ids, EOS]
    return row, row != PAD


def _fill(prompt, fills):
    pieces = prompt.split("<mask>")
    return pieces[0] + "".join(f + p for f, p in zip(fills, pieces[1:]))


def _with_loss_mult(model, mult):
    model.config = model.config.replace(loss_mult=mult)
    return model


def test_fill_mask_prints_sorted_top_k_and_the_filled_prompt(trained_run, capsys):
    run_dir = _run_dir(trained_run, "encoder")
    capsys.readouterr()
    rc = main(["sample", "--run-dir", run_dir, "--prompt", FILL_PROMPT, "--top-k", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "step 50" in err
    lines = out.rstrip("\n").split("\n")
    assert len(lines) == 2 * (1 + 4) + 1, out
    best = []
    for m in range(2):
        assert lines[5 * m] == f"mask {m + 1} of 2:"
        rows = [re.fullmatch(r"  (\d\.\d{4})  (.+)", x) for x in lines[5 * m + 1:5 * m + 5]]
        assert all(rows), lines
        probs = [float(r.group(1)) for r in rows]
        texts = [ast.literal_eval(r.group(2)) for r in rows]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-4
        assert len(set(texts)) == 4
        assert probs[0] > 5 / 260, probs  # 50 steps learn far more than a uniform guess
        best.append(texts[0])
    assert lines[-1] == _fill(FILL_PROMPT, best)
    assert "<mask>" not in lines[-1]

    rc = main(["sample", "--run-dir", run_dir, "--prompt", "<mask>"])  # default top-k 5
    out, _ = capsys.readouterr()
    assert rc == 0 and len(out.rstrip("\n").split("\n")) == 1 + 5 + 1


def test_fill_mask_probabilities_are_the_softmax_of_the_logits(trained_run):
    cfg, tokenizer, model, step = load_run(_run_dir(trained_run, "encoder"),
                                                     log=lambda m: None)
    assert step == 50 and cfg.data.packing == "pack"
    row, valid = _row(FILL_PROMPT)
    for mult in (1.0, 0.5):  # the model's distribution is softmax(loss_mult * logits)
        model = _with_loss_mult(model, mult)
        got = fill_mask(model, tokenizer, FILL_PROMPT, seq_len=SEQ_LEN, top_k=6)
        np.testing.assert_array_equal(got.ids, row[0])
        probs = np.asarray(jax.nn.softmax(mult * model(jnp.asarray(row), mask=valid), -1))[0]
        assert got.positions == [3, 14] == list(np.flatnonzero(row[0] == MASK_ID))
        for pos, cands in zip(got.positions, got.candidates):
            ids = [i for i, _, _ in cands]
            np.testing.assert_allclose([p for _, _, p in cands], probs[pos, ids], rtol=1e-5)
            np.testing.assert_allclose(probs[pos, ids], np.sort(probs[pos])[::-1][:6], rtol=1e-5)
            names = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", MASK_ID: "<mask>"}
            assert [t for _, t, _ in cands] == [
                names.get(i) or bytes([i]).decode("utf-8", "replace") for i in ids]
    crop = fill_mask(model, tokenizer, FILL_PROMPT, seq_len=SEQ_LEN, packing="crop")
    np.testing.assert_array_equal(crop.ids, _row(FILL_PROMPT, head=BOS)[0][0])


def test_span_infilling_prints_the_output_and_the_filled_prompt(trained_run, capsys):
    run_dir = _run_dir(trained_run, "encdec")
    capsys.readouterr()
    rc = main(["sample", "--run-dir", run_dir, "--prompt", SPAN_PROMPT, "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "step 50" in err
    output_line, filled = out.rstrip("\n").split("\n")
    m = re.fullmatch(r"output: ('.*') \(log p (-?\d+\.\d{3})(, no end token in \d+)?\)",
                     output_line)
    assert m, output_line
    output = ast.literal_eval(m.group(1))
    assert output.startswith("<mask>")  # learned: every target starts with the sentinel
    assert float(m.group(2)) <= 0
    spans = output.split("<mask>")[1:]
    assert filled == _fill(SPAN_PROMPT, spans[:2] + ["<mask>"] * (2 - len(spans)))

    argv = ["sample", "--run-dir", run_dir, "--prompt", SPAN_PROMPT, "--temperature", "1.5",
            "--num-samples", "3", "--seed", "3"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert [x for x in lines if x.startswith("---")] == [f"--- sample {i}" for i in (1, 2, 3)]
    assert len(lines) == 9 and all(x.startswith("output: '") for x in lines[1::3])


def test_span_infilling_log_probs_equal_the_full_forward(trained_run):
    cfg, tokenizer, model, _ = load_run(_run_dir(trained_run, "encdec"),
                                                  log=lambda m: None)
    target_len = 8  # seq2seq_target_len(32, 0.15, 3): 5 noise tokens, 2 spans, eos
    assert seq2seq_target_limit(model, cfg) == target_len
    src, src_mask = _row(SPAN_PROMPT)
    full = jax.jit(lambda s, t, m: model(s, t, src_mask=m))
    for mult, temperature in ((1.0, 0.0), (2.0, 1.5)):
        model = _with_loss_mult(model, mult)
        got = generate_seq2seq(model, tokenizer, SPAN_PROMPT, seq_len=SEQ_LEN,
                                         target_len=target_len, temperature=temperature,
                                         top_k=None, num_samples=4, seed=1)
        for s in got:
            targets = [*s.ids.tolist(), *([EOS] if s.finished else [])]
            assert len(targets) <= target_len and EOS not in s.ids
            dec_in = np.full((1, target_len), PAD, np.int32)
            dec_in[0, :len(targets)] = [BOS, *targets][:len(targets)]
            logits = np.asarray(full(jnp.asarray(src), jnp.asarray(dec_in), src_mask))[0]
            log_p = np.asarray(jax.nn.log_softmax(mult * logits, -1))
            n = len(targets)
            np.testing.assert_allclose(s.log_prob, np.sum(log_p[np.arange(n), targets]),
                                       rtol=1e-4, atol=1e-4)
            if temperature == 0:
                np.testing.assert_array_equal(np.argmax(logits[:n], -1), targets)
            assert s.output == render(tokenizer, s.ids)
        if temperature > 0:
            assert len({tuple(s.ids) for s in got}) > 1
    # temperature is relative to the trained distribution: loss_mult 2 at 1.5 = 1 at 0.75
    same = generate_seq2seq(_with_loss_mult(model, 1.0), tokenizer, SPAN_PROMPT, seq_len=SEQ_LEN,
                            target_len=target_len, temperature=0.75, top_k=None, num_samples=4,
                            seed=1)
    assert [s.ids.tolist() for s in same] == [s.ids.tolist() for s in got]


def test_decoder_temperature_is_relative_to_the_trained_distribution():
    model = nn.TransformerDecoder(vocab_size=260, d_model=32, n_layers=1, n_heads=2,
                                  max_seq_len=SEQ_LEN, rngs=nnx.Rngs(0))
    model.eval()
    tok = ByteTokenizer()

    def texts(mult, temperature):
        return generate_text(_with_loss_mult(model, mult), tok, "The ", max_new_tokens=12,
                             seq_len=SEQ_LEN, temperature=temperature, top_k=None, seed=4,
                             num_samples=3)

    hot = texts(4.0, 2.0)
    assert len(set(hot)) == 3 and hot == texts(1.0, 0.5)


@pytest.mark.parametrize("kind, argv, needles", [
    ("encoder", ["--prompt", "no mask here"], ["has no <mask>", "fill-mask"]),
    ("encoder", ["--prompt", "<mask>" + "x" * 30], ["31 tokens", "--seq-len 32", "at most 30"]),
    ("encoder", ["--prompt", "<mask>" * 31], ["31 tokens", "at most 30"]),
    ("encoder", ["--prompt", "a<mask>", "--temperature", "0"],
     ["--temperature does not apply to encoder runs", "--top-k"]),
    ("encoder", ["--prompt", "a<mask>", "--top-k", "0"], ["--top-k must be in [1, 260]"]),
    ("encoder", ["--prompt", "a<mask>", "--top-k", "none"], ["got none"]),
    ("encdec", ["--prompt", "no mask here"], ["has no <mask>", "span infilling"]),
    ("encdec", ["--prompt", "a<mask><mask>b"], ["two <mask>s in a row"]),
    ("encdec", ["--prompt", "a<mask>b<mask>c<mask>d<mask>e"], ["4 <mask>s", "at most 3 spans"]),
    ("encdec", ["--prompt", "a<mask>" + "x" * 30], ["32 tokens", "at most 30"]),
    ("encdec", ["--prompt", "a<mask>", "--max-new-tokens", "9"], ["at most 8 tokens"]),
    ("encdec", ["--prompt", "a<mask>", "--temperature", "-1"], ["--temperature must be >= 0"]),
])
def test_bad_prompts_and_options(trained_run, capsys, kind, argv, needles):
    run_dir = _run_dir(trained_run, kind)
    capsys.readouterr()
    rc = main(["sample", "--run-dir", run_dir, *argv])
    _one_line(capsys, rc, *needles)
