"""A split as one token stream, read in order: lanes of consecutive segments.

Transformer-XL's memory only helps when each batch row continues the segment it saw in
the previous step (``data.ordering=consecutive``). The split's documents are
concatenated in order into one stream of ``N`` tokens, cut into ``lanes`` equal lanes
(one per global-batch row); step ``t`` feeds row ``r`` the ``t``-th segment of lane ``r``
(``seq_length + 1`` tokens, consecutive segments sharing one token). With the usual DP
sampler, DP ranks own disjoint rows, so disjoint lanes. After the last whole segment of
a lane the lanes start over (a new epoch).
"""

from __future__ import annotations

import numpy as np

from megatron_lite.data.indexed import IndexedDataError, IndexedDataset


class TokenStream:
    """The tokens of documents ``[first, end)`` of a shard, back to back, by offset."""

    def __init__(self, indexed: IndexedDataset, doc_range: tuple[int, int], name: str):
        first, end = doc_range
        if end <= first:
            raise IndexedDataError(f"{indexed.prefix}: the {name} split has 0 documents "
                                   f"(data.split gives it none of {indexed.num_documents})")
        di = indexed.document_indices
        if di[end] - di[first] != end - first:
            raise IndexedDataError(f"{indexed.prefix}: GPT needs one sequence per document "
                                   "(a _text_document shard, not _text_sentence)")
        self.indexed, self.first = indexed, first
        lengths = indexed.sequence_lengths[di[first]:di[end]].astype(np.int64)
        self.ends = np.cumsum(lengths)  # stream offset just past each document
        self.num_tokens = int(self.ends[-1]) if len(self.ends) else 0

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``[start, start + n)`` of the stream (int64)."""
        if start < 0 or start + n > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + n}) of a {self.num_tokens}-token stream")
        parts = []
        doc = int(np.searchsorted(self.ends, start, side="right"))
        while n > 0:
            begin = int(self.ends[doc - 1]) if doc else 0
            offset = start - begin
            take = min(n, int(self.ends[doc]) - start)
            parts.append(self.indexed.get(self.first + doc, offset, take))
            start, n, doc = start + take, n - take, doc + 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class ConsecutiveGPTDataset:
    """Sample ``i`` = segment ``i // lanes`` of lane ``i % lanes`` (``seq_length + 1`` tokens).

    Args:
        indexed: the shard; doc_range: the split's documents.
        seq_length: tokens per segment input.
        lanes: lanes in the stream (the global batch size).
        name: split name, for messages.
    """

    def __init__(self, indexed: IndexedDataset, doc_range: tuple[int, int], seq_length: int,
                 lanes: int, name: str = "train"):
        self.stream = TokenStream(indexed, doc_range, name)
        self.seq_length, self.lanes, self.name = seq_length, lanes, name
        self.lane_length = self.stream.num_tokens // lanes
        self.segments = (self.lane_length - 1) // seq_length  # whole segments per lane
        if self.segments < 1:
            raise IndexedDataError(
                f"{indexed.prefix}: the {name} split ({self.stream.num_tokens} tokens) is too "
                f"small for {lanes} lanes of one {seq_length + 1}-token segment")

    def __len__(self) -> int:
        return self.segments * self.lanes

    def position(self, i: int) -> tuple[int, int]:
        """(lane, segment) of sample ``i``."""
        return i % self.lanes, (i // self.lanes) % self.segments

    def __getitem__(self, i: int) -> np.ndarray:
        lane, segment = self.position(i)
        start = lane * self.lane_length + segment * self.seq_length
        return self.stream.read(start, self.seq_length + 1)
