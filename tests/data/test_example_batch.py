"""``data.example_batch``: the arrays, shapes and dtypes of the real iterator's batches."""

import pytest

from unitscale_jax import data


@pytest.mark.parametrize("task", data.TASKS)
def test_example_batch_is_shaped_as_the_iterators(corpus_files, data_dir, task):
    source = data.resolve_source([str(p) for p in corpus_files], data_dir=data_dir,
                                 validation_fraction=0.1)
    real = next(data.make_iterator(source, "train", seq_len=24, batch_size=3, task=task))
    example = data.example_batch(task, seq_len=24, batch_size=3)
    assert {k: (v.shape, v.dtype) for k, v in example.items()} == \
        {k: (v.shape, v.dtype) for k, v in real.items()}


def test_example_batch_rejects_an_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        data.example_batch("nope", seq_len=8, batch_size=1)
