"""``unitscale-jax sample``: what a trained run predicts (its latest valid checkpoint).

One command for every model kind ``unitscale-jax train --model ...`` trains:

* ``decoder``: the prompt is continued. It is encoded after an end-of-document token (the
  separator the model saw between packed documents in training), so an empty prompt starts a
  new document. Generation uses the decoder's KV-cache ``generate`` with u-muP's attention
  scaling at the training sequence length; continuations longer than the context slide a
  window: each further chunk is generated from the last ``seq_len / 2`` tokens.
* ``encoder`` (masked LM): fill-mask. Each ``<mask>`` in the prompt is one masked token (the
  tokenizer's ``mask_id``; one byte with the byte tokenizer); the report lists, for each mask,
  the ``top_k`` most likely tokens with their probabilities, then the prompt filled with the
  best ones.
* ``encdec`` (span corruption): the prompt, with ``<mask>`` marking each corrupted span (one
  sentinel per span, as ``data.objectives.span_corruption`` makes), is the encoder input; the
  decoder generates ``<mask> span <mask> span ... <eos>`` (greedy or temperature / top-k, as
  the decoder does) with the KV-cache ``TransformerEncoderDecoder.generate``; the report shows
  that output and the prompt with the spans filled in.

Inputs are built as the training rows were: the prompt is one document, ``eos`` + text +
``eos`` for packed runs (``--packing pack``: documents joined by ``eos``) and ``bos`` + text +
``eos`` for cropped ones, padded to ``seq_len`` with ``pad_id`` and a padding mask, so the
attention scaling (which depends on the row length) and the masks match training; the
seq2seq decoder uses the training target length (``data.seq2seq_target_len``) for its scaling
rule and as the most tokens it may generate. Probabilities and temperatures refer to the
distribution the model was trained on, ``softmax(loss_mult * logits)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitscale_jax import data as datalib
from unitscale_jax.train import build
from unitscale_jax.train.checkpoint import Checkpoints, failure
from unitscale_jax.train.config import Config, resolve
from unitscale_jax.train.data import load_data
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.lora_base import LoRABase, restore_into
from unitscale_jax.train.run_dir import read_run_config
from unitscale_jax.train.tasks import TASKS
from unitscale_jax.train.trainer import init_state_fn

MASK = "<mask>"
"""The prompt's marker of a masked token (encoder) or a corrupted span (encdec)."""

DEFAULTS: dict[str, dict[str, Any]] = {
    "decoder": {"max_new_tokens": 200, "temperature": 0.8, "top_k": 40, "seed": 0,
                "num_samples": 1, "report_words": False},
    "encoder": {"top_k": 5},
    "encdec": {"max_new_tokens": None, "temperature": 0.8, "top_k": 40, "seed": 0,
               "num_samples": 1},
}
"""The sampling options of each model kind and their defaults (``encdec``'s
``max_new_tokens``: the training target length)."""


