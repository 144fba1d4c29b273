"""The dependency direction: what each layer may import (import-linter enforces the rest)."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "unitscale_jax"


def _fresh_import(module: str) -> set[str]:
    """The modules a fresh interpreter has loaded after ``import module``."""
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120)
    return set(out.stdout.split())


def test_optim_does_not_load_the_models():
    loaded = _fresh_import("unitscale_jax.optim")
    ours = {m for m in loaded if m.startswith("unitscale_jax")}
    assert not {m for m in ours if m.startswith("unitscale_jax.nn")}, sorted(ours)
    assert ours <= {"unitscale_jax", "unitscale_jax.params"} | {
        m for m in ours if m.startswith("unitscale_jax.optim")}, sorted(ours)


def test_ops_and_metadata_stand_alone():
    ours = {m for m in _fresh_import("unitscale_jax.ops") if m.startswith("unitscale_jax")}
    assert all(m == "unitscale_jax" or m.startswith("unitscale_jax.ops") for m in ours), ours
    for bottom in ("unitscale_jax.params", "unitscale_jax.taps"):
        ours = {m for m in _fresh_import(bottom) if m.startswith("unitscale_jax")}
        assert ours == {"unitscale_jax", bottom}, ours


def test_every_private_module_is_guarded_by_a_contract():
    """A new ``_private`` module must be added to the import-linter contracts."""
    on_disk = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in PACKAGE.rglob("_*.py") if not p.name.startswith("__")
    }
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    guarded = {m for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "forbidden"
               for m in c["forbidden_modules"]}
    assert on_disk == guarded, (f"unguarded: {sorted(on_disk - guarded)}; "
                                f"stale: {sorted(guarded - on_disk)}")
