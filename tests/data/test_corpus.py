"""data.corpus: the word check of samples (known_words / word_set)."""

from unitscale_jax.data import known_words, word_set


def test_known_words_counts_whitespace_words_found_in_the_corpus():
    vocab = word_set(["The cat sat, on the mat.", "A \"quoted\" word and x[i] here"])
    assert {"The", "cat", "sat,", "sat", "mat", "quoted", "x[i]", "x[i"} <= vocab
    assert "" not in vocab
    assert known_words("The mat sat. cta on", vocab) == (4, 5)      # punctuation stripped
    assert known_words("x[i] \"cat\" ,,,", vocab) == (2, 3)         # bare punctuation: unknown
    assert known_words("   ", vocab) == (0, 0)
    assert known_words("the", vocab) == (1, 1) and known_words("tHe", vocab) == (0, 1)
