"""tensorflow-datasets builders for local text files and the built-in corpus (no TensorFlow needed).

Both are ordinary ``tfds.core.GeneratorBasedBuilder`` subclasses, registered with tfds under
``unitscale_local_text`` and ``unitscale_pydoc_topics``. They are prepared with
``file_format="array_record"``: tfds then writes its own ``tf.train.Example`` protos (from
``tensorflow_datasets.proto``, pure protobuf) into ArrayRecord shards and reads them back with
``builder.as_data_source()`` (``ArrayRecordDataSource``, random access, parsed with NumPy), which
is what grain consumes. TensorFlow is never imported. (In tfds 4.9.10 ``DatasetInfo`` must be
built directly: ``dataset_info_from_configs`` looks for metadata files next to the module.)

Each record is ``{"text": str (one chunk, see ``corpus``), "document": str (file path or topic),
"chunk": int32 (index of the chunk in its document)}``; splits ``train`` and, when the validation
fraction is positive, ``validation``. A config's name is a digest of everything that determines
its records (paths with sizes and modification times, or the topics' text; the fraction; the
chunk size), so changed inputs are rebuilt and unchanged ones are read back from ``data_dir``.
A record's key (which sets its place in the split) is its document's position in the input list
and its chunk index, not the path: the same files elsewhere give the same records in the same
order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from unitscale_jax.data import corpus

__all__ = ["TextConfig", "LocalText", "PydocTopics", "local_text_builder", "builtin_builder",
           "prepare", "quiet_tfds", "check_settings", "DEFAULT_CHUNK_CHARS",
           "DEFAULT_VALIDATION_FRACTION"]

DEFAULT_CHUNK_CHARS = 4096
DEFAULT_VALIDATION_FRACTION = 0.05


@dataclasses.dataclass(eq=False)
class TextConfig(tfds.core.BuilderConfig):
    """Config of the text builders: input ``paths`` (local text only), split and chunking."""

    paths: tuple[str, ...] = ()
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    chunk_chars: int = DEFAULT_CHUNK_CHARS


def _text_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "text": tfds.features.Text(),
        "document": tfds.features.Text(),
        "chunk": tfds.features.Scalar(dtype=np.int32),
    })


class _ChunkedTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared generation: documents -> chunks -> train/validation records."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First version.",
                     "1.1.0": "Records are keyed by the document's position and the chunk's "
                              "index, not by the file's path, so the record order (tfds orders "
                              "by a hash of the key) no longer depends on where the files live."}

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This module's file (tfds' own fallback). tfds 4.9.10's default needs the
        ``importlib_resources`` package for builders inside a package, which it does not declare
        on Python >= 3.9 (tensorflow/datasets#11212); this keeps our builders independent of it."""
        return epath.Path(inspect.getfile(cls))

    def _documents(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=_text_features(), supervised_keys=None)

    def _split_generators(self, dl_manager):
        del dl_manager  # local data only
        documents = self._documents()
        position = {name: i for i, (name, _) in enumerate(documents)}
        chunks = list(corpus.iter_chunks(documents, self.builder_config.chunk_chars,
                                         self.builder_config.validation_fraction))
        names = ["train"] + (["validation"] if self.builder_config.validation_fraction > 0 else [])
        return {name: self._generate_examples([c for c in chunks if c[0] == name], position)
                for name in names}

    def _generate_examples(self, chunks, position):
        # tfds stores a split's records in the order of a hash of their keys. The key is
        # therefore the document's position in the (sorted) input list and the chunk's index,
        # never the path: the same files copied or linked elsewhere give the same record order,
        # hence the same batches for the same seed.
        for _, document, index, text in chunks:
            yield f"{position[document]:06d}#{index:08d}", {"text": text, "document": document,
                                                            "chunk": index}


class LocalText(_ChunkedTextBuilder):
    """Local UTF-8 text files (config ``paths``), chunked into train/validation records."""

    name = "unitscale_local_text"

    def _documents(self):
        return [(p, corpus.read_text_file(p)) for p in self.builder_config.paths]


