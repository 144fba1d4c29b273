"""Progressive growth (``unitscale-jax grow``): a deeper model initialised from a trained one.

Growth rule (depth). A finished decoder or encoder run of ``n`` layers grows by an integer
factor ``k >= 2`` to ``k * n`` layers. Every parameter outside the layer stack (embedding,
final norm, output head) is copied unchanged; layer ``i`` of the new stack is a copy of
layer ``source_layer(i, n, k, mode)`` of the old one:

- ``duplicate``: layer ``i // k`` (each trained layer repeated ``k`` times in place:
  ``0 0 1 1`` for 2 -> 4 layers);
- ``interleave``: layer ``i % n`` (the whole trained stack repeated ``k`` times:
  ``0 1 0 1``).

Scanned stacks (``scan_layers``) hold each ``stack.layers.*`` parameter as one array with a
leading layer axis (row ``i`` of the new array is row ``source_layer(i, ...)`` of the old);
unrolled stacks name each layer ``stack.layers.<i>.*``. Nothing else changes: the new run's
config is the source's with ``n_layers = k * n``, the same learning rate, schedule and
optimizer settings (u-muP's hyperparameters do not depend on depth, so the learning rate that
trained the small model trains the grown one), ``init_from`` the grown parameters and fresh
optimizer state (Adam moments start at zero, the schedule, its warmup included, restarts).

The residual rule when depth changes. The residual weights are not parameters:
``ops.transformer_residual_scaling_rule`` gives branch ``j`` of a ``2 n``-branch stack
``tau_j = alpha_j / sqrt(n + sum_{i<j} alpha_i^2)`` (``1 / sqrt(n + j)`` by default), so the
grown stack's taus are those of a ``k n``-layer stack, not copies of the old ones: every
branch gets a smaller tau (layer 0's attention branch: ``1/sqrt(2)`` at 2 layers, ``1/2`` at
4), the copies add further branches, and the grown u-muP model does not compute what the
small one did. An SP model (plain ``x + f(norm(x))``) applies each copied branch again, which
changes its function too. Growth is therefore not function-preserving in either
parametrization; the loss right after growing (the new run's validation loss at step 0,
which ``train`` evaluates before its first step) measures the gap, and
``experiments/grow.py`` compares it with the source's last validation loss.

Width is not grown: a function-preserving widening (Net2Net-style unit duplication) must
divide each duplicated fan-in's outgoing weights by the copy count, and under u-muP the
``1/sqrt(fan_in)`` forward scale changes with the width as well, so the copied weights leave
unit scale, which is what lets u-muP keep its learning rate; a noise-added widening changes the
function by an amount with no documented rule. ``grow_params`` rejects it (``width_factor``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from flax import nnx

from unitscale_jax import paths
from unitscale_jax.train import build, interop
from unitscale_jax.train.config import Config, resolve
from unitscale_jax.train.errors import UsageError

MODES = ("duplicate", "interleave")
"""How the trained layers fill the grown stack (``source_layer``)."""

GROWN_FILE = "grown.safetensors"
"""The grown parameters in the new run directory (its ``config.json``'s ``init_from``)."""

WIDTH_UNSUPPORTED = (
    "width growth is not supported: a function-preserving widening divides the duplicated "
    "units' outgoing weights by the copy count, which under u-muP takes them off unit scale "
    "(what keeps the learning rate fixed), and a noise-added one has no rule that keeps the "
    "function; grow --depth instead")

_LAYERS = "stack.layers."


def parse_factor(text: str, flag: str = "--depth") -> int:
    """The integer growth factor of ``"2x"`` or ``"2"``.

    Raises:
      UsageError: not an integer >= 2.
    """
    m = re.fullmatch(r"\s*(\d+)\s*[xX]?\s*", str(text))
    if not m or int(m.group(1)) < 2:
        raise UsageError(f"{flag} {text!r}: the growth factor must be an integer >= 2, "
                         "written like 2x.")
    return int(m.group(1))


def source_layer(i: int, n_layers: int, factor: int, mode: str = "duplicate") -> int:
    """The layer of an ``n_layers`` stack that layer ``i`` of the grown ``factor * n_layers``
    stack copies: ``i // factor`` (``duplicate``) or ``i % n_layers`` (``interleave``)."""
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: use one of {', '.join(MODES)}.")
    if not 0 <= i < factor * n_layers:
        raise ValueError(f"layer {i} outside the grown stack of {factor * n_layers}.")
    return i // factor if mode == "duplicate" else i % n_layers


def check_growable(cfg: Config, what: str = "--from") -> None:
    """Raises ``UsageError`` unless ``cfg`` is a decoder or encoder pretraining run without
    LoRA adapters (the runs whose one layer stack ``grow_params`` knows)."""
    if cfg.finetune is not None:
        raise UsageError(f"{what} is a fine-tuning run; grow the pretraining (train --model "
                         "decoder or encoder) run it started from.")
    if cfg.model.kind not in ("decoder", "encoder"):
        raise UsageError(f"{what} is a --model {cfg.model.kind} run; grow works on decoder and "
                         "encoder runs (one layer stack).")
    if build.uses_lora(cfg):
        raise UsageError(f"{what} has LoRA adapters; fold them in with unitscale-jax merge, "
                         "train a run --init-from the merged file, and grow that.")


def grown_config(cfg: Config, depth_factor: int) -> Config:
    """``cfg`` with ``factor`` times the layers, everything else (the learning rate
    included) as it was."""
    return cfg.replace(model={"n_layers": cfg.model.n_layers * depth_factor})


def grow_params(params: Any, cfg: Config, depth_factor: int, mode: str = "duplicate", *,
                vocab_size: Optional[int] = None, width_factor: Optional[int] = None) -> Any:
    """The parameters of the grown model (module docstring: the growth rule).

    Args:
      params: the source model's parameters (pure dict, as ``sample.restore_params`` gives).
      cfg: the source run's config.
      depth_factor: integer ``k >= 2``; the new model has ``k * n_layers`` layers.
      mode: ``duplicate`` or ``interleave`` (``source_layer``).
      vocab_size: the model's vocabulary (default: the embedding's rows).
      width_factor: must be None or 1 (width growth is not supported).

    Returns:
      The grown model's parameters, a pure dict shaped like ``grown_config(cfg, k)``'s model.

    Raises:
      UsageError: width growth, a factor that is not an integer >= 2, an unknown mode, a run
        kind without one layer stack, or parameters that do not fit ``cfg``.
    """
    if width_factor not in (None, 1):
        raise UsageError(WIDTH_UNSUPPORTED + ".")
    if isinstance(depth_factor, bool) or not isinstance(depth_factor, (int, np.integer)) \
            or depth_factor < 2:
        raise UsageError(f"depth factor {depth_factor!r}: the growth factor must be an integer "
                         ">= 2, written like 2x.")
    depth_factor = int(depth_factor)
    check_growable(cfg, "the source")
    n = cfg.model.n_layers
    index = [source_layer(i, n, depth_factor, mode) for i in range(n * depth_factor)]
    flat = interop.flat_params(params)
    if vocab_size is None:
        vocab_size = int(next(v.shape[0] for k, v in flat.items() if k.startswith("embed")))
    new_cfg = resolve(grown_config(cfg, depth_factor))
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: build.build_model(new_cfg, vocab_size)), nnx.Param))
    grown: dict[str, Any] = {}
    for name, value in flat.items():
        if not name.startswith(_LAYERS):
            grown[name] = value
            continue
        head, _, tail = name[len(_LAYERS):].partition(".")
        if head.isdigit():  # unrolled: stack.layers.<l>.rest
            for i, src in enumerate(index):
                if src == int(head):
                    grown[f"{_LAYERS}{i}.{tail}"] = value
        else:  # scanned: one array, layer axis first
            if value.shape[0] != n:
                raise UsageError(f"the source's {name} has {value.shape[0]} layers, its config "
                                 f"{n}; pass an unchanged run.")
            grown[name] = np.take(np.asarray(value), index, axis=0)
    interop.check_arrays(grown, interop.flat_params(abstract), "the grown parameters")
    return interop.unflatten_like(abstract, grown)


