"""``unitscale-jax sample``: text from a trained decoder run (its latest valid checkpoint).

The prompt is encoded after an end-of-document token (the separator the model saw between
packed documents in training), so an empty prompt starts a new document. Generation uses
the decoder's KV-cache ``generate`` with u-muP's attention scaling at the training sequence
length; continuations longer than the context slide a window: each further chunk is
generated from the last ``seq_len / 2`` tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitscale_jax import data as datalib
from unitscale_jax import nn
from unitscale_jax.train import build
from unitscale_jax.train.checkpoint import Checkpoints
from unitscale_jax.train.config import resolve
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.run_dir import read_run_config
from unitscale_jax.train.trainer import init_state_fn


def load_run(run_dir: str | Path, *, step: Optional[int] = None, log=print,
             kind: str = "decoder", purpose: str = "sample", flag: str = "--run-dir"):
    """The config, tokenizer and model (parameters restored) of a pretraining run.

    Args:
      run_dir: the run directory.
      step: the checkpoint to load; default the newest one that verifies.
      kind: the ``--model`` the run must have trained.
      purpose, flag: how the caller names itself and the directory, in messages.

    Raises:
      UsageError: no run, another model kind or a fine-tuning run, no (valid) checkpoint, or
        no such step.
    """
    run_dir = Path(run_dir)
    cfg = resolve(read_run_config(run_dir, flag))
    if cfg.model.kind != kind or cfg.finetune is not None:
        what = (f"fine-tuned a {cfg.finetune.task} model" if cfg.finetune is not None else
                f"trained a {cfg.model.kind}")
        raise UsageError(f"{purpose} needs a {kind} run; {flag} {run_dir} {what} (train one "
                         f"with 'unitscale-jax train --model {kind}').")
    try:
        tokenizer = datalib.get_tokenizer(cfg.data.tokenizer)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise UsageError(f"tokenizer of {run_dir}: {e}") from None
    abstract_model = nnx.eval_shape(lambda: build.build_model(cfg, tokenizer.vocab_size))
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    tx, _ = build.build_optimizer(cfg, nnx.to_pure_dict(nn.param_info(abstract_model)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(init_state_fn(cfg, tokenizer.vocab_size, tx)))
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise UsageError(f"{flag} {run_dir}: no checkpoints directory; the run saved none.")
    ckpt = Checkpoints(ckpt_dir, async_save=False, log=log)
    try:
        if step is not None:
            if step not in ckpt.steps():
                raise UsageError(f"--step {step}: no checkpoint at that step in {ckpt_dir} "
                                 f"(have {ckpt.steps()}).")
            state, _ = ckpt.restore(step, target)
            found = (step, state, None)
        else:
            found = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    if found is None:
        raise UsageError(f"{flag} {run_dir}: no complete checkpoint to load.")
    model = nnx.merge(graphdef, found[1]["params"])
    model.eval()
    return cfg, tokenizer, model, found[0]


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int, seq_len: int,
                  temperature: float = 0.8, top_k: Optional[int] = 40, seed: int = 0,
                  num_samples: int = 1) -> list[str]:
    """Continuations of ``prompt`` (decoded, prompt excluded), ``num_samples`` of them."""
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {temperature}.")
    if top_k is not None and not 1 <= top_k <= tokenizer.vocab_size:
        raise UsageError(f"--top-k must be in [1, {tokenizer.vocab_size}] or none, got {top_k}.")
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
                              temperature=temperature, top_k=top_k if temperature > 0 else None,
                              scale_seq_len=seq_len)
        out.append(full[:, ctx.shape[1]:])
        remaining -= n
    new = np.asarray(jnp.concatenate(out, axis=1))
    return [tokenizer.decode(row) for row in new]


def sample(run_dir: str, prompt: str = "", *, max_new_tokens: int = 200,
           temperature: float = 0.8, top_k: Optional[int] = 40, seed: int = 0,
           num_samples: int = 1, step: Optional[int] = None, log=print) -> list[str]:
    """Loads ``run_dir`` and returns ``num_samples`` continuations of ``prompt``."""
    cfg, tokenizer, model, at = load_run(run_dir, step=step, log=log)
    log(f"sampling from {run_dir} at step {at}")
    return generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                         seq_len=cfg.data.seq_len, temperature=temperature, top_k=top_k,
                         seed=seed, num_samples=num_samples)