class PydocTopics(_ChunkedTextBuilder):
    """The built-in corpus: the English text of CPython's ``pydoc_data.topics``."""

    name = "unitscale_pydoc_topics"
    BUILDER_CONFIGS = [TextConfig(name="default", description="5% validation, 4096-char chunks")]

    def _documents(self):
        return corpus.builtin_documents()


def local_text_builder(paths, *, data_dir: str | None = None,
                       validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                       chunk_chars: int = DEFAULT_CHUNK_CHARS) -> LocalText:
    """A ``LocalText`` builder for ``paths`` (files or globs), not yet prepared.

    Raises:
      FileNotFoundError / ValueError: as ``corpus.expand_paths``; a bad fraction or chunk size.
    """
    files = corpus.expand_paths(paths)
    for f in files:
        if os.path.getsize(f) == 0:
            raise ValueError(f"data file {f} is empty (0 bytes); pass a file with text.")
    check_settings(validation_fraction, chunk_chars)
    stats = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    name = "files-" + corpus.fingerprint([stats, validation_fraction, chunk_chars])
    config = TextConfig(name=name, paths=tuple(files), validation_fraction=validation_fraction,
                        chunk_chars=chunk_chars, description=f"{len(files)} file(s): {files[:3]}")
    return LocalText(config=config, data_dir=data_dir, file_format="array_record")


def builtin_builder(*, data_dir: str | None = None,
                    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                    chunk_chars: int = DEFAULT_CHUNK_CHARS) -> PydocTopics:
    """A ``PydocTopics`` builder (the built-in corpus), not yet prepared.

    Raises:
      RuntimeError: ``pydoc_data`` is missing (see ``corpus.builtin_documents``).
    """
    docs = corpus.builtin_documents()
    check_settings(validation_fraction, chunk_chars)
    name = f"py{sys.version_info[0]}{sys.version_info[1]}-" + corpus.fingerprint(
        [docs, validation_fraction, chunk_chars])
    config = TextConfig(name=name, validation_fraction=validation_fraction,
                        chunk_chars=chunk_chars, description=f"pydoc_data.topics of Python "
                        f"{sys.version.split()[0]}")
    return PydocTopics(config=config, data_dir=data_dir, file_format="array_record")


def check_settings(validation_fraction: float, chunk_chars: int) -> None:
    """Raises ValueError for a validation fraction outside [0, 0.5] or chunks shorter than
    ``corpus.MIN_CHUNK_CHARS``."""
    if not 0 <= validation_fraction <= 0.5:
        raise ValueError(f"validation_fraction must be in [0, 0.5], got {validation_fraction}.")
    if chunk_chars < corpus.MIN_CHUNK_CHARS:
        raise ValueError(f"chunk_chars must be >= {corpus.MIN_CHUNK_CHARS}, got {chunk_chars}.")


@contextlib.contextmanager
def quiet_tfds(quiet: bool = True):
    """Hides tfds' progress bars, its info/warning logs (e.g. "Using custom data
    configuration") and its prints to stdout ("Downloading and preparing ...") inside the block
    when ``quiet``; restores all three afterwards. Errors still raise."""
    if not quiet:
        yield
        return
    from absl import logging as absl_logging
    from tensorflow_datasets.core.utils import tqdm_utils
    bars, verbosity = getattr(tqdm_utils, "_active", True), absl_logging.get_verbosity()
    tfds.display_progress_bar(False)
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(bars)
        absl_logging.set_verbosity(verbosity)


def prepare(builder: tfds.core.DatasetBuilder, *, quiet: bool = True, **kwargs):
    """Runs ``builder.download_and_prepare(file_format="array_record")`` (a no-op when the data
    is already in ``data_dir``) and returns ``builder.as_data_source()``: split -> data source.

    Args:
      quiet: hide tfds' progress bars and logs while preparing.
      **kwargs: passed to ``download_and_prepare``.
    """
    with quiet_tfds(quiet):
        builder.download_and_prepare(file_format="array_record", **kwargs)
    return builder.as_data_source()