def restore_params(run_dir: str | Path, cfg: Config, *, step: Optional[int] = None,
                   log=print, flag: str = "--run-dir"):
    """The parameters of a run's checkpoint (any model kind).

    Args:
      run_dir: the run directory.
      cfg: its config (``run_dir.read_run_config``; resolved here).
      step: the checkpoint to load; default the newest one that verifies.

    Returns:
      ``(tokenizer, abstract_model, params, step)``: ``params`` is the pure dict of the
      model's ``nnx.Param`` state, ``abstract_model`` the model with abstract arrays (its
      graph and ``nn.param_info``).

    Raises:
      UsageError: no (valid) checkpoint, no such step, or an unusable tokenizer.
    """
    run_dir, cfg = Path(run_dir), resolve(cfg)
    try:
        tokenizer = datalib.get_tokenizer(cfg.data.tokenizer)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise UsageError(f"tokenizer of {run_dir}: {e}") from None
    abstract_model = nnx.eval_shape(lambda: build.build_model(cfg, tokenizer.vocab_size))
    tx, _ = build.model_optimizer(cfg, abstract_model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(init_state_fn(cfg, tokenizer.vocab_size, tx)))
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise UsageError(f"{flag} {run_dir}: no checkpoints directory; the run saved none.")
    notes: list[str] = []  # reported when a checkpoint loads; else the error names them
    ckpt = Checkpoints(ckpt_dir, async_save=False, log=notes.append, read_only=True)
    base = LoRABase.read(run_dir) if build.uses_lora(cfg) else None  # adapter-only checkpoints
    try:
        if step is not None:
            if step not in ckpt.steps():
                raise UsageError(f"--step {step}: no checkpoint at that step in {ckpt_dir} "
                                 f"(have {ckpt.steps()}).")
            base_arrays = base.load(run_dir, log) if base is not None else None
            try:
                state, _ = restore_into(base, run_dir, target, lambda t: ckpt.restore(step, t),
                                        log, arrays=base_arrays, ckpt=ckpt, step=step)
            except UsageError:
                raise
            except Exception as e:  # orbax raises many kinds for a damaged checkpoint
                raise UsageError(f"--step {step}: the checkpoint in {ckpt_dir / str(step)} is "
                                 f"corrupt or incomplete ({failure(e)}); pick another --step "
                                 "or leave it out for the latest valid one.") from None
            found = (step, state, None)
        else:
            found = restore_into(base, run_dir, target, ckpt.restore_latest, log, ckpt=ckpt)
    finally:
        ckpt.close()
    if found is None:
        why = f" (skipped {', '.join(ckpt.skipped)})" if ckpt.skipped else ""
        raise UsageError(f"{flag} {run_dir}: no complete checkpoint there{why}; resume the run "
                         "with the same train command to save one.")
    for note in notes:
        log(note)
    return tokenizer, abstract_model, found[1]["params"], found[0]


def load_run(run_dir: str | Path, *, step: Optional[int] = None, log=print,
             kind: Optional[str] = None, purpose: str = "sample", flag: str = "--run-dir"):
    """The config, tokenizer and model (parameters restored, eval mode) of a pretraining run.

    Args:
      run_dir: the run directory.
      step: the checkpoint to load; default the newest one that verifies.
      log: where progress messages go.
      kind: the ``--model`` the run must have trained; None: any kind.
      purpose: how the caller names itself in messages.
      flag: how the caller names the directory in messages.

    Returns:
      ``(config, tokenizer, model, step)``.

    Raises:
      UsageError: no run, another model kind or a fine-tuning run, no (valid) checkpoint, or
        no such step.
    """
    cfg = resolve(read_run_config(run_dir, flag))
    if cfg.finetune is not None or cfg.model.kind not in TASKS or kind not in (None,
                                                                                cfg.model.kind):
        want = f"a {kind}" if kind else "a pretraining"
        what = (f"fine-tuned a {cfg.finetune.task} model" if cfg.finetune is not None else
                f"trained a {cfg.model.kind}")
        raise UsageError(f"{purpose} needs {want} run; {flag} {run_dir} {what} (train one "
                         f"with 'unitscale-jax train --model {kind or 'decoder'}').")
    tokenizer, abstract_model, params, at = restore_params(run_dir, cfg, step=step, log=log,
                                                           flag=flag)
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    model = nnx.merge(graphdef, params)
    model.eval()
    return cfg, tokenizer, model, at


def _check_sampling(tokenizer, *, temperature: float, top_k: Optional[int],
                    max_new_tokens: int, num_samples: int) -> None:
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {temperature}.")
    if top_k is not None and not 1 <= top_k <= tokenizer.vocab_size:
        raise UsageError(f"--top-k must be in [1, {tokenizer.vocab_size}] or none, got {top_k}.")
    if num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {num_samples}.")


