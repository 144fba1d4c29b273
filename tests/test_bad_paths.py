"""Bad paths, tried as a new user would: every command, given a path of the wrong kind (a file
where a directory belongs, or the reverse), a place where nothing can be written, or what an
interrupted run leaves behind, prints one line ``unitscale-jax: error: ...`` naming the path
and what to do, exits with status 2, and changes nothing it was given.

``CASES`` is the table: a new command (or option) with a path is one more row. The rows run
in-process through ``unitscale_jax.cli.main``; ``test_unwritable_for_a_user`` (a directory
``chmod 500``, run as a non-root process) and ``test_the_whole_process_exits_cleanly`` run a
real ``python -m unitscale_jax.cli``.
"""

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import SMALL, subprocess_env
from tests.train.finetune_helpers import TINY, write_classification
from unitscale_jax.cli import main

ROOT = Path(__file__).resolve().parent.parent
TORCH = ROOT / "tests" / "interop" / "torch_decoder.safetensors"
TORCH_CONFIG = ROOT / "tests" / "interop" / "torch_decoder.json"
TRAIN = ["train", *SMALL, "--steps", "2", "--eval-every", "0", "--data-dir", "{tfds}"]
CONVERT = ["convert", "--from-torch", str(TORCH), "--config", str(TORCH_CONFIG)]
ANALYSE = ["analyse", "--d-model", "16", "--n-layers", "1", "--n-heads", "1"]
TOKENIZER = ["tokenizer", "train", "--vocab-size", "300"]
FINETUNE = ["finetune", "--task", "classify", *TINY, "--steps", "2"]
PREPARE = ["prepare", "--workers", "1"]
PLAN = ["plan", "--preset", "tiny", "--mesh", "fsdp=1"]

