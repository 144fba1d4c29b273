"""Data for unitscale_jax: tokenizers, tfds text builders, ``--data`` sources, grain pipelines.

Typical use (what the trainer does)::

    from unitscale_jax import data
    source = data.resolve_source(args.data)            # None -> built-in corpus
    tok = data.get_tokenizer(args.tokenizer)           # "bytes" by default
    stats = data.corpus_stats(source, tok)             # {"train": SplitStats(...), ...}
    print(data.describe_corpus(source, stats))         # one line: records, bytes, tokens
    train = data.make_iterator(source, "train", seq_len=256, batch_size=32, seed=0,
                               tokenizer=tok, task="lm")
    batch = next(train)                                # {"inputs", "targets", "where"}: [32, 256]
    ckpt["data"] = train.get_state()                   # JSON-serialisable
    train.set_state(ckpt["data"])                      # on a fresh iterator: exact resume
"""

from unitscale_jax.data.builders import (
    DEFAULT_CHUNK_CHARS,
    DEFAULT_VALIDATION_FRACTION,
    LocalText,
    PydocTopics,
    TextConfig,
    builtin_builder,
    local_text_builder,
    prepare,
)
from unitscale_jax.data.corpus import builtin_documents, chunk_text, expand_paths, split_chunks
from unitscale_jax.data.objectives import lm_batch, mask_tokens, seq2seq_target_len, span_corruption
from unitscale_jax.data.pipeline import (
    TASKS,
    DataIterator,
    check_corpus_length,
    make_iterator,
    make_lm_iterator,
)
from unitscale_jax.data.sources import (
    SplitStats,
    TextSource,
    corpus_stats,
    describe_corpus,
    resolve_source,
)
from unitscale_jax.data.tokenizers import (
    ByteTokenizer,
    SubwordTokenizer,
    Tokenizer,
    get_tokenizer,
    regular_ids,
    special_ids,
)

__all__ = [
    "DEFAULT_CHUNK_CHARS", "DEFAULT_VALIDATION_FRACTION", "LocalText", "PydocTopics", "TextConfig",
    "builtin_builder", "local_text_builder", "prepare", "builtin_documents", "chunk_text",
    "expand_paths", "split_chunks", "lm_batch", "mask_tokens", "seq2seq_target_len",
    "span_corruption", "TASKS", "DataIterator", "check_corpus_length", "make_iterator",
    "make_lm_iterator", "SplitStats", "TextSource", "corpus_stats", "describe_corpus",
    "resolve_source",
    "ByteTokenizer", "SubwordTokenizer", "Tokenizer", "get_tokenizer", "regular_ids",
    "special_ids",
]
