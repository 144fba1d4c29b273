"""Adapter-only checkpoints of LoRA runs: the frozen base is a reference, not a copy.

A LoRA run started from ``--init-from`` (``train`` or ``finetune`` with ``--lora-targets``)
trains its adapters (and a fine-tuning run's heads) and keeps every other parameter equal to
the source's. Its checkpoints therefore store only the trainable parameters (and their
optimizer state, which ``build.train_only`` already restricts to them); the frozen base is
re-read from the source on every start, resume and read. The run directory's
``lora_base.json`` (``BASE_FILE``) records the reference:

- ``source``: the ``--init-from`` path (absolute), a run directory or an exported file;
- ``frozen``: the names (``interop.flat_params``) of the parameters taken from it;
- ``fingerprint``: ``checkpoint.state_digest`` of those arrays (SHA-256 over names, dtypes,
  shapes and bytes).

Whoever restores such a checkpoint (resume, ``sample``, ``export``, ``merge``, ``evaluate``,
``predict``, a later ``--init-from`` of the run) reads the base from ``source``, checks the
fingerprint and reassembles base + trainable parameters; a source that is gone, unreadable or
changed is a one-line ``UsageError`` naming it. A LoRA run without ``--init-from`` (a random
base) and runs without ``lora_base.json`` (LoRA runs made before this file existed) keep whole
checkpoints; a run whose ``lora_base.json`` was deleted while its checkpoints hold only the
adapters is refused with a one-line ``UsageError`` (``refuse_adapter_only``), never restarted.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

from unitscale_jax import paths
from unitscale_jax.train import interop
from unitscale_jax.train.checkpoint import Checkpoints, state_digest
from unitscale_jax.train.errors import UsageError

BASE_FILE = "lora_base.json"
"""The run directory's reference to the frozen base of a LoRA run."""