# what an interrupted (or foreign) run leaves in a run directory: {run:NAME} is a damaged copy
DAMAGES = {
    "empty_config": lambda r: (r / "config.json").write_text(""),
    "truncated_config": lambda r: (r / "config.json").write_text(
        (r / "config.json").read_text()[:300]),
    "config_is_a_dir": lambda r: ((r / "config.json").unlink(), (r / "config.json").mkdir()),
    "checkpoints_is_a_file": lambda r: (shutil.rmtree(r / "checkpoints"),
                                        (r / "checkpoints").write_text("")),
    "metrics_is_a_dir": lambda r: ((r / "metrics.jsonl").unlink(), (r / "metrics.jsonl").mkdir()),
    # killed while orbax wrote step 2: its items are there but not the train state
    "half_written_step": lambda r: shutil.rmtree(r / "checkpoints" / "2" / "state"),
    # killed before orbax renamed its temporary directory: no complete step at all
    "only_a_temp_dir": lambda r: (r / "checkpoints" / "2").rename(
        r / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000"),
}

AGAIN = "pass --overwrite to start a new run there, or another --run-dir"
PROC = "/proc/unitscale-jax-test"  # nothing can be created under /proc, not even by root

CASES = [
    # (command, what is wrong, argv, the error line holds)
    ("train", "run dir is a file", [*TRAIN, "--run-dir", "{file}"],
     "--run-dir {file} is a file, not a directory; pass another --run-dir"),
    ("train", "run dir under a file", [*TRAIN, "--run-dir", "{file}/run"],
     "--run-dir {file}/run: {file} is a file, not a directory"),
    ("train", "run dir cannot be created", [*TRAIN, "--run-dir", f"{PROC}/run"],
     f"--run-dir {PROC}/run: cannot create it"),
    ("train", "empty config.json", [*TRAIN, "--run-dir", "{run:empty_config}"],
     "{run:empty_config}/config.json is not a valid run config (Expecting value"),
    ("train", "truncated config.json", [*TRAIN, "--run-dir", "{run:truncated_config}"],
     "{run:truncated_config}/config.json is not a valid run config"),
    ("train", "config.json is a directory", [*TRAIN, "--run-dir", "{run:config_is_a_dir}"],
     "{run:config_is_a_dir}/config.json is a directory; " + AGAIN),
    ("train", "checkpoints is a file", [*TRAIN, "--run-dir", "{run:checkpoints_is_a_file}"],
     "{run:checkpoints_is_a_file}/checkpoints is a file, not a directory; " + AGAIN),
    ("train", "metrics.jsonl is a directory", [*TRAIN, "--run-dir", "{run:metrics_is_a_dir}"],
     "{run:metrics_is_a_dir}/metrics.jsonl is a directory; " + AGAIN),
    ("train", "--config is a directory", [*TRAIN, "--config", "{dir}", "--run-dir", "{out}/r"],
     "--config {dir} is a directory; pass a config.json file"),
    ("train", "--data is a directory", [*TRAIN, "--data", "{dir}", "--run-dir", "{out}/r"],
     "{dir} is a directory; pass its files or a glob such as '{dir}/*.txt'"),
    ("train", "--data-dir is a file", [*TRAIN, "--data-dir", "{file}", "--run-dir", "{out}/r"],
     "--data-dir {file} is a file, not a directory; pass a directory for the prepared"),
    ("train", "--data-dir cannot be created",
     [*TRAIN, "--data-dir", f"{PROC}/tfds", "--run-dir", "{out}/r"],
     f"--data-dir {PROC}/tfds: cannot create it"),
    ("train", "--init-from a directory with no run", [*TRAIN, "--init-from", "{dir}",
                                                      "--run-dir", "{out}/r"],
     "--init-from {dir}: no config.json there"),
    ("train", "--tokenizer hf: a directory", [*TRAIN, "--tokenizer", "hf:{dir}", "--run-dir",
                                              "{out}/r"],
     "--tokenizer {dir} is a directory; pass the tokenizer's file (tokenizer.json for hf:"),
    ("train", "--data prepared: a file", [*TRAIN, "--data", "prepared:{file}", "--run-dir",
                                          "{out}/r"],
     "--data prepared:{file}: {file} is a file, not a directory; pass the --out directory of "
     "'unitscale-jax prepare'"),
    ("train", "--data prepared: no manifest", [*TRAIN, "--data", "prepared:{dir}", "--run-dir",
                                               "{out}/r"],
     "--data prepared:{dir}: {dir} holds no manifest.json; pass the --out directory"),
    ("train", "--data prepared: missing", [*TRAIN, "--data", "prepared:{out}/none", "--run-dir",
                                           "{out}/r"],
     "--data prepared:{out}/none: {out}/none: no such directory; prepare the corpus first"),

    ("prepare", "--out is a file", [*PREPARE, "--data", "{file}", "--out", "{file}"],
     "--out {file} is a file, not a directory; pass a new directory, or that of an earlier "
     "prepare to resume it"),
    ("prepare", "--out under a file", [*PREPARE, "--data", "{file}", "--out", "{file}/p"],
     "--out {file}/p: {file} is a file, not a directory"),
    ("prepare", "--out cannot be created", [*PREPARE, "--data", "{file}", "--out", f"{PROC}/p"],
     f"--out {PROC}/p: cannot create it"),
    ("prepare", "--out holds other files", [*PREPARE, "--data", "{file}", "--out", "{labelled}"],
     "--out {labelled} is not empty and holds no manifest.json; pass a new or empty directory"),
    ("prepare", "--data is a directory", [*PREPARE, "--data", "{dir}", "--out", "{out}/p"],
     "{dir} is a directory; pass its files or a glob"),
    ("prepare", "--data does not exist", [*PREPARE, "--data", "{out}/none.txt", "--out",
                                          "{out}/p"],
     "data file not found: {out}/none.txt"),
    ("prepare", "--tokenizer hf: a directory", [*PREPARE, "--data", "{file}", "--tokenizer",
                                                "hf:{dir}", "--out", "{out}/p"],
     "--tokenizer {dir} is a directory; pass the tokenizer's file"),

    ("sample", "run dir is a file", ["sample", "--run-dir", "{file}"],
     "--run-dir {file} is a file, not a directory; pass the run directory"),
    ("sample", "empty config.json", ["sample", "--run-dir", "{run:empty_config}"],
     "{run:empty_config}/config.json is not a valid run config"),
    ("sample", "config.json is a directory", ["sample", "--run-dir", "{run:config_is_a_dir}"],
     "{run:config_is_a_dir}/config.json is a directory; pass the directory of a complete run"),
    ("sample", "checkpoints is a file", ["sample", "--run-dir", "{run:checkpoints_is_a_file}"],
     "--run-dir {run:checkpoints_is_a_file}: no checkpoints directory"),
    ("sample", "half-written checkpoint", ["sample", "--run-dir", "{run:half_written_step}"],
     "--run-dir {run:half_written_step}: no complete checkpoint there (skipped step 2 (corrupt "
     "or incomplete"),
    ("sample", "half-written --step", ["sample", "--run-dir", "{run:half_written_step}",
                                       "--step", "2"],
     "--step 2: the checkpoint in {run:half_written_step}/checkpoints/2 is corrupt or incomplete"),
    ("sample", "only a temp dir", ["sample", "--run-dir", "{run:only_a_temp_dir}"],
     "no complete checkpoint there (skipped 2.orbax-checkpoint-tmp-1700000000 (incomplete"),

    ("analyse", "--out is a file", [*ANALYSE, "--out", "{file}"],
     "--out {file} is a file, not a directory"),
    ("analyse", "--out under a file", [*ANALYSE, "--out", "{file}/a"],
     "--out {file}/a: {file} is a file, not a directory"),
    ("analyse", "--out cannot be created", [*ANALYSE, "--out", f"{PROC}/a"],
     f"--out {PROC}/a: cannot create it"),
    ("analyse", "--data is a directory", [*ANALYSE, "--data", "{dir}", "--out", "{out}/a"],
     "--data {dir} is a directory; pass 'builtin', 'random' or a UTF-8 text file"),

    ("tokenizer", "--out is a directory", [*TOKENIZER, "--data", "{file}", "--out", "{dir}"],
     "--out {dir} is a directory; pass a file name such as {dir}/tokenizer.json"),
    ("tokenizer", "--out under a file", [*TOKENIZER, "--data", "{file}", "--out",
                                         "{file}/t.json"],
     "--out {file}/t.json: {file} is a file, not a directory"),
    ("tokenizer", "--out not writable", [*TOKENIZER, "--data", "{file}", "--out",
                                         "/proc/t.json"],
     "--out /proc/t.json: cannot write in /proc"),
    ("tokenizer", "--data is a directory", [*TOKENIZER, "--data", "{dir}", "--out",
                                            "{out}/t.json"],
     "{dir} is a directory; pass its files or a glob"),

    ("convert", "--from-torch is a directory",
     ["convert", "--from-torch", "{dir}", "--config", str(TORCH_CONFIG), "--run-dir", "{out}/c"],
     "--from-torch {dir} is a directory; pass the state dict file"),
    ("convert", "--config is a directory",
     ["convert", "--from-torch", str(TORCH), "--config", "{dir}", "--run-dir", "{out}/c"],
     "--config {dir} is a directory; pass the JSON file of the torch model's hyperparameters"),
    ("convert", "run dir is a file", [*CONVERT, "--run-dir", "{file}"],
     "--run-dir {file} is a file, not a directory; pass a new directory"),
    ("convert", "run dir under a file", [*CONVERT, "--run-dir", "{file}/c"],
     "--run-dir {file}/c: {file} is a file, not a directory"),
    ("convert", "run dir cannot be created", [*CONVERT, "--run-dir", f"{PROC}/c"],
     f"--run-dir {PROC}/c: cannot create it"),
    ("convert", "run dir of an interrupted run", [*CONVERT, "--run-dir", "{run:empty_config}"],
     "--run-dir {run:empty_config} already holds a run; pass a new directory"),

    ("export", "--out is a directory", ["export", "--run-dir", "{run}", "--out", "{dir}"],
     "--out {dir} is a directory; pass a file name such as {dir}/model.safetensors"),
    ("export", "--out under a file", ["export", "--run-dir", "{run}", "--out", "{file}/m.st"],
     "--out {file}/m.st: {file} is a file, not a directory"),
    ("export", "--out not writable", ["export", "--run-dir", "{run}", "--out", "/proc/m.st"],
     "--out /proc/m.st: cannot write in /proc"),
    ("export", "run dir is a file", ["export", "--run-dir", "{file}"],
     "--run-dir {file} is a file, not a directory; pass the run directory"),
    ("export", "truncated config.json", ["export", "--run-dir", "{run:truncated_config}"],
     "{run:truncated_config}/config.json is not a valid run config"),
    ("export", "half-written checkpoint", ["export", "--run-dir", "{run:half_written_step}",
                                           "--out", "{out}/m.safetensors"],
     "--run-dir {run:half_written_step}: no complete checkpoint there (skipped step 2"),
    ("merge", "run dir is a file", ["merge", "--run-dir", "{file}"],
     "--run-dir {file} is a file, not a directory; pass the run directory"),
    ("merge", "a run with no adapters", ["merge", "--run-dir", "{run}", "--out",
                                         "{out}/m.safetensors"],
     "--run-dir {run}"),
    ("merge", "truncated config.json", ["merge", "--run-dir", "{run:truncated_config}"],
     "{run:truncated_config}/config.json is not a valid run config"),
    ("grow", "--from is a file", ["grow", "--from", "{file}", "--depth", "2x", "--run-dir",
                                  "{out}/g"],
     "--from {file} is a file, not a directory; pass the run directory"),
    ("grow", "truncated config.json", ["grow", "--from", "{run:truncated_config}", "--depth",
                                       "2x", "--run-dir", "{out}/g"],
     "{run:truncated_config}/config.json is not a valid run config"),
    ("grow", "half-written checkpoint", ["grow", "--from", "{run:half_written_step}",
                                         "--depth", "2x", "--run-dir", "{out}/g"],
     "--from {run:half_written_step}: no complete checkpoint there (skipped step 2"),
    ("grow", "run dir holds a run", ["grow", "--from", "{run}", "--depth", "2x", "--run-dir",
                                     "{run:empty_config}"],
     "--run-dir {run:empty_config} already holds a run; pass a new directory"),
    ("grow", "run dir is a file", ["grow", "--from", "{run}", "--depth", "2x", "--run-dir",
                                   "{file}"],
     "--run-dir {file} is a file, not a directory; pass another --run-dir"),
    ("grow", "run dir cannot be created", ["grow", "--from", "{run}", "--depth", "2x",
                                           "--run-dir", f"{PROC}/g"],
     f"--run-dir {PROC}/g: cannot create it"),
    ("plan", "--json is a directory", [*PLAN, "--json", "{dir}"],
     "--json {dir} is a directory; pass a file name such as {dir}/plan.json"),
    ("plan", "--json under a file", [*PLAN, "--json", "{file}/plan.json"],
     "--json {file}/plan.json: {file} is a file, not a directory"),
    ("plan", "--json not writable", [*PLAN, "--json", "/proc/plan.json"],
     "--json /proc/plan.json: cannot write in /proc"),
    ("plan", "--config is a directory", [*PLAN, "--config", "{dir}"],
     "--config {dir} is a directory; pass a config.json file"),
    ("plan", "--tokenizer hf: a directory", [*PLAN, "--tokenizer", "hf:{dir}"],
     "--tokenizer {dir} is a directory; pass the tokenizer's file"),
    ("finetune", "--data is a file", [*FINETUNE, "--data", "{file}", "--run-dir", "{out}/f"],
     "{file}: not a directory; pass a directory holding train.* / dev.* / test.* files"),
    ("finetune", "--data has no splits", [*FINETUNE, "--data", "{dir}", "--run-dir", "{out}/f"],
     "no train.*, dev.*, validation.* or test.* file"),
    ("finetune", "--train is a directory", [*FINETUNE, "--train", "{dir}", "--dev",
                                            "{labelled}/dev.tsv", "--run-dir", "{out}/f"],
     "{dir} is a directory; pass a .tsv, .csv or .jsonl file"),
    ("finetune", "run dir is a file", [*FINETUNE, "--data", "{labelled}", "--run-dir", "{file}"],
     "--run-dir {file} is a file, not a directory; pass another --run-dir"),
    ("finetune", "run dir cannot be created", [*FINETUNE, "--data", "{labelled}", "--run-dir",
                                               f"{PROC}/f"],
     f"--run-dir {PROC}/f: cannot create it"),
    ("finetune", "--init-from is a file", [*FINETUNE, "--data", "{labelled}", "--init-from",
                                           "{file}", "--run-dir", "{out}/f"],
     "--init-from {file} is not a readable safetensors file"),
    ("finetune", "--init-from is not an encoder run", [*FINETUNE, "--data", "{labelled}",
                                                       "--init-from", "{run}", "--run-dir",
                                                       "{out}/f"],
     "--init-from {run}"),
    ("finetune", "--tokenizer hf: a directory", [*FINETUNE, "--data", "{labelled}",
                                                 "--tokenizer", "hf:{dir}", "--run-dir",
                                                 "{out}/f"],
     "--tokenizer {dir} is a directory; pass the tokenizer's file"),
    ("evaluate", "run dir is a file", ["evaluate", "--run-dir", "{file}", "--data", "{file}"],
     "--run-dir {file} is a file; pass a fine-tuning run directory"),
    ("evaluate", "not a fine-tuning run", ["evaluate", "--run-dir", "{run}", "--data", "{file}"],
     "--run-dir {run} is not a fine-tuning run"),
    ("predict", "run dir is a file", ["predict", "--run-dir", "{file}", "--data", "{file}",
                                      "--out", "{out}/p.tsv"],
     "--run-dir {file} is a file; pass a fine-tuning run directory"),
    ("predict", "--out is a directory", ["predict", "--run-dir", "{run}", "--data", "{file}",
                                         "--out", "{dir}"],
     "--out {dir} is a directory; pass a file path"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``{"inputs", "run", "tfds"}``: a tiny trained run (two steps, checkpoint at step 2) in
    ``inputs`` (what the commands are given; they must not change it) and the tfds directory
    of the built-in corpus it was trained on."""
    base = tmp_path_factory.mktemp("bad_paths")
    inputs, tfds = base / "inputs", str(base / "tfds")
    inputs.mkdir()
    run = inputs / "run"
    assert main([a.format(tfds=tfds) for a in TRAIN] + ["--run-dir", str(run)]) == 0
    assert (run / "checkpoints" / "2" / "state").is_dir()
    (inputs / "notes.txt").write_text("Some words to train a tokenizer on.\n" * 50)
    (inputs / "folder").mkdir()
    write_classification(inputs / "labelled")
    return {"inputs": inputs, "run": run, "tfds": tfds}


def _fill(text: str, world: dict, out: Path, **more: Path) -> str:
    """``text`` with ``{file}``, ``{dir}``, ``{run}``, ``{run:DAMAGE}``, ``{out}``, ``{tfds}``
    and the names in ``more`` replaced (a ``{run:DAMAGE}`` is made once per test: a copy of the
    run, damaged)."""
    def one(m):
        name, damage = m.group(1), m.group(2)
        if name == "run" and damage:
            copy = world["inputs"] / damage
            if not copy.exists():
                shutil.copytree(world["run"], copy)
                DAMAGES[damage](copy)
            return str(copy)
        return str({"file": world["inputs"] / "notes.txt", "dir": world["inputs"] / "folder",
                    "labelled": world["inputs"] / "labelled",
                    "run": world["run"], "out": out, "tfds": world["tfds"], **more}[name])
    return re.sub(r"\{(\w+)(?::(\w+))?\}", one, text)


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` with its kind and, for files, a digest of the contents."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                       if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def _one_error_line(rc, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("unitscale-jax: error: "), lines[0]
    return lines[0]


@pytest.fixture
def clean_inputs(world):
    """Removes the damaged copies a test made (the run and the plain inputs stay)."""
    yield
    for name in DAMAGES:
        shutil.rmtree(world["inputs"] / name, ignore_errors=True)


@pytest.mark.parametrize("command, what, argv, needle", CASES,
                         ids=[f"{c}: {w}" for c, w, _, _ in CASES])
def test_bad_path(world, tmp_path, capsys, clean_inputs, command, what, argv, needle):
    argv = [_fill(a, world, tmp_path) for a in argv]
    assert argv[0] == command
    before = _snapshot(world["inputs"])
    rc = main(argv)
    out, err = capsys.readouterr()
    line = _one_error_line(rc, err)
    assert _fill(needle, world, tmp_path) in line, line
    assert _snapshot(world["inputs"]) == before, "the command changed what it was given"


def test_every_command_has_a_row():
    """Each command with a path option is in the table (a new one needs its rows)."""
    from unitscale_jax.cli import USAGE
    listed = set(re.findall(r"^  (\w+) ", USAGE, flags=re.M))
    covered = {c for c, _, _, _ in CASES}
    assert listed == covered, f"no rows for {sorted(listed - covered)}; rows for unknown " \
                              f"commands {sorted(covered - listed)}"


def test_sample_reads_around_a_leftover_temp_dir_and_leaves_it(world, tmp_path, capsys):
    """A temporary directory next to a complete checkpoint (a save killed, or one in progress)
    is reported on stderr and left alone: reading a run writes nothing into it."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    tmp = run / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000"
    tmp.mkdir()
    before = _snapshot(run)
    assert main(["sample", "--run-dir", str(run), "--max-new-tokens", "2"]) == 0
    _, err = capsys.readouterr()
    assert f"ignoring incomplete checkpoint {tmp.name}" in err and "sampled from" in err, err
    assert _snapshot(run) == before


# --------------------------------------------------------------------------- real processes

# The child drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its capability bounding set and
# execs the command, so that even root is held to a directory's permission bits there.
_AS_A_USER = """import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
        sys.exit("prctl(PR_CAPBSET_DROP): " + os.strerror(ctypes.get_errno()))
os.execv(sys.executable, [sys.executable, "-m", "unitscale_jax.cli", *sys.argv[1:]])
"""


def _cli(argv, tmp_path, *, as_a_user=False):
    """Runs ``python -m unitscale_jax.cli argv``; with ``as_a_user`` and root, without root's
    power to ignore file permissions."""
    head = ([sys.executable, "-c", _AS_A_USER] if as_a_user and os.geteuid() == 0
            else [sys.executable, "-m", "unitscale_jax.cli"])
    return subprocess.run([*head, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=subprocess_env(str(tmp_path / "jax_cache")))


UNWRITABLE = [
    ("train", [*TRAIN, "--run-dir", "{locked}/run"],
     "--run-dir {locked}/run: cannot create it (Permission denied)"),
    ("tokenizer", [*TOKENIZER, "--data", "{file}", "--out", "{locked}/t.json"],
     "--out {locked}/t.json: cannot write in {locked} (Permission denied)"),
]


@pytest.mark.parametrize("command, argv, needle", UNWRITABLE, ids=[c for c, _, _ in UNWRITABLE])
def test_unwritable_for_a_user(world, tmp_path, command, argv, needle):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)  # 500
    try:
        p = _cli([_fill(a, world, tmp_path, locked=locked) for a in argv], tmp_path,
                 as_a_user=True)
        line = _one_error_line(p.returncode, p.stderr)
        assert _fill(needle, world, tmp_path, locked=locked) in line, line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(stat.S_IRWXU)


def test_the_whole_process_exits_cleanly(world, tmp_path, clean_inputs):
    """Through a real process (orbax's threads and all): one line, status 2, nothing else."""
    run = _fill("{run:half_written_step}", world, tmp_path)
    before = _snapshot(Path(run))
    p = _cli(["sample", "--run-dir", run], tmp_path)
    line = _one_error_line(p.returncode, p.stderr)
    assert f"--run-dir {run}: no complete checkpoint there (skipped step 2" in line, line
    assert p.stdout == ""
    assert _snapshot(Path(run)) == before


def test_write_text_atomic_leaves_the_old_file_or_the_new_one(tmp_path):
    """How config.json is written: an interrupted write keeps the old contents, no temp file
    stays behind, and the file gets the usual permissions."""
    from unitscale_jax.paths import write_text_atomic
    target = tmp_path / "config.json"
    write_text_atomic(target, "old\n")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(TypeError):
        write_text_atomic(target, b"not text")  # fails inside the write, as a kill would
    assert target.read_text() == "old\n"
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
