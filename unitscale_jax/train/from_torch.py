"""``unitscale-jax convert --from-torch``: a ``unit_scaling.TransformerDecoder`` as a run.

The authors' PyTorch library ``unit-scaling`` (0.3.5) has a u-muP ``TransformerDecoder``; its
``state_dict()`` becomes a run directory like the ones ``unitscale-jax train`` writes
(``config.json`` and an orbax checkpoint at step 0), which ``sample``, ``train`` (resume) and
``export`` accept. Given the same token ids, the converted model's logits are torch's
(``tests/interop``).

The ``--config`` file (JSON) holds the torch constructor's hyperparameters and, optionally,
settings of the run::

    {"hidden_size": 256, "vocab_size": 260, "layers": 4, "heads": 4,
     "dropout_p": 0.0, "residual_mult": 1.0, "residual_attn_ratio": 1.0,
     "run": {"preset": "tiny", "data": {"seq_len": 256}, "training": {"steps": 1000}}}

- ``hidden_size``, ``vocab_size``, ``layers``, ``heads``, ``dropout_p``: the arguments of
  ``TransformerDecoder`` (``heads`` cannot be read off the weights' shapes: it must be right).
- ``residual_mult``, ``residual_attn_ratio``: the arguments of
  ``transformer_residual_scaling_rule`` (the constructor's ``residual_scaling``; default 1).
- ``run`` (optional): a partial ``config.json`` of ``unitscale-jax train``: ``preset`` (the
  starting values, default ``tiny``) and any fields of the ``data``, ``optimizer`` and
  ``training`` sections (``data.tokenizer`` must have ``vocab_size`` ids; ``data.seq_len`` is
  the run's sequence length, the torch model has none), and of ``model`` those the torch
  architecture leaves open (e.g. ``attention_impl``, ``scan_layers``).

The rest of the model is what ``unit_scaling`` fixes (``FIXED_MODEL``): u-muP, SwiGLU MLP of
width 4 * hidden_size, non-parametric RMSNorm (eps 1e-5), no biases, no position encoding,
causal attention with multiplier 1. Logits match torch's at ``dropout_p`` 0 only: the
reference applies attention dropout and its sqrt(1 - p) dropout scales even in eval mode.

Weight map (torch name -> our parameter path, ``decoder_map``): ``Linear.weight [out, in]``
-> ``kernel [in, out]`` (transposed); ``mhsa.linear_qkv``'s rows ``(z, heads, head_dim)``
(q, k, v outermost) are permuted to our head-major ``(heads, z, head_dim)``; ``mhsa.linear_o``
-> ``attn.out_proj``; ``mlp.linear_1`` / ``linear_gate`` / ``linear_2`` -> ``mlp.up_proj`` /
``gate_proj`` / ``down_proj`` (``silu_glu(x, g) = x * silu(g)``: ``linear_1`` is the linear
input); ``embedding.weight`` -> ``embed.embedding``; ``projection.weight`` ->
``readout.kernel``; ``layers.{i}.`` -> ``stack.layers.{i}.`` (unrolled) or index ``i`` of the
leading axis (``scan_layers``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import nnx

from unitscale_jax import paths
from unitscale_jax.train import build, interop
from unitscale_jax.train.config import SECTIONS, Config
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.presets import get_preset

# --------------------------------------------------------------------------- weight map


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one torch tensor goes in our parameter tree.

    Attributes:
      path: the parameter's key path in ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``.
      to_ours: torch layout -> ours (e.g. ``kernel``).
      layer: the index along the leading layer axis of a scanned stack (None: the whole
        parameter).
      transposed: torch's shape is ours reversed (``[out, in]`` against ``[in, out]``).
    """

    path: tuple
    to_ours: Callable[[np.ndarray], np.ndarray]
    layer: Optional[int] = None
    transposed: bool = True

    def torch_shape(self, our_shape: tuple) -> tuple:
        """The torch tensor's shape for our parameter's shape."""
        shape = tuple(our_shape[1:] if self.layer is not None else our_shape)
        return shape[::-1] if self.transposed else shape


def same(w: np.ndarray) -> np.ndarray:
    """Same layout (embeddings, biases)."""
    return w


def kernel(w: np.ndarray) -> np.ndarray:
    """torch ``Linear.weight [out, in]`` -> our kernel ``[in, out]``."""
    return w.T


def qkv_kernel(w: np.ndarray, heads: int) -> np.ndarray:
    """torch ``linear_qkv.weight [(3, heads, d_head), in]`` -> our ``[in, (heads, 3, d_head)]``."""
    three_inner, d_in = w.shape
    d_head = three_inner // 3 // heads
    w = w.reshape(3, heads, d_head, d_in).transpose(1, 0, 2, 3).reshape(three_inner, d_in)
    return w.T


