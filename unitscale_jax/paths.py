"""Checks of the paths a user names: the right kind (file or directory), present, writable.

Every command checks its paths here, before it starts work, so a path of the wrong kind, a
missing input or a place where nothing can be written is one line that names the option, the
path, what is wrong and what to do (``PathError``; the command line prints it as
``unitscale-jax: error: ...``), never an ``OSError`` traceback from deep inside a library.
``write_text_atomic`` writes small files (a run's ``config.json``) so that an interrupted run
leaves the old file or the new one, never half of one.

The ``what`` argument of each check is the option the path came from (``"--run-dir"``); the
messages start with it and the path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import Iterator, Literal, Optional

__all__ = ["PathError", "MissingPathError", "check_kind", "existing_file", "output_dir",
           "output_file", "atomic_path", "write_text_atomic", "first_missing",
           "removed_if_left_empty"]

Kind = Literal["file", "dir"]


class PathError(ValueError):
    """A path of the wrong kind, or one where nothing can be written (message: one line)."""


class MissingPathError(PathError, FileNotFoundError):
    """An input path that does not exist (also a ``FileNotFoundError``)."""


def _label(path: Path, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def _file_ancestor(path: Path) -> Optional[Path]:
    """The nearest existing ancestor of ``path`` when it is not a directory (else None)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _kind_name(path: Path) -> str:
    return "a directory" if path.is_dir() else "a file" if path.is_file() else "a special file"


def check_kind(path: str | os.PathLike, kind: Kind, what: str = "", fix: str = "") -> Path:
    """``path`` as a ``Path``, unless it, or one of its ancestors, exists as something else.

    A missing path passes (``existing_file`` also requires it to exist).

    Args:
      path: the path to check.
      kind: ``"file"`` or ``"dir"``, what ``path`` must be if it exists.
      what: the option it came from, for the message.
      fix: what to do instead (default: pass a file, or a directory).

    Raises:
      PathError: ``path`` is of the other kind (or a device, a socket...), or an ancestor is
        a file.
    """
    p = Path(path)
    label = _label(p, what)
    wanted = "a file" if kind == "file" else "a directory"
    if p.exists() and not (p.is_file() if kind == "file" else p.is_dir()):
        found = _kind_name(p)
        what_it_is = found if found == "a directory" else f"{found}, not {wanted}"
        raise PathError(f"{label} is {what_it_is}; {fix or 'pass ' + wanted}.")
    blocker = _file_ancestor(p)
    if blocker is not None:
        raise PathError(f"{label}: {blocker} is a file, not a directory; "
                        f"{fix or 'choose another path'}.")
    return p


def existing_file(path: str | os.PathLike, what: str = "", expect: str = "a file") -> Path:
    """``path`` as a ``Path`` if it is a file this process may read.

    Args:
      path: the input file.
      what: the option it came from.
      expect: what the user should pass instead of a directory (``"a .safetensors file"``).

    Raises:
      MissingPathError: nothing is there.
      PathError: a directory (or an ancestor is a file), or not readable.
    """
    p = check_kind(path, "file", what, f"pass {expect}")
    label = _label(p, what)
    if not p.exists():
        raise MissingPathError(f"{label}: no such file; check the path.")
    if not os.access(p, os.R_OK):
        raise PathError(f"{label}: cannot read it (permission denied); fix its permissions or "
                        "pass a copy you can read.")
    return p


def _probe(directory: Path, label: str, fix: str) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-", suffix=".tmp"):
            pass
    except OSError as e:
        raise PathError(f"{label}: cannot write in {directory} ({e.strerror or e}); "
                        f"{fix}.") from None


def output_dir(path: str | os.PathLike, what: str = "", fix: str = "choose another path", *,
               probe: bool = True) -> Path:
    """Creates directory ``path`` (and its parents) if missing and checks files can be
    created in it.

    Args:
      path: the output directory.
      what: the option it came from.
      fix: what to do when it cannot be used.
      probe: also create and delete a temporary file in it (off for directories that may be
        read-only when they already hold what is needed, such as a prepared tfds directory).

    Raises:
      PathError: a file is there or at an ancestor, or it cannot be created or written in.
    """
    p = check_kind(path, "dir", what, fix)
    label = _label(p, what)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PathError(f"{label}: cannot create it ({e.strerror or e}); {fix}.") from None
    if probe:
        _probe(p, label, fix)
    return p


def output_file(path: str | os.PathLike, what: str = "", example: str = "") -> Path:
    """Checks a file can be created (or replaced) at ``path``; its directory must exist.

    Args:
      path: the file to write.
      what: the option it came from.
      example: a file name to suggest when ``path`` is a directory (``"model.safetensors"``).

    Raises:
      PathError: ``path`` is a directory, its directory is missing or a file, or nothing can
        be written there.
    """
    p = Path(path)
    label = _label(p, what)
    if p.is_dir():
        such = f" such as {p / example}" if example else ""
        raise PathError(f"{label} is a directory; pass a file name{such}.")
    check_kind(p, "file", what)
    if not p.parent.is_dir():
        raise PathError(f"{label}: {p.parent} does not exist; create that directory or choose "
                        "another path.")
    _probe(p.parent, label, "choose another path")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in ``path``'s directory to write to, renamed over ``path`` when the
    block ends without an error (removed otherwise): a reader, or the next run after a kill,
    sees the old file or the new one, never a truncated one."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8, line ends as given) to ``path`` through ``atomic_path``. The file
    gets the usual permissions (``0o666`` less the umask)."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def first_missing(path: str | os.PathLike) -> Optional[Path]:
    """The topmost of ``path`` and its ancestors that does not exist (what ``mkdir(parents=True)``
    would create first), or None when ``path`` exists."""
    p = Path(path).absolute()
    if p.exists():
        return None
    while not p.parent.exists() and p.parent != p:
        p = p.parent
    return p


def _remove_empty_tree(root: Path) -> None:
    if not root.is_dir() or root.is_symlink():
        return
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            _remove_empty_tree(child)
    with contextlib.suppress(OSError):  # not empty (a file is there): keep it
        root.rmdir()


@contextlib.contextmanager
def removed_if_left_empty(created: Optional[Path]) -> Iterator[None]:
    """Runs the block; if it raises, removes ``created`` (a directory this command made, see
    ``first_missing``) and the directories under it, if no file was written there.

    So a command that fails on bad input leaves no empty output directory behind, and never
    deletes a file. ``created=None`` (the directory was there before) does nothing.
    """
    try:
        yield
    except BaseException:
        if created is not None:
            _remove_empty_tree(created)
        raise