def _model_temperature(model, temperature: float) -> float:
    """The temperature on the raw logits that gives ``temperature`` on the trained
    distribution ``softmax(loss_mult * logits)`` (greedy stays greedy)."""
    return temperature / model.config.loss_mult


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int, seq_len: int,
                  temperature: float = 0.8, top_k: Optional[int] = 40, seed: int = 0,
                  num_samples: int = 1) -> list[str]:
    """Continuations of ``prompt`` by a decoder (decoded, prompt excluded), ``num_samples``
    of them."""
    _check_sampling(tokenizer, temperature=temperature, top_k=top_k,
                    max_new_tokens=max_new_tokens, num_samples=num_samples)
    ids = np.concatenate([[tokenizer.eos_id], tokenizer.encode(prompt)]).astype(np.int32)
    ids = ids[-(seq_len - 1):]
    tokens = jnp.asarray(np.tile(ids[None], (num_samples, 1)))
    key = jax.random.key(seed)
    window = max(seq_len // 2, 1)
    remaining = max_new_tokens
    out = []
    while remaining > 0:
        ctx = tokens if not out else jnp.concatenate([tokens] + out, axis=1)[:, -window:]
        n = min(remaining, seq_len - ctx.shape[1])
        key, sub = jax.random.split(key)
        full = model.generate(ctx, n, rng=sub if temperature > 0 else None,
                              temperature=_model_temperature(model, temperature),
                              top_k=top_k if temperature > 0 else None, scale_seq_len=seq_len)
        out.append(full[:, ctx.shape[1]:])
        remaining -= n
    new = np.asarray(jnp.concatenate(out, axis=1))
    return [tokenizer.decode(row) for row in new]


def encode_prompt(tokenizer, prompt: str) -> np.ndarray:
    """The ids of ``prompt`` with ``tokenizer.mask_id`` at each ``<mask>`` (int32, 1-D); the
    text between masks is encoded piece by piece."""
    pieces = [tokenizer.encode(p) for p in prompt.split(MASK)]
    out = [pieces[0]]
    for p in pieces[1:]:
        out += [np.asarray([tokenizer.mask_id], np.int32), p]
    return np.concatenate(out).astype(np.int32)


def document_row(tokenizer, ids: np.ndarray, *, seq_len: int, packing: str,
                 what: str) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` as one document in a training row: ``eos`` + ids + ``eos`` (``packing ==
    "pack"``, where ``eos`` separates documents) or ``bos`` + ids + ``eos`` (``"crop"``),
    padded to ``seq_len`` with ``pad_id``.

    Args:
      what: how the message of a too-long prompt names it.

    Returns:
      ``(ids [1, seq_len] int32, valid [1, seq_len] bool)`` (valid: not padding).

    Raises:
      UsageError: the document does not fit in ``seq_len`` tokens.
    """
    head = tokenizer.bos_id if packing == "crop" else tokenizer.eos_id
    if len(ids) + 2 > seq_len:
        raise UsageError(f"--prompt is {len(ids)} tokens ({what}); the run's rows hold "
                         f"--seq-len {seq_len}, so at most {seq_len - 2} with the start and end "
                         "tokens: shorten it.")
    row = np.full((1, seq_len), tokenizer.pad_id, np.int32)
    row[0, :len(ids) + 2] = np.concatenate([[head], ids, [tokenizer.eos_id]])
    return row, row != tokenizer.pad_id


def render(tokenizer, ids) -> str:
    """``ids`` as text, with special ids shown by name (``<mask>``, ``<eos>``, ...)."""
    names = {tokenizer.pad_id: "<pad>", tokenizer.bos_id: "<bos>", tokenizer.eos_id: "<eos>",
             tokenizer.mask_id: MASK}
    out, run = [], []
    for i in np.asarray(ids).reshape(-1).tolist():
        if i in names:
            out += [tokenizer.decode(run), names[i]]
            run = []
        else:
            run.append(i)
    return "".join(out + [tokenizer.decode(run)])


def _count_masks(prompt: str, ids: np.ndarray, tokenizer, kind: str, example: str) -> int:
    n = int(np.sum(ids == tokenizer.mask_id))
    if n == 0:
        raise UsageError(f"--prompt has no {MASK}: {kind} needs at least one (e.g. --prompt "
                         f"{example!r}).")
    if n != prompt.count(MASK):  # the text itself encoded to the mask id
        raise UsageError(f"--prompt encodes to {n} mask tokens but has {prompt.count(MASK)} "
                         f"{MASK}; write each masked token as {MASK}.")
    return n


@dataclasses.dataclass(frozen=True)
class FillMask:
    """Fill-mask predictions of an encoder.

    Attributes:
      ids: the encoder's input row ``[seq_len]`` (int32).
      positions: the row positions of the masks, in order.
      candidates: per mask, the ``top_k`` ``(token id, text, probability)``, most likely first.
      filled: the prompt with each mask replaced by its most likely token.
    """

    ids: np.ndarray
    positions: list[int]
    candidates: list[list[tuple[int, str, float]]]
    filled: str

    def report(self) -> str:
        """Lines ``mask i of n:``, then ``  probability  'token'`` per candidate; the filled
        prompt last."""
        lines = []
        for i, cands in enumerate(self.candidates):
            lines.append(f"mask {i + 1} of {len(self.candidates)}:")
            lines += [f"  {p:.4f}  {text!r}" for _, text, p in cands]
        return "\n".join(lines + [self.filled])


@nnx.jit
def _mlm_probabilities(model, ids, valid):
    logits = model(ids, mask=valid).astype(jnp.float32)
    return jax.nn.softmax(model.config.loss_mult * logits, axis=-1)


def fill_mask(model, tokenizer, prompt: str, *, seq_len: int, packing: str = "pack",
              top_k: int = 5) -> FillMask:
    """The ``top_k`` most likely tokens at each ``<mask>`` of ``prompt`` (an encoder run).

    Args:
      model: a ``TransformerEncoder`` with its MLM head, in eval mode.
      tokenizer: the run's tokenizer.
      prompt: text with one ``<mask>`` per masked token.
      seq_len: the run's ``--seq-len`` (rows are padded to it, as in training).
      packing: the run's ``--packing``.
      top_k: candidates per mask.

    Raises:
      UsageError: no mask, a bad ``top_k``, or a prompt longer than a row.
    """
    if top_k is None or not 1 <= top_k <= tokenizer.vocab_size:
        raise UsageError(f"--top-k must be in [1, {tokenizer.vocab_size}] for fill-mask (the "
                         f"candidates shown per mask), got {'none' if top_k is None else top_k}.")
    ids = encode_prompt(tokenizer, prompt)
    _count_masks(prompt, ids, tokenizer, "fill-mask", "Th<mask> end")
    row, valid = document_row(tokenizer, ids, seq_len=seq_len, packing=packing,
                              what=f"each {MASK} one")
    probs = np.asarray(_mlm_probabilities(model, jnp.asarray(row), jnp.asarray(valid)))[0]
    positions = [int(p) for p in np.flatnonzero(row[0] == tokenizer.mask_id)]
    candidates = []
    filled = row[0].copy()
    for pos in positions:
        best = np.argsort(-probs[pos], kind="stable")[:top_k]
        candidates.append([(int(i), render(tokenizer, [i]), float(probs[pos, i])) for i in best])
        filled[pos] = best[0]
    return FillMask(ids=row[0], positions=positions, candidates=candidates,
                    filled=render(tokenizer, filled[1:len(ids) + 1]))


@dataclasses.dataclass(frozen=True)
class Seq2SeqSample:
    """One decoder output of an encoder-decoder.

    Attributes:
      ids: the generated ids after the start token, up to (not including) the first ``eos``.
      output: ``ids`` as text, sentinels shown as ``<mask>``.
      spans: the text after each sentinel, in order.
      filled: the prompt with its ``<mask>``s replaced by ``spans`` (a mask with no span left
        stays ``<mask>``).
      finished: the decoder produced ``eos``.
      log_prob: the natural-log probability of ``ids`` (and the ``eos``, when finished) under
        the model, ``softmax(loss_mult * logits)``, whatever the sampling temperature.
    """

    ids: np.ndarray
    output: str
    spans: list[str]
    filled: str
    finished: bool
    log_prob: float


def seq2seq_target_limit(model, cfg: Config) -> int:
    """The most tokens the decoder of an encdec run may generate: its training target length
    (the decoder's scaling rule uses it), within ``max_seq_len``."""
    d = cfg.data
    target_len = datalib.seq2seq_target_len(d.seq_len, d.noise_density, d.mean_span)
    return min(target_len, model.config.max_seq_len - 1)


def generate_seq2seq(model, tokenizer, prompt: str, *, seq_len: int, target_len: int,
                     packing: str = "pack", max_new_tokens: Optional[int] = None,
                     temperature: float = 0.8, top_k: Optional[int] = 40, seed: int = 0,
                     num_samples: int = 1) -> list[Seq2SeqSample]:
    """Span infilling by an encoder-decoder: ``num_samples`` decoder outputs for ``prompt``.

    Args:
      model: a ``TransformerEncoderDecoder`` in eval mode.
      tokenizer: the run's tokenizer.
      prompt: the encoder input, a ``<mask>`` for each corrupted span (text between them).
      seq_len: the run's ``--seq-len`` (the encoder row length).
      target_len: the training decoder length (``seq2seq_target_limit``): the scaling rule's
        length and the most tokens generated.
      packing: the run's ``--packing``.
      max_new_tokens: tokens to generate (default ``target_len``).
      temperature: softmax temperature (0: greedy).
      top_k: sample among the k likeliest tokens (None: all).
      seed: the sampling seed.
      num_samples: independent outputs.

    Raises:
      UsageError: no mask, masks in a row, more masks than the decoder can fill, a prompt
        longer than a row, or bad sampling options.
    """
    max_new_tokens = target_len if max_new_tokens is None else max_new_tokens
    _check_sampling(tokenizer, temperature=temperature, top_k=top_k,
                    max_new_tokens=max_new_tokens, num_samples=num_samples)
    if max_new_tokens > target_len:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: the run's decoder was trained on "
                         f"targets of at most {target_len} tokens; use at most that.")
    ids = encode_prompt(tokenizer, prompt)
    n_masks = _count_masks(prompt, ids, tokenizer, "span infilling", "The <mask> of the")
    if np.any((ids[1:] == tokenizer.mask_id) & (ids[:-1] == tokenizer.mask_id)):
        raise UsageError(f"--prompt has two {MASK}s in a row: one {MASK} marks a whole span, "
                         "so put text between spans.")
    if 2 * n_masks + 1 > target_len:
        raise UsageError(f"--prompt has {n_masks} {MASK}s but the run's decoder targets hold "
                         f"{target_len} tokens, room for at most {(target_len - 1) // 2} spans "
                         "(a sentinel and a token each, then the end): use fewer.")
    row, valid = document_row(tokenizer, ids, seq_len=seq_len, packing=packing,
                              what=f"each {MASK} one")
    src = jnp.asarray(np.tile(row, (num_samples, 1)))
    src_mask = jnp.asarray(np.tile(valid, (num_samples, 1)))
    sampled = temperature > 0
    tokens, logits = model.generate(
        src, max_new_tokens, start_id=tokenizer.bos_id, src_mask=src_mask,
        rng=jax.random.key(seed) if sampled else None,
        temperature=_model_temperature(model, temperature), top_k=top_k if sampled else None,
        scale_seq_len=target_len, return_logits=True)
    log_p = jax.nn.log_softmax(model.config.loss_mult * logits.astype(jnp.float32), axis=-1)
    new = np.asarray(tokens)[:, 1:]
    token_log_p = np.asarray(jnp.take_along_axis(log_p, jnp.asarray(new)[..., None], -1))[..., 0]
    pieces = prompt.split(MASK)
    out = []
    for gen, lp in zip(new, token_log_p):
        ends = np.flatnonzero(gen == tokenizer.eos_id)
        scored = ends[0] + 1 if len(ends) else len(gen)
        gen = gen[:ends[0]] if len(ends) else gen
        at = np.flatnonzero(gen == tokenizer.mask_id)
        spans = [tokenizer.decode(gen[a + 1:b]) for a, b in zip(at, [*at[1:], len(gen)])]
        fills = spans[:n_masks] + [MASK] * (n_masks - len(spans))
        filled = pieces[0] + "".join(f + p for f, p in zip(fills, pieces[1:]))
        out.append(Seq2SeqSample(ids=gen, output=render(tokenizer, gen), spans=spans,
                                 filled=filled, finished=bool(len(ends)),
                                 log_prob=float(np.sum(lp[:scored]))))
    return out


def word_reports(cfg: Config, texts: list[str]) -> list[str]:
    """One line per text: how many of its words occur in the run's training text.

    ``data.known_words`` against ``data.word_set`` of the training split (read once for all
    texts); the demo's check that a sample reads like text (at least half its words known).
    """
    vocabulary = datalib.word_set(load_data(cfg, log=lambda _: None).source.documents("train"))
    lines = []
    for text in texts:
        known, total = datalib.known_words(text, vocabulary)
        share = f"{100 * known / total:.0f}%" if total else "-"
        lines.append(f"[words found in the training text: {known} of {total} ({share})]")
    return lines


def _options(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    allowed = DEFAULTS[kind]
    for name in given:
        if name not in allowed:
            flags = ", ".join("--" + n.replace("_", "-") for n in allowed)
            raise UsageError(f"--{name.replace('_', '-')} does not apply to {kind} runs; "
                             f"sample takes {flags} for them.")
    return {**allowed, **given}


def sample(run_dir: str | Path, prompt: str = "", *, step: Optional[int] = None, log=print,
           **options: Any) -> str:
    """Loads ``run_dir`` and returns the report of ``unitscale-jax sample`` for its kind.

    Args:
      run_dir: a run directory of any model kind.
      prompt: the text (with ``<mask>``s for encoder and encdec runs).
      step: the checkpoint (default the latest valid one).
      log: where the progress line goes.
      **options: the kind's sampling options (``DEFAULTS``): ``max_new_tokens``,
        ``temperature``, ``top_k`` (``None``: all tokens), ``seed``, ``num_samples`` for
        decoder and encdec runs; ``top_k`` (candidates per mask) for encoder runs;
        ``report_words`` (decoder): add ``word_reports`` of the continuations.

    Returns:
      decoder: each sample as prompt + continuation; encoder: ``FillMask.report()``;
      encdec: per sample, ``output: ...`` (the decoder's text) then the filled prompt. With
      ``num_samples > 1`` each sample follows a ``--- sample i`` line.

    Raises:
      UsageError: a bad run, option or prompt (one line).
    """
    cfg, tokenizer, model, at = load_run(run_dir, step=step, log=log)
    kind = cfg.model.kind
    opts = _options(kind, options)
    seq_len, packing = cfg.data.seq_len, cfg.data.packing
    if kind == "encoder":
        report = fill_mask(model, tokenizer, prompt, seq_len=seq_len, packing=packing,
                           top_k=opts["top_k"]).report()
        log(f"fill-mask by {run_dir} at step {at}")
        return report
    if kind == "decoder":
        report_words = opts.pop("report_words")
        texts = generate_text(model, tokenizer, prompt, seq_len=seq_len, **opts)
        blocks = [prompt + text for text in texts]
        if report_words:
            blocks = [f"{b}\n{line}" for b, line in zip(blocks, word_reports(cfg, texts))]
    else:
        samples = generate_seq2seq(model, tokenizer, prompt, seq_len=seq_len, packing=packing,
                                   target_len=seq2seq_target_limit(model, cfg), **opts)
        blocks = [f"output: {s.output!r} (log p {s.log_prob:.3f}"
                  + ("" if s.finished else f", no end token in {len(s.ids)}") + f")\n{s.filled}"
                  for s in samples]
    log(f"sampled from {run_dir} at step {at}")  # after the checks: errors stay one line
    if len(blocks) == 1:
        return blocks[0]
    return "\n".join(f"--- sample {i + 1}\n{b}" for i, b in enumerate(blocks))
