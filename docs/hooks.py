"""mkdocs hooks (``hooks:`` in mkdocs.yml): the parts of the site that come from the repository.

* ``on_files``: the results write-ups (``experiments/results/*.md``,
  ``benchmarks/results/*.md``) and the images they show become pages and files at their
  repository paths, read where they are (nothing is copied into ``docs/``), so their
  relative links keep working.
* ``on_page_markdown``: a line ``<!-- cli-help: train -->`` (or ``sample``, ``analyse``,
  ``prepare``, ``main``) becomes that command's ``--help`` text, and ``<!-- presets -->`` the
  table of the trainer's presets, both generated from the code that parses the flags.
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULT_GLOBS = ("experiments/results/*.md", "experiments/results/*.png",
                "benchmarks/results/*.md", "benchmarks/results/*.png")
HELP_WIDTH = 80
MARKER = re.compile(r"^<!-- (cli-help: (?P<command>[a-z]+)|(?P<presets>presets)) -->$", re.M)


def on_files(files, config):
    for pattern in RESULT_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            files.append(File(path.relative_to(ROOT).as_posix(), src_dir=str(ROOT),
                              dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
    return files


def _help(command: str) -> str:
    from unitscale_jax import cli
    from unitscale_jax.analysis import cli as analysis_cli
    from unitscale_jax.train import flags, presets

    if command == "main":
        return cli.USAGE
    parsers = {"train": lambda: flags.train_parser(presets.get_preset("tiny")),
               "sample": flags.sample_parser, "analyse": analysis_cli.parser,
               "prepare": flags.prepare_parser}
    if command not in parsers:
        raise ValueError(f"docs: unknown command in <!-- cli-help: {command} -->; use one of "
                         f"main, {', '.join(parsers)}.")
    parser = parsers[command]()
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=HELP_WIDTH)
    return parser.format_help()


def _presets_table() -> str:
    from unitscale_jax.train import presets

    columns = [("model", "d_model"), ("model", "n_layers"), ("model", "n_heads"),
               ("data", "seq_len"), ("training", "steps"), ("training", "batch_size")]
    rows = ["| preset | " + " | ".join(f"`{name}`" for _, name in columns) + " |",
            "|---" * (len(columns) + 1) + "|"]
    for name, make in presets.PRESETS.items():
        cfg = make()
        values = [getattr(getattr(cfg, section), field) for section, field in columns]
        rows.append(f"| `{name}` | " + " | ".join(map(str, values)) + " |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    def replace(m: re.Match) -> str:
        if m.group("presets"):
            return _presets_table()
        return "```text\n" + _help(m.group("command")).rstrip() + "\n```"

    return MARKER.sub(replace, markdown)
