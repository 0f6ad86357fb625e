"""GPT samples: Megatron's document / sample / shuffle indices, splits, the index cache."""

import numpy as np
import pytest

from megatron_lite.data.gpt_dataset import GPTDataset, build_indices, split_ranges
from megatron_lite.data.indexed import IndexedDataError, IndexedDataset, IndexedDatasetWriter


def test_gpt_sample_index_covers_every_token_once_per_epoch():
    lengths = np.array([5, 1, 9, 3, 7], dtype=np.int64)
    seq = 4
    doc_idx, sample_idx, shuffle_idx = build_indices(lengths, 10, num_samples=12,
                                                     seq_length=seq, seed=3)
    assert sorted(doc_idx[:5] - 10) == list(range(5))  # each epoch is a permutation
    stream = np.concatenate([np.arange(lengths[d - 10]) + 100 * (d - 10) for d in doc_idx])
    n = len(shuffle_idx)
    assert n >= 12 and sorted(shuffle_idx) == list(range(n))
    for i in range(n):  # sample i = stream[i*seq : i*seq + seq + 1]
        pos, off = sample_idx[i]
        start = sum(lengths[d - 10] for d in doc_idx[:pos]) + off
        assert start == i * seq
    covered = np.concatenate([stream[i * seq:(i + 1) * seq] for i in range(n)])
    epoch = int(lengths.sum())
    first_epoch = covered[:epoch] if len(covered) >= epoch else covered
    assert sorted(first_epoch.tolist()) == sorted(stream[:epoch].tolist())


def test_gpt_dataset_crosses_documents_and_reuses_cached_indices(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "d", np.int32)
    for k in range(6):
        w.add_document([list(range(1000 * k, 1000 * k + 7))])
    w.finalize()
    ds = IndexedDataset(tmp_path / "d")
    a = GPTDataset(ds, (0, 6), seq_length=5, num_samples=16, seed=1)
    assert not a.cached and len(a) >= 16
    samples = [a[i] for i in range(len(a))]
    assert all(s.size == 6 for s in samples)
    assert any(len({int(t) // 1000 for t in s}) > 1 for s in samples)  # spans documents
    b = GPTDataset(ds, (0, 6), seq_length=5, num_samples=16, seed=1)
    assert b.cached and all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    assert not GPTDataset(ds, (0, 6), seq_length=5, num_samples=16, seed=2).cached


def test_split_ranges():
    assert split_ranges(1000, "949,50,1") == [(0, 949), (949, 999), (999, 1000)]
    assert split_ranges(10, "1,0,0") == [(0, 10), (10, 10), (10, 10)]
    with pytest.raises(IndexedDataError, match="data.split"):
        split_ranges(10, "a,b")