def attention_map(prefix_t: str, prefix_o: tuple, heads: int) -> dict[str, Target]:
    """An ``MHSA``'s tensors (names after ``prefix_t``) -> our attention at ``prefix_o``."""
    return {f"{prefix_t}linear_qkv.weight": Target(prefix_o + ("qkv_proj", "kernel"),
                                                   functools.partial(qkv_kernel, heads=heads)),
            f"{prefix_t}linear_o.weight": Target(prefix_o + ("out_proj", "kernel"), kernel)}


def mlp_map(prefix_t: str, prefix_o: tuple) -> dict[str, Target]:
    """An ``MLP``'s tensors -> our SwiGLU MLP at ``prefix_o``."""
    return {f"{prefix_t}linear_1.weight": Target(prefix_o + ("up_proj", "kernel"), kernel),
            f"{prefix_t}linear_gate.weight": Target(prefix_o + ("gate_proj", "kernel"), kernel),
            f"{prefix_t}linear_2.weight": Target(prefix_o + ("down_proj", "kernel"), kernel)}


def layer_map(prefix_t: str, prefix_o: tuple, heads: int) -> dict[str, Target]:
    """A ``TransformerLayer``'s tensors -> our ``TransformerLayer`` at ``prefix_o``."""
    return {**attention_map(prefix_t + "mhsa.", prefix_o + ("attn",), heads),
            **mlp_map(prefix_t + "mlp.", prefix_o + ("mlp",))}


def decoder_map(n_layers: int, heads: int, *, scan: bool) -> dict[str, Target]:
    """A ``TransformerDecoder``'s ``state_dict`` names -> our ``TransformerDecoder``'s
    parameters (``scan``: our layers are stacked along a leading axis)."""
    m = {"embedding.weight": Target(("embed", "embedding"), same, transposed=False),
         "projection.weight": Target(("readout", "kernel"), kernel)}
    for i in range(n_layers):
        prefix = ("stack", "layers") if scan else ("stack", "layers", i)
        for name, t in layer_map(f"layers.{i}.", prefix, heads).items():
            m[name] = dataclasses.replace(t, layer=i) if scan else t
    return m


def to_ours(arrays: Mapping[str, np.ndarray], mapping: Mapping[str, Target]
            ) -> dict[tuple, np.ndarray]:
    """``{our path: array}`` of torch-named arrays (weights, or their gradients); the layers
    of a scanned stack are stacked in order."""
    out: dict[tuple, np.ndarray] = {}
    stacked: dict[tuple, dict[int, np.ndarray]] = {}
    for name, target in mapping.items():
        value = target.to_ours(np.asarray(arrays[name]))
        if target.layer is None:
            out[target.path] = value
        else:
            stacked.setdefault(target.path, {})[target.layer] = value
    for path, per_layer in stacked.items():
        out[path] = np.stack([per_layer[i] for i in sorted(per_layer)])
    return out


# --------------------------------------------------------------------------- the config


