"""Consecutive ordering: lanes of a split's token stream, for Transformer-XL's memory."""

import numpy as np
import pytest

from megatron_lite.data.indexed import IndexedDataError, IndexedDataset, IndexedDatasetWriter
from megatron_lite.data.loader import PretrainingSampler
from megatron_lite.data.stream import ConsecutiveGPTDataset, TokenStream


@pytest.fixture
def shard(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "d", np.int32)
    rng = np.random.default_rng(0)
    for k in range(12):  # document k holds 1000 k, 1000 k + 1, ...
        w.add_document([list(range(1000 * k, 1000 * k + int(rng.integers(5, 40))))])
    w.finalize()
    return IndexedDataset(tmp_path / "d")


def test_stream_reads_across_documents(shard):
    docs = [shard.get(k) for k in range(2, 9)]
    stream = TokenStream(shard, (2, 9), "train")
    flat = np.concatenate(docs)
    assert stream.num_tokens == len(flat)
    for start, n in [(0, 5), (3, 40), (len(flat) - 7, 7), (10, len(flat) - 10)]:
        assert np.array_equal(stream.read(start, n), flat[start:start + n])


def test_lanes_cover_the_split_once_per_epoch_disjoint_across_dp(shard):
    seq, lanes, mb, dp = 4, 8, 2, 4
    ds = ConsecutiveGPTDataset(shard, (0, 12), seq, lanes)
    flat = TokenStream(shard, (0, 12), "train").read(0, ds.stream.num_tokens)
    seen = {}
    steps = ds.segments
    for rank in range(dp):  # the usual sampler: DP rank r owns rows [r*mb, (r+1)*mb)
        sampler = iter(PretrainingSampler(0, mb, rank, dp))
        for step in range(steps):
            for _ in range(lanes // (mb * dp)):  # micro-batches of this step
                for i in next(sampler):
                    lane, segment = ds.position(i)
                    assert segment == step and lane in range(rank * mb, rank * mb + mb)
                    seen.setdefault(lane, []).append(ds[i])
    assert sorted(seen) == list(range(lanes))
    for lane, segments in seen.items():
        # consecutive segments share one token; together they are the lane's stream
        joined = np.concatenate([segments[0]] + [s[1:] for s in segments[1:]])
        start = lane * ds.lane_length
        assert np.array_equal(joined, flat[start:start + steps * seq + 1])
    assert ds.position(steps * lanes) == (0, 0)  # the next epoch starts over


def test_too_small_split_is_an_error(shard):
    with pytest.raises(IndexedDataError, match="too small for 64 lanes"):
        ConsecutiveGPTDataset(shard, (0, 2), 8, 64)