def prune(tree: Any, keep: Callable[[str], bool], prefix: str = "") -> Any:
    """The nested dict ``tree`` with only the leaves whose ``interop.flat_params`` name passes
    ``keep`` (dicts left empty are dropped)."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            sub = prune(v, keep, name)
            if sub:
                out[k] = sub
        elif keep(name):
            out[k] = v
    return out


@dataclasses.dataclass(frozen=True)
class LoRABase:
    """The frozen base of a LoRA run (the contents of ``BASE_FILE``)."""

    source: str
    frozen: tuple[str, ...]
    fingerprint: Optional[str]

    @staticmethod
    def of(source: str | Path, arrays: dict[str, Any], frozen: set[str]) -> "LoRABase":
        """The reference to the ``frozen`` parameters of ``arrays`` (as read from ``source``)."""
        names = tuple(sorted(frozen))
        arrays = {k: np.asarray(jax.device_get(arrays[k])) for k in names}
        return LoRABase(str(Path(source).absolute()), names,
                        state_digest({k: arrays[k] for k in names}))

    def write(self, run_dir: Path) -> None:
        paths.write_text_atomic(Path(run_dir) / BASE_FILE,
                                json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @staticmethod
    def read(run_dir: str | Path) -> Optional["LoRABase"]:
        """The run's reference, or None when it has none (whole checkpoints).

        Raises:
          UsageError: an unreadable ``BASE_FILE``.
        """
        path = Path(run_dir) / BASE_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            return LoRABase(str(d["source"]), tuple(d["frozen"]),
                            d["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path} is not a readable LoRA base reference ({e}); restore it "
                             "from a backup, or start the run again with --overwrite.") from None

    def stored(self, tree: Any) -> Any:
        """What a checkpoint holds of a parameter-shaped tree (its non-frozen leaves)."""
        frozen = set(self.frozen)
        return prune(tree, lambda name: name not in frozen)

    def checkpoint_state(self, state: dict) -> dict:
        """A train state (or its abstract target / shardings) as checkpointed."""
        return {**state, "params": self.stored(state["params"])}

    def load(self, run_dir: str | Path, log: Callable[[str], None] = print
             ) -> dict[str, np.ndarray]:
        """``{name: array}`` of the frozen parameters, read from ``source`` and verified.

        Raises:
          UsageError: the source is missing, unreadable, lacks a frozen parameter or no
            longer matches the fingerprint.
        """
        where = f"the LoRA base of {run_dir} ({BASE_FILE})"
        if not Path(self.source).exists():
            raise UsageError(f"{where}, {self.source}, is missing; the checkpoints hold only "
                             "the adapters: put the base back there (or merge/export the run "
                             "while it exists).")
        try:
            arrays, _, _ = interop.source_arrays(self.source, "LoRA base", log)
        except UsageError as e:
            raise UsageError(f"{where}, {self.source}, cannot be read: {e}") from None
        missing = [k for k in self.frozen if k not in arrays]
        got = None if missing else state_digest({k: arrays[k] for k in self.frozen})
        if missing or (self.fingerprint is not None and got != self.fingerprint):
            why = (f"lacks {', '.join(missing[:4])}" if missing else
                   f"its fingerprint is {got[:12]}..., recorded {self.fingerprint[:12]}...")
            raise UsageError(f"{where}, {self.source}, has changed since the run started "
                             f"({why}); the adapters were trained on the old base: restore it, "
                             "or start the run again with --overwrite.")
        return {k: arrays[k] for k in self.frozen}

    def assemble(self, abstract_params: Any, stored_params: Any, base: dict[str, Any]) -> Any:
        """The full parameter tree (like ``abstract_params``) from a checkpoint's
        ``stored_params`` and the frozen ``base`` (values may be host or device arrays)."""
        return interop.unflatten_like(abstract_params,
                                      {**interop.flat_params(stored_params), **base})


def refuse_adapter_only(run_dir: str | Path, ckpt: Checkpoints, step: Optional[int],
                        target: dict) -> None:
    """Refuses a LoRA run whose ``BASE_FILE`` is gone but whose checkpoint (at ``step``, None:
    the newest) holds only the trainable parameters: restored as whole checkpoints they would
    not fit, and a trainer would set them aside as corrupt and start the run over.

    Raises:
      UsageError: the checkpoint's parameters (orbax's metadata of it) are a strict subset of
        ``target["params"]``.
    """
    steps = ckpt.steps()
    at = (steps[-1] if steps else None) if step is None else step
    if at is None:
        return
    try:
        stored = set(interop.flat_params(ckpt.state_metadata(at)["params"]))
    except Exception:  # no readable metadata: restoring reports the checkpoint itself
        return
    want = set(interop.flat_params(target["params"]))
    if stored and stored < want:
        raise UsageError(
            f"{Path(run_dir) / BASE_FILE} is missing, but the checkpoint at step {at} in "
            f"{ckpt.directory} holds only this LoRA run's trainable parameters ({len(stored)} of "
            f"{len(want)}): that file names the frozen base they need. Put it back (from a "
            "backup, or copy it from a run made with the same --init-from), or start the run "
            "again with --overwrite.")


def restore_into(base: Optional[LoRABase], run_dir: str | Path, target: dict,
                 restore: Callable[[dict], Any], log: Callable[[str], None] = print,
                 place: Optional[Callable[[Any], Any]] = None,
                 arrays: Optional[dict[str, np.ndarray]] = None,
                 ckpt: Optional[Checkpoints] = None, step: Optional[int] = None) -> Any:
    """Calls ``restore(checkpoint target)`` and returns its result with the state's
    parameters reassembled (``base`` None: whole checkpoints, ``restore(target)`` as is).

    Args:
      base: the run's reference (``LoRABase.read``).
      run_dir: the run (for messages).
      target: the full abstract train state.
      restore: restores a checkpoint into a target; returns None, a state, or a tuple whose
        first state-like element (a dict with ``"params"``) is the state.
      log: receives one-line reports.
      place: puts the frozen tree (pruned like ``target["params"]``) on devices (default: the
        target's shardings, one device).
      arrays: the frozen parameters if already loaded (``LoRABase.load``).
      ckpt: the checkpoints ``restore`` reads; with ``base`` None, checked first by
        ``refuse_adapter_only`` (at ``step``, None: the newest).
      step: see ``ckpt``.

    Raises:
      UsageError: see ``LoRABase.load`` and ``refuse_adapter_only`` (checked before any
        checkpoint is read).
    """
    if base is None:
        if ckpt is not None:
            refuse_adapter_only(run_dir, ckpt, step, target)
        return restore(target)
    arrays = base.load(run_dir, log) if arrays is None else arrays
    result = restore(base.checkpoint_state(target))
    if result is None:
        return None
    frozen = set(base.frozen)
    named = {**{k: 0 for k in interop.flat_params(target["params"])}, **arrays}
    tree = prune(interop.unflatten_like(target["params"], named), lambda name: name in frozen)
    if place is None:
        shardings = prune(jax.tree.map(lambda a: a.sharding, target["params"]),
                          lambda name: name in frozen)
        placed = jax.tree.map(lambda a, s: jax.device_put(a, s), tree, shardings)
    else:
        placed = place(tree)
    full = interop.flat_params(placed)

    def fix(state):
        return {**state, "params": base.assemble(target["params"], state["params"], full)}

    if isinstance(result, tuple):
        return tuple(fix(x) if isinstance(x, dict) and "params" in x else x for x in result)
    return fix(result)