@dataclasses.dataclass(frozen=True)
class TorchDecoderConfig:
    """The hyperparameters of a ``unit_scaling.TransformerDecoder`` (the ``--config`` file)."""

    hidden_size: int
    vocab_size: int
    layers: int
    heads: int
    dropout_p: float = 0.0
    residual_mult: float = 1.0
    residual_attn_ratio: float = 1.0

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "TorchDecoderConfig":
        """Validates the fields of ``d`` (``where`` names the file in errors)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(d, dict):
            raise UsageError(f"{where}: expected a JSON object with {', '.join(fields)}.")
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {unknown}; allowed: "
                             f"{', '.join(fields)} and 'run'.")
        missing = [n for n, f in fields.items()
                   if f.default is dataclasses.MISSING and n not in d]
        if missing:
            raise UsageError(f"{where}: missing {', '.join(missing)} (the torch model's "
                             "hyperparameters).")
        for name, value in d.items():
            if fields[name].type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise UsageError(f"{where}: {name} must be a positive integer, got {value!r}.")
            elif (isinstance(value, bool) or not isinstance(value, (int, float))
                  or not math.isfinite(value)):
                raise UsageError(f"{where}: {name} must be a number, got {value!r}.")
        c = cls(**d)
        if c.hidden_size % c.heads:
            raise UsageError(f"{where}: hidden_size {c.hidden_size} is not divisible by heads "
                             f"{c.heads}.")
        if not 0 <= c.dropout_p < 1:
            raise UsageError(f"{where}: dropout_p must be in [0, 1), got {c.dropout_p}.")
        for name in ("residual_mult", "residual_attn_ratio"):
            if not getattr(c, name) > 0:
                raise UsageError(f"{where}: {name} must be > 0, got {getattr(c, name)}.")
        return c

    def describe(self) -> str:
        return ", ".join(f"{f.name} {getattr(self, f.name)}" for f in dataclasses.fields(self))


FIXED_MODEL = {"kind": "decoder", "parametrization": "umup", "d_head": None, "n_kv_heads": None,
               "ffn_mult": 4.0,
               "d_ff": None, "mlp": "swiglu", "norm": "rms", "parametric_norm": False,
               "bias": False, "rope": False, "attn_mult": 1.0, "act_mult": 1.0,
               "loss_mult": 1.0, "norm_eps": 1e-5}
"""``ModelConfig`` fields that ``unit_scaling.TransformerDecoder`` fixes."""


def model_fields(tc: TorchDecoderConfig) -> dict[str, Any]:
    """The ``ModelConfig`` fields of the torch model."""
    return {**FIXED_MODEL, "d_model": tc.hidden_size, "n_layers": tc.layers,
            "n_heads": tc.heads, "dropout": float(tc.dropout_p),
            "residual_mult": float(tc.residual_mult),
            "residual_attn_ratio": float(tc.residual_attn_ratio)}


def read_config(path: str | Path, run_dir: str | Path) -> tuple[TorchDecoderConfig, Config]:
    """The torch hyperparameters in ``path`` and the run ``Config`` they give.

    Raises:
      PathError: no such file, or a directory.
      UsageError: bad JSON, bad or conflicting fields.
    """
    path = paths.existing_file(path, "--config", "the JSON file of the torch model's "
                               "hyperparameters")
    where = f"--config {path}"
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{where} is not valid JSON ({e}).") from None
    run = d.pop("run", {}) if isinstance(d, dict) else {}
    tc = TorchDecoderConfig.from_dict(d, where)
    if not isinstance(run, dict):
        raise UsageError(f"{where}: 'run' must be an object (a partial config.json).")
    run = dict(run)
    bad = sorted(set(run) - set(SECTIONS) - {"preset"})
    if bad:
        raise UsageError(f"{where}: 'run' has unknown key(s) {bad}; use 'preset' and "
                         f"{', '.join(SECTIONS)}.")
    fixed = model_fields(tc)
    for section in SECTIONS:
        if not isinstance(run.get(section, {}), dict):
            raise UsageError(f"{where}: run.{section} must be an object.")
    clash = [f"run.model.{k} {v!r} (the torch model has {fixed[k]!r})"
             for k, v in run.get("model", {}).items() if k in fixed and v != fixed[k]]
    training = run.get("training", {})
    clash += [f"run.training.{k}" for k in ("init_from", "overwrite", "run_dir")
              if training.get(k) not in (None, False)]
    clash += ["run.training.checkpoint false"] if training.get("checkpoint", True) is False else []
    if clash:
        raise UsageError(f"{where}: {', '.join(clash)} cannot be set for a converted model; "
                         "remove them.")
    cfg = get_preset(run.pop("preset", "tiny"))
    try:
        cfg = cfg.replace(**run).replace(model=fixed, training={"run_dir": str(run_dir)})
    except (TypeError, UsageError) as e:
        raise UsageError(f"{where}: bad 'run' section ({e})") from None
    return tc, cfg


# --------------------------------------------------------------------------- the state dict


TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_state_dict(path: str | Path, flag: str = "--from-torch") -> dict[str, np.ndarray]:
    """The tensors of a torch ``state_dict`` saved as ``.safetensors`` (read without torch)
    or with ``torch.save`` (``.pt``/``.pth``/``.bin``; needs torch).

    Raises:
      PathError: no such file, or a directory.
      UsageError: an unknown suffix, torch missing for a ``.pt``,
        or a file that does not hold a state dict.
    """
    path = paths.existing_file(path, flag, "the state dict file (.safetensors, .pt or .pth)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return interop.read_params_file(path, flag)[0]
    if suffix not in TORCH_SUFFIXES:
        raise UsageError(f"{flag} {path}: unknown file type {suffix or '(none)'!r}; pass a "
                         ".safetensors file or a torch.save file (.pt, .pth).")
    try:
        import torch
    except ImportError:
        raise UsageError(f"{flag} {path}: reading a .pt/.pth file needs torch, which is not "
                         "installed; pip install torch, or save the state dict as safetensors "
                         "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) "
                         "and pass that file.") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file it cannot unpickle
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UsageError(f"{flag} {path} is not a state dict torch.load can read ({reason}); "
                         "save model.state_dict() with torch.save.") from None
    if (not isinstance(obj, Mapping) or not obj
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                       for k, v in obj.items())):
        raise UsageError(f"{flag} {path} holds a {type(obj).__name__}, not a state dict (a "
                         "mapping of parameter names to tensors); save model.state_dict().")
    return {k: (v.detach().cpu().float() if v.dtype == torch.bfloat16 else v.detach().cpu())
            .numpy() for k, v in obj.items()}


def torch_params(state: Mapping[str, np.ndarray], tc: TorchDecoderConfig, abstract_params: Any,
                 *, scan: bool, what: str) -> Any:
    """Our parameter tree (numpy, ``abstract_params``'s dtypes) of a torch state dict.

    Raises:
      UsageError: names or shapes that differ from what ``tc`` gives, all listed.
    """
    mapping = decoder_map(tc.layers, tc.heads, scan=scan)
    ours = interop.flat_params(abstract_params)
    assert set(ours) == {interop.param_name(_keys(t.path)) for t in mapping.values()}, \
        "decoder_map does not cover the model"
    wanted = {name: jax.ShapeDtypeStruct(t.torch_shape(ours[_name(t.path)].shape), np.float32)
              for name, t in mapping.items()}
    arrays = {k: (np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
                  else np.asarray(v)) for k, v in state.items()}
    interop.check_arrays(arrays, wanted, what, f" (from --config: {tc.describe()})")
    by_path = {_name(p): v for p, v in to_ours(arrays, mapping).items()}
    return jax.tree_util.tree_map_with_path(
        lambda p, a: by_path[interop.param_name(p)].astype(a.dtype), abstract_params)


def _keys(path: tuple) -> tuple:
    return tuple(jax.tree_util.DictKey(k) for k in path)


def _name(path: tuple) -> str:
    return interop.param_name(_keys(path))


# --------------------------------------------------------------------------- convert


def convert(ckpt: str | Path, config: str | Path, run_dir: str | Path, *,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes the run directory of a ``unit_scaling.TransformerDecoder`` state dict.

    Args:
      ckpt: the state dict (``.safetensors``, or ``.pt``/``.pth`` with torch installed).
      config: the JSON file of its hyperparameters (module docstring).
      run_dir: the new run directory (must not hold a run).
      log: receives one-line reports.

    Returns:
      ``{"run_dir", "checkpoint", "config", "n_params"}``.

    Raises:
      UsageError, PathError: any of the inputs is wrong (one line saying which and how).
    """
    from unitscale_jax import data as datalib
    from unitscale_jax.train.trainer import Trainer
    run_dir = paths.check_kind(run_dir, "dir", "--run-dir", "pass a new directory")
    ckpt_dir = run_dir / "checkpoints"
    if (run_dir / "config.json").exists() or (ckpt_dir.is_dir() and any(ckpt_dir.iterdir())):
        raise UsageError(f"--run-dir {run_dir} already holds a run; pass a new directory "
                         "(or delete that one).")
    tc, cfg = read_config(config, run_dir)
    try:
        tokenizer = datalib.get_tokenizer(cfg.data.tokenizer)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise UsageError(f"--config {config}: run.data.tokenizer: {e}") from None
    if tokenizer.vocab_size != tc.vocab_size:
        raise UsageError(f"--config {config}: vocab_size {tc.vocab_size}, but the tokenizer "
                         f"{cfg.data.tokenizer!r} has {tokenizer.vocab_size} ids; set "
                         "run.data.tokenizer to the tokenizer the model was trained with.")
    state = read_state_dict(ckpt)
    abstract_model = nnx.eval_shape(lambda: build.build_model(cfg, tokenizer.vocab_size))
    abstract_params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    params = torch_params(state, tc, abstract_params, scan=cfg.model.scan_layers,
                          what=f"--from-torch {ckpt}")
    if tc.dropout_p:
        log(f"note: dropout_p {tc.dropout_p}: the torch model applies dropout even in eval "
            "mode, so its logits differ from the converted model's (equal at dropout_p 0).")
    trainer = Trainer(cfg)
    try:
        trainer.build_state(params)
        trainer.save(0, force=True)
    finally:
        trainer.close()
    log(f"converted {ckpt} ({len(state)} tensors, {trainer.n_params:,} parameters) to "
        f"{run_dir}")
    return {"run_dir": str(run_dir), "checkpoint": str(trainer.ckpt.directory / "0"),
            "config": str(run_dir / "config.json"), "n_params": trainer.n_params}
