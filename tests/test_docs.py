"""The documentation site (mkdocs.yml, docs/): its examples run, every public module has a
reference page, and the hooks that bring in the CLI help, the presets and the results
write-ups work. `make docs` (in .ci/run) builds the whole site with warnings as errors."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "unitscale_jax"
# documented elsewhere: the command's help text (training guide), a re-export of optim.checks
NOT_A_PAGE = {"unitscale_jax.cli", "unitscale_jax.checks", "unitscale_jax.train.__main__"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pages() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(DOCS.rglob("*.md"))}


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_every_python_example_in_the_docs_runs():
    blocks = [(p, code) for p, text in _pages().items() for code in _python_blocks(text)]
    assert len(blocks) >= 3, [str(p) for p, _ in blocks]
    for path, code in blocks:
        try:
            exec(compile(code, str(path), "exec"), {"__name__": "docs_example"})
        except Exception as e:  # noqa: BLE001 - name the page whose example broke
            raise AssertionError(f"the example in {path.relative_to(ROOT)} fails: {e!r}") from e


def test_every_public_module_has_a_reference_page():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts)
               for p in PACKAGE.rglob("*.py")
               if not p.name.startswith("_") or p.name == "__init__.py"}
    modules = {m.removesuffix(".__init__") for m in modules} - NOT_A_PAGE - {"unitscale_jax"}
    documented = {m for text in _pages().values()
                  for m in re.findall(r"^::: (unitscale_jax[\w.]*)$", text, flags=re.M)}
    assert modules <= documented, f"no ::: page for {sorted(modules - documented)}"


def test_rst_simple_tables_become_markdown_tables():
    rst = _load("griffe_rst")
    text = ("Roles:\n\n"
            "  ======  =====  ==========\n"
            "  name    kind   what\n"
            "  ======  =====  ==========\n"
            "  ``a``   x|y    first line\n"
            "                 continued\n"
            "  b       z      one\n"
            "  ======  =====  ==========\n\n"
            "=====  ===\n``q``  no header\n=====  ===\nafter")
    assert rst.simple_tables_to_markdown(text).split("\n") == [
        "Roles:", "",
        "  | name | kind | what |", "  |---|---|---|",
        "  | ``a`` | x\\|y | first line continued |", "  | b | z | one |", "",
        "|  |  |", "|---|---|", "| ``q`` | no header |", "after"]
    assert rst.literal_markers_to_markdown("Each is::\n\n    code\nAs code ::\n\n    x") == (
        "Each is:\n\n    code\nAs code\n\n    x")


def test_every_rst_table_in_the_package_is_converted():
    rst = _load("griffe_rst")
    border = re.compile(rst.BORDER.pattern, re.M)
    tables = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        for doc in re.findall(r'"""(.*?)"""', path.read_text(), flags=re.S):
            if border.search(doc):
                tables += 1
                converted = rst.simple_tables_to_markdown(doc)
                assert not border.search(converted), path
                assert "|---|" in converted, path
    assert tables >= 5


def test_cli_help_and_presets_are_generated_into_the_training_guide():
    from unitscale_jax.train import presets
    hooks = _load("hooks")
    page = (DOCS / "training.md").read_text()
    out = hooks.on_page_markdown(page, page=None, config=None, files=None)
    assert "<!-- cli-help" not in out and "<!-- presets -->" not in out
    for command in ("train", "sample", "analyse", "prepare"):
        assert f"usage: unitscale-jax {command}" in out
    assert "--loss-scale FLOAT" in out
    for name, make in presets.PRESETS.items():
        cfg = make()
        assert f"| `{name}` | {cfg.model.d_model} | {cfg.model.n_layers} |" in out
    with pytest.raises(ValueError, match="unknown command"):
        hooks.on_page_markdown("<!-- cli-help: nope -->", page=None, config=None, files=None)


def test_results_write_ups_and_their_images_become_site_files(tmp_path):
    from mkdocs.structure.files import Files
    hooks = _load("hooks")
    files = hooks.on_files(Files([]), {"site_dir": str(tmp_path), "use_directory_urls": True})
    served = {f.src_uri for f in files}
    write_ups = sorted(p for d in ("experiments/results", "benchmarks/results")
                       for p in (ROOT / d).glob("*.md"))
    assert write_ups
    for md in write_ups:
        rel = md.relative_to(ROOT)
        assert rel.as_posix() in served
        for target in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md.read_text()):
            assert (rel.parent / target).as_posix() in served, (md, target)
