"""Parameters as a safetensors file (``unitscale-jax export``), and ``--init-from``.

``export_run`` writes the parameters of a run's checkpoint (latest valid one by default) to
one ``.safetensors`` file. ``--init-from SOURCE`` (``train`` and ``finetune``) takes such a file
or a run directory (its newest valid checkpoint): ``source_arrays`` reads either as named
arrays, ``source_config`` the run config behind it, and ``params_from_source`` turns a source
into the initial parameters of a new run (``Trainer.build_state``), checking every name, shape
and dtype; ``finetune`` takes the encoder trunk of the same arrays.

File layout: one tensor per parameter, named by its path in the model's parameter tree joined
with dots (``stack.layers.attn.qkv_proj.kernel``; with ``scan_layers`` the layers are one
array with a leading layer axis, unrolled stacks have ``stack.layers.0.attn...``), in our
layout (kernels ``[fan_in, fan_out]``) and dtype. The header metadata (strings) holds:

- ``format``: ``"unitscale_jax"``; ``format_version``: ``"1"``;
- ``param_info``: JSON ``{name: {"type", "fan_in", "depth", "depth_exponent"}}``, the u-muP
  metadata of each parameter (``unitscale_jax.params.ParamInfo``; ``nn.param_info`` of the model);
- ``model``: JSON of the model config: the run's resolved ``ModelConfig`` fields plus
  ``vocab_size`` and ``max_seq_len`` (what ``TransformerConfig`` was built from);
- ``config``: JSON of the run's ``config.json``;
- ``step``: the checkpoint's step;
- ``merged_from`` (``merge_run`` only): the LoRA run directory whose adapters were folded in;
- ``finetune_config`` (``merge_run`` of a fine-tuning run only): that run's config without the
  adapters; ``config`` is then the plain encoder run it fine-tuned (no ``finetune`` section),
  so ``finetune --init-from FILE`` starts a new fine-tuning run from the merged trunk (the
  file's task heads are ignored there, as ``restore_trunk`` reads the trunk only).

``merge_run`` (``unitscale-jax merge``) writes a LoRA run's parameters with every adapter folded
into its kernel (``nn.merge_lora``), under the base model's names, and the run's config without
the adapters, so the file is a plain model of the same architecture: ``train --init-from FILE``
starts from it, and it computes what the LoRA run computes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitscale_jax import nn, paths
from unitscale_jax.train import build
from unitscale_jax.train.config import Config
from unitscale_jax.train.errors import UsageError

FORMAT, FORMAT_VERSION = "unitscale_jax", "1"
FORMATS = ("safetensors",)
"""What ``export --format`` writes."""


def param_name(path: tuple) -> str:
    """The name of the parameter at a ``jax.tree_util`` key path: keys joined with dots."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat_params(tree: Any, is_leaf: Optional[Callable[[Any], bool]] = None) -> dict[str, Any]:
    """``{name: leaf}`` of a parameter tree (a pure dict, or ``param_info``'s records)."""
    return {param_name(path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def model_metadata(cfg: Config, vocab_size: int) -> dict[str, Any]:
    """The model config a params file records: resolved ``ModelConfig`` fields plus the
    ``vocab_size`` and ``max_seq_len`` the run's ``TransformerConfig`` was built with."""
    tc = build.transformer_config(cfg, vocab_size)
    return {**cfg.to_dict()["model"], "vocab_size": tc.vocab_size, "max_seq_len": tc.max_seq_len}


def _info_dict(abstract_model: nnx.Module) -> dict[str, dict]:
    info = flat_params(nnx.to_pure_dict(nn.param_info(abstract_model)),
                       is_leaf=lambda x: isinstance(x, nn.ParamInfo))
    return {k: {"type": v.type, "fan_in": v.fan_in, "depth": v.depth,
                "depth_exponent": v.depth_exponent} for k, v in info.items()}


def write_params_file(out: Path, params: Any, abstract_model: nnx.Module, model: dict,
                      config_json: str, step: int,
                      extra: Optional[dict[str, str]] = None) -> None:
    """Writes ``params`` (a pure dict) and the header metadata (``abstract_model``'s
    ``param_info``, the ``model`` config from ``model_metadata``, the run's ``config.json``
    text, ``step`` and any ``extra`` strings) to ``out``, atomically: a temporary file in the
    same directory, then renamed."""
    from safetensors.numpy import save_file
    tensors = {k: np.ascontiguousarray(jax.device_get(v)) for k, v in flat_params(params).items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "param_info": json.dumps(_info_dict(abstract_model), sort_keys=True),
                "model": json.dumps(model, sort_keys=True), "config": config_json,
                "step": str(int(step)), **(extra or {})}
    with paths.atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def export_run(run_dir: str | Path, out: Optional[str | Path] = None, *,
               fmt: str = "safetensors", step: Optional[int] = None,
               log: Callable[[str], None] = print) -> Path:
    """Writes the parameters of a run's checkpoint to a safetensors file.

    Args:
      run_dir: the run directory.
      out: the file to write; default ``<run_dir>/model.safetensors``.
      fmt: one of ``FORMATS``.
      step: the checkpoint; default the newest one that verifies.
      log: receives one-line reports.

    Returns:
      The path written.

    Raises:
      UsageError: no run there, an unknown format.
      PathError: ``out`` is a directory or not writable.
    """
    from unitscale_jax.train.config import resolve
    from unitscale_jax.train.run_dir import read_run_config
    from unitscale_jax.train.sample import restore_params
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}.")
    run_dir = Path(run_dir)
    cfg = resolve(read_run_config(run_dir))
    out = Path(out) if out is not None else run_dir / "model.safetensors"
    paths.output_file(out, "--out", example="model.safetensors")
    tokenizer, abstract_model, params, at = restore_params(run_dir, cfg, step=step, log=log)
    write_params_file(out, params, abstract_model, model_metadata(cfg, tokenizer.vocab_size),
                      (run_dir / "config.json").read_text().strip(), at)
    log(f"exported the parameters of {run_dir} at step {at} to {out}")
    return out


def merge_run(run_dir: str | Path, out: Optional[str | Path] = None, *,
              step: Optional[int] = None, log: Callable[[str], None] = print) -> Path:
    """Writes a LoRA run's checkpoint with the adapters merged into the base kernels.

    Args:
      run_dir: a ``train`` or ``finetune`` run with ``--lora-targets``.
      out: the file to write; default ``<run_dir>/merged.safetensors``.
      step: the checkpoint; default the newest valid one (a fine-tuning run: its best).
      log: receives one-line reports.

    Returns:
      The path written.

    Raises:
      UsageError: no run there, or a run without LoRA adapters.
      PathError: ``out`` is a directory or not writable.
    """
    from unitscale_jax.train.config import resolve
    from unitscale_jax.train.run_dir import read_run_config
    run_dir = Path(run_dir)
    given = read_run_config(run_dir)
    cfg = resolve(given)
    if not build.uses_lora(cfg):
        raise UsageError(f"--run-dir {run_dir} has no LoRA adapters (--lora-targets is unset); "
                         "use unitscale-jax export for its parameters.")
    out = Path(out) if out is not None else run_dir / "merged.safetensors"
    paths.output_file(out, "--out", example="merged.safetensors")
    if cfg.finetune is not None:
        from unitscale_jax.train.finetune import load_finetuned
        run = load_finetuned(run_dir, step=step, log=log)
        task, vocab_size, params, at = run.task, run.tokenizer.vocab_size, run.params, run.step
    else:
        from unitscale_jax.train.sample import restore_params
        tokenizer, _, params, at = restore_params(run_dir, cfg, step=step, log=log)
        task, vocab_size = None, tokenizer.vocab_size
    model = build.build_model(cfg, vocab_size, task=task)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    n = nn.merge_lora(model)
    merged = {k: v for k, v in flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
              if not nn.lora.is_adapter_name(k)}
    base_given = given.replace(model={"lora_targets": None})
    base_cfg = resolve(base_given)
    base = nnx.eval_shape(lambda: build.build_model(base_cfg, vocab_size, task=task))
    base_params = unflatten_like(nnx.to_pure_dict(nnx.state(base, nnx.Param)), merged)
    extra = {"merged_from": str(run_dir)}
    recorded = base_given
    if cfg.finetune is not None:
        # recorded as the plain encoder run it fine-tuned, so 'finetune --init-from FILE'
        # accepts it (it reads the trunk); the fine-tuning config is kept beside it
        extra["finetune_config"] = base_given.to_json()
        recorded = Config.from_dict({**base_given.to_dict(), "finetune": None})
    write_params_file(out, base_params, base, model_metadata(base_cfg, vocab_size),
                      recorded.to_json(), at, extra=extra)
    log(f"merged {n} LoRA adapter(s) of {run_dir} at step {at} into the base kernels; "
        f"wrote {out}")
    return out


def _open_params_file(path: str | Path, flag: str, tensors: bool
                      ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    path = paths.existing_file(path, flag, "a .safetensors file or a run directory")
    try:
        with safe_open(str(path), framework="numpy") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
            return arrays, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{flag} {path} is not a readable safetensors file ({reason}).") from None


def read_params_file(path: str | Path, flag: str = "--init-from"
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({name: array}, header metadata)`` of a safetensors file.

    Raises:
      PathError: no such file, or a directory.
      UsageError: not a safetensors file.
    """
    return _open_params_file(path, flag, tensors=True)


def _is_run_dir(source: str | Path, flag: str) -> bool:
    """Whether an ``--init-from`` source is a run directory (else a file).

    Raises:
      MissingPathError: nothing is there.
    """
    if not Path(source).exists():
        raise paths.MissingPathError(f"{flag} {source} does not exist; pass a run directory "
                                     "(unitscale-jax train --run-dir ...) or a .safetensors "
                                     "file (unitscale-jax export).")
    return Path(source).is_dir()


def source_config(source: str | Path, flag: str = "--init-from") -> Config:
    """The (unresolved) run config behind an ``--init-from`` source: a run directory's
    ``config.json``, or the one an exported file records in its header.

    Raises:
      PathError: no such file or directory.
      UsageError: not a run, not a safetensors file, or a file that records no run config
        (not written by ``unitscale-jax export``).
    """
    from unitscale_jax.train.run_dir import read_run_config
    if _is_run_dir(source, flag):
        return read_run_config(source, flag)
    _, meta = _open_params_file(source, flag, tensors=False)
    try:
        return Config.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, UsageError, TypeError, AttributeError):
        raise UsageError(f"{flag} {source} records no run config (it was not written by "
                         "unitscale-jax export); export the run again, or pass its run "
                         "directory.") from None


def source_arrays(source: str | Path, flag: str = "--init-from",
                  log: Callable[[str], None] = print
                  ) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
    """What an ``--init-from`` source holds: ``({name: array}, step, model)``.

    A run directory gives its newest valid checkpoint's parameters; a file, its tensors.
    ``model`` is the ``model_metadata`` of the run behind it (``{}`` for a file that records
    none), the names those of ``flat_params``.

    Raises:
      PathError: no such file or directory.
      UsageError: a run with no valid checkpoint, or an unreadable file.
    """
    from unitscale_jax.train.config import resolve
    from unitscale_jax.train.run_dir import read_run_config
    from unitscale_jax.train.sample import restore_params
    if _is_run_dir(source, flag):
        cfg = resolve(read_run_config(source, flag))
        tokenizer, _, params, step = restore_params(source, cfg, log=log, flag=flag)
        arrays = {k: np.asarray(jax.device_get(v)) for k, v in flat_params(params).items()}
        return arrays, step, model_metadata(cfg, tokenizer.vocab_size)
    arrays, meta = read_params_file(source, flag)
    try:
        model = json.loads(meta["model"]) if "model" in meta else {}
        step = int(meta.get("step", 0))
    except (json.JSONDecodeError, ValueError):
        model, step = {}, 0
    return arrays, step, model if isinstance(model, dict) else {}


def model_changes(theirs: dict[str, Any], cfg: Config, vocab_size: int) -> list[str]:
    """``"field old -> new"`` for each model setting of a source that differs from ``cfg``'s."""
    ours = model_metadata(cfg, vocab_size)
    return [f"{k} {theirs[k]!r} -> {ours[k]!r}" for k in sorted(ours)
            if k in theirs and theirs[k] != ours[k]]


def check_arrays(arrays: dict[str, Any], wanted: dict[str, Any], what: str,
                 hint: str = "") -> None:
    """Raises one ``UsageError`` listing every name missing from ``arrays``, every name not in
    ``wanted`` and every shape or dtype that differs (``wanted`` values have both)."""
    def listing(names):
        names = sorted(names)
        return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    missing, unexpected = set(wanted) - set(arrays), set(arrays) - set(wanted)
    wrong = [f"{k} {tuple(arrays[k].shape)} {arrays[k].dtype} (the model needs "
             f"{tuple(wanted[k].shape)} {np.dtype(wanted[k].dtype)})"
             for k in sorted(set(arrays) & set(wanted))
             if (tuple(arrays[k].shape) != tuple(wanted[k].shape)
                 or np.dtype(arrays[k].dtype) != np.dtype(wanted[k].dtype))]
    parts = ([f"missing {listing(missing)}"] if missing else []) + (
        [f"unexpected {listing(unexpected)}"] if unexpected else []) + (
        [f"different shape or dtype: {'; '.join(wrong[:8])}"
         + (f" and {len(wrong) - 8} more" if len(wrong) > 8 else "")] if wrong else [])
    if parts:
        raise UsageError(f"{what} does not match the model: {'; '.join(parts)}{hint}.")


def unflatten_like(abstract: Any, named: dict[str, Any]) -> Any:
    """The tree of ``abstract`` with each leaf replaced by ``named[its name]``."""
    return jax.tree_util.tree_map_with_path(lambda p, _: named[param_name(p)], abstract)


def params_from_source(source: str | Path, abstract_params: Any, cfg: Config, vocab_size: int,
                       *, flag: str = "--init-from", log: Callable[[str], None] = print,
                       fresh: Optional[dict[str, Any]] = None) -> Any:
    """The parameters of an ``--init-from`` source, as a tree like ``abstract_params``.

    Args:
      source: a file written by ``export_run`` (or any safetensors file with our names), or a
        run directory (its newest valid checkpoint).
      abstract_params: the new run's parameter tree (pure dict of ``ShapeDtypeStruct``).
      cfg: the new run's config (for the report of model settings that differ).
      vocab_size: the new run's vocabulary size.
      flag: the option named in errors.
      log: receives one-line reports.
      fresh: ``{name: array}`` of parameters the source does not hold and the run starts
        from as given (a LoRA run's freshly initialised adapters).

    Raises:
      UsageError: an unreadable source, or names, shapes or dtypes that differ from the
        model's (all listed; with the model settings that differ, when the source records
        them).
    """
    arrays, step, theirs = source_arrays(source, flag, log)
    changed = model_changes(theirs, cfg, vocab_size)
    hint = (f" (the source's model differs in: {', '.join(changed)})" if changed else "")
    fresh = fresh or {}
    check_arrays(arrays, {k: v for k, v in flat_params(abstract_params).items()
                          if k not in fresh}, f"{flag} {source}", hint)
    arrays = {**arrays, **fresh}
    if changed:
        log(f"init-from: {source} comes from a model with other settings "
            f"({', '.join(changed)}); its parameters fit this one.")
    log(f"initialised the parameters from {source} (step {step})")
    return unflatten_like(abstract_params, arrays)
