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

Corpora larger than memory (``unitscale_jax.data.prepared``): tokenized once, read by index::

    data.prepare_corpus("books/*.txt", "prepared/books", tokenizer="bytes", workers=8)
    source = data.open_prepared("prepared/books", tok)  # a TextSource; counts from manifest
    train = data.make_iterator(source, "train", seq_len=256, batch_size=32)

Fine-tuning data (``unitscale_jax.data.labelled``)::

    splits = data.find_splits("../shared/data/sst2")   # {"train": Path, "dev": Path}
    train_ex = data.read_classification(splits["train"])   # or data.read_conll(path)
    sst2 = data.read_tfds_classification("glue/sst2")  # .splits["train"|"dev"], .vocab
    vocab = data.LabelVocab.from_labels(train_ex.labels)    # saved with vocab.to_json()
    enc = data.encode_texts(train_ex, tok, seq_len=64, vocab=vocab)  # or encode_tagged
    batches = data.make_batch_iterator(enc.arrays, batch_size=32, seed=0, tokenizer=tok)
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
from unitscale_jax.data.corpus import (
    builtin_documents,
    chunk_text,
    expand_paths,
    known_words,
    split_chunks,
    word_set,
)
from unitscale_jax.data.labelled import (
    DataError,
    LabelVocab,
    encode_tagged,
    encode_texts,
    find_splits,
    make_batch_iterator,
    read_classification,
    read_conll,
    read_tfds_classification,
    tags_from_subwords,
)
from unitscale_jax.data.objectives import lm_batch, mask_tokens, seq2seq_target_len, span_corruption
from unitscale_jax.data.pipeline import (
    TASKS,
    DataIterator,
    check_corpus_length,
    example_batch,
    make_iterator,
    make_lm_iterator,
    row_length,
)
from unitscale_jax.data.prepared import (
    PreparedSource,
    open_prepared,
    prepare_corpus,
    tokenizer_identity,
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
    encode_words,
    get_tokenizer,
    regular_ids,
    special_ids,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_CHUNK_CHARS", "DEFAULT_VALIDATION_FRACTION", "LocalText", "PydocTopics", "TextConfig",
    "builtin_builder", "local_text_builder", "prepare", "builtin_documents", "chunk_text",
    "expand_paths", "split_chunks", "lm_batch", "mask_tokens", "seq2seq_target_len",
    "span_corruption", "TASKS", "DataIterator", "check_corpus_length", "make_iterator",
    "make_lm_iterator", "example_batch", "row_length", "known_words", "word_set", "SplitStats",
    "TextSource", "corpus_stats",
    "describe_corpus",
    "resolve_source",
    "ByteTokenizer", "SubwordTokenizer", "Tokenizer", "get_tokenizer", "regular_ids",
    "special_ids", "encode_words", "train_tokenizer",
    "DataError", "LabelVocab", "encode_tagged", "encode_texts", "find_splits",
    "make_batch_iterator", "read_classification", "read_conll", "read_tfds_classification",
    "tags_from_subwords", "PreparedSource", "open_prepared", "prepare_corpus",
    "tokenizer_identity",
]