def grow_run(source: str | Path, run_dir: str | Path, depth_factor: int, *,
             mode: str = "duplicate", steps: Optional[int] = None,
             width_factor: Optional[int] = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes a new run directory whose model is the grown model of a finished run.

    ``run_dir`` receives ``grown.safetensors`` (``interop.write_params_file``, with
    ``grown_from`` and ``growth`` in its header) and the new run's ``config.json``: the
    source's, with ``grown_config``'s layers, ``run_dir`` and ``init_from`` the grown file
    (and ``steps`` when given). ``unitscale-jax train --config RUN_DIR/config.json`` trains it
    (rerunning it resumes).

    Args:
      source: the finished run directory (its newest valid checkpoint at its ``--steps``).
      run_dir: the new run directory (must not hold a run).
      depth_factor: ``k >= 2``.
      mode: ``duplicate`` or ``interleave``.
      steps: the new run's training steps (default: the source's).
      width_factor: None or 1 (width growth is not supported).
      log: receives one-line reports.

    Returns:
      ``{"run_dir", "config", "params", "source_step", "n_layers"}``.

    Raises:
      UsageError: see ``grow_params``; an unfinished source, a source with no valid
        checkpoint, or a ``run_dir`` that already holds a run.
      PathError: ``run_dir`` cannot be created or written in.
    """
    from unitscale_jax.train.run_dir import read_run_config
    from unitscale_jax.train.sample import restore_params
    if width_factor not in (None, 1):
        raise UsageError(WIDTH_UNSUPPORTED + ".")
    source = Path(source)
    given = read_run_config(source, "--from")
    check_growable(given, f"--from {source}")
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: use one of {', '.join(MODES)}.")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: must be >= 1.")
    new_dir = Path(run_dir)
    if new_dir.resolve() == source.resolve():
        raise UsageError(f"--run-dir {new_dir} is the source run; pass a new directory.")
    if (new_dir / "config.json").exists() or (new_dir / "checkpoints").exists():
        raise UsageError(f"--run-dir {new_dir} already holds a run; pass a new directory.")
    cfg = resolve(given)
    tokenizer, _, params, at = restore_params(source, cfg, log=log, flag="--from")
    if at < cfg.training.steps:
        raise UsageError(f"--from {source} is not finished (its newest checkpoint is at step "
                         f"{at} of {cfg.training.steps}); finish it with unitscale-jax train "
                         f"--config {source / 'config.json'} first.")
    grown = grow_params(params, given, depth_factor, mode, vocab_size=tokenizer.vocab_size)
    new_dir = paths.output_dir(new_dir, "--run-dir", "pass another --run-dir")
    out = new_dir / GROWN_FILE
    training = {"run_dir": str(new_dir), "init_from": str(out), "overwrite": False}
    if steps is not None:
        training["steps"] = int(steps)
    new_given = grown_config(given, depth_factor).replace(training=training)
    new_cfg = resolve(new_given)
    abstract_model = nnx.eval_shape(lambda: build.build_model(new_cfg, tokenizer.vocab_size))
    growth = {"from_layers": cfg.model.n_layers, "to_layers": new_cfg.model.n_layers,
              "factor": depth_factor, "mode": mode, "source_step": at}
    interop.write_params_file(out, grown, abstract_model,
                      interop.model_metadata(new_cfg, tokenizer.vocab_size), new_given.to_json(),
                      at, extra={"grown_from": str(source), "growth": json.dumps(growth)})
    config_path = new_dir / "config.json"
    paths.write_text_atomic(config_path, new_given.to_json() + "\n")
    log(f"grew {source} (step {at}, {cfg.model.n_layers} layers) to "
        f"{new_cfg.model.n_layers} layers ({mode}) -> {out}; train it with: unitscale-jax "
        f"train --config {config_path}")
    return {"run_dir": new_dir, "config": config_path, "params": out, "source_step": at,
            "n_layers": new_cfg.model.n_layers}
