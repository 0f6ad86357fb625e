"""GPT pretraining samples over an indexed shard, built the way Megatron-LM builds them.

A split is a contiguous range of documents (``data.split`` = "949,50,1"). For enough
epochs to cover the samples asked for, the split's documents are shuffled per epoch
and concatenated into one token stream (the *document index*). Sample ``i`` is the
``seq_length + 1`` tokens starting at token ``i * seq_length`` of that stream, so
samples run across document boundaries and consecutive samples share one token (the
last target of one is the first input of the next). The *sample index* stores where
each sample starts (document position, offset); a *shuffle index* permutes samples.

The three indices are built once (by one rank), saved as ``.npy`` next to the data,
keyed by a hash of everything that defines them, and memory-mapped afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megatron_lite.data.indexed import IndexedDataError, IndexedDataset
from megatron_lite.files import atomic_write

INDEX_VERSION = 1


def split_ranges(num_docs: int, split: str) -> list[tuple[int, int]]:
    """Document ranges of the train / valid / test splits from weights like "949,50,1".

    Boundaries are rounded as Megatron does (each split gets ``round(w * n)``
    documents, the last absorbs the rounding).
    """
    try:
        weights = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise IndexedDataError(f"data.split={split!r}: expected numbers like 949,50,1") from None
    weights = (weights + [0.0, 0.0, 0.0])[:3]
    total = sum(weights)
    if total <= 0 or any(w < 0 for w in weights):
        raise IndexedDataError(f"data.split={split!r}: weights must be >= 0 and not all 0")
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * num_docs)))
    bounds[-1] = num_docs
    bounds = [min(b, num_docs) for b in bounds]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def check_vocab(ds: IndexedDataset, vocab_size: int) -> None:
    """Raise if a token id in the shard does not fit the model's vocab."""
    top = ds.max_token()
    if top >= vocab_size:
        raise IndexedDataError(f"{ds.prefix}.bin: token id {top} does not fit "
                               f"model.vocab_size={vocab_size} (wrong tokenizer or vocab size?)")


def cache_key(indexed: IndexedDataset, *parts) -> str:
    """A short hash of what defines an index: the shard's identity and ``parts``.

    The shard enters by path, size, modification time and token count, so rebuilding
    the data under the same prefix never reuses stale indices.
    """
    idx = Path(indexed.prefix + ".idx").stat()
    key = json.dumps([INDEX_VERSION, os.path.abspath(indexed.prefix), idx.st_size,
                      idx.st_mtime_ns, indexed.num_tokens, *parts])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


ErrorSync = Callable[[str | None], str | None]


def build_once(paths: list[Path], build: bool, make, sync: ErrorSync | None) -> None:
    """Rank 0 (``build``) writes missing index files; every rank learns of its failure.

    ``sync`` exchanges each rank's error message (None when fine) and returns the first;
    it is also the barrier after which the files exist. A failure raises on every rank.
    """
    error = None
    if build and not all(p.exists() for p in paths):
        try:
            for path, arr in zip(paths, make(), strict=True):
                with atomic_write(path, "wb") as f:
                    np.save(f, arr)
        except IndexedDataError as err:
            error = str(err)
    if sync is not None:
        error = sync(error)
    if error:
        raise IndexedDataError(error)


def build_indices(doc_lengths: np.ndarray, doc_start: int, num_samples: int, seq_length: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Document index, sample index and shuffle index (see the module docstring).

    Args:
        doc_lengths: tokens of each document of the split.
        doc_start: id of the split's first document in the shard.
        num_samples: samples wanted (epochs are added until they are covered).
        seq_length: tokens per sample input (each sample holds ``seq_length + 1``).
        seed: shuffling seed.
    """
    tokens_per_epoch = int(doc_lengths.sum())
    if tokens_per_epoch <= seq_length:
        raise IndexedDataError(f"split has {tokens_per_epoch} tokens, fewer than one sample "
                               f"of seq_length+1={seq_length + 1}")
    num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    rng = np.random.RandomState(seed)
    docs = np.arange(doc_lengths.size, dtype=np.int64)
    doc_idx = np.concatenate([rng.permutation(docs) for _ in range(num_epochs)]) + doc_start
    # sample i starts at stream token i * seq_length: find (position in doc_idx, offset)
    lengths = doc_lengths[doc_idx - doc_start]
    ends = np.cumsum(lengths)  # stream offset just past each document
    total_samples = (int(ends[-1]) - 1) // seq_length
    starts = np.arange(total_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(ends, starts, side="right")
    offset = starts - (ends[pos] - lengths[pos])
    sample_idx = np.stack([pos, offset], axis=1).astype(np.int64)
    shuffle_idx = rng.permutation(total_samples).astype(np.int64)
    return doc_idx, sample_idx, shuffle_idx


class GPTDataset:
    """``seq_length + 1``-token samples of one split of a shard (``__getitem__`` -> int64).

    Args:
        indexed: the shard.
        doc_range: ``(first, end)`` documents of the split.
        seq_length: tokens per sample input.
        num_samples: samples the run will read (the indices cover at least these).
        seed: shuffling seed (the same on every rank).
        name: split name, for messages and cache file names.
        build: whether this process builds missing indices (rank 0) ...
        sync: ... and how ranks agree it worked (see :func:`build_once`).
    """

    def __init__(self, indexed: IndexedDataset, doc_range: tuple[int, int], seq_length: int,
                 num_samples: int, seed: int, name: str = "train", build: bool = True,
                 sync: ErrorSync | None = None):
        first, end = doc_range
        if end <= first:
            raise IndexedDataError(f"{indexed.prefix}: the {name} split has 0 documents "
                                   f"(data.split gives it none of {indexed.num_documents})")
        self.indexed, self.seq_length, self.name = indexed, seq_length, name
        di = indexed.document_indices
        if di[end] - di[first] != end - first:
            raise IndexedDataError(f"{indexed.prefix}: GPT needs one sequence per document "
                                   "(a _text_document shard, not _text_sentence)")
        lengths = indexed.sequence_lengths[di[first]:di[end]].astype(np.int64)
        key = cache_key(indexed, first, end, seq_length, num_samples, seed)
        stem = f"{indexed.prefix}.{name}.{key}"
        paths = [Path(f"{stem}.{part}.npy") for part in ("doc_idx", "sample_idx", "shuffle_idx")]
        self.cached = all(p.exists() for p in paths)
        build_once(paths, build, lambda: build_indices(lengths, first, num_samples, seq_length,
                                                       seed), sync)
        self.doc_idx, self.sample_idx, self.shuffle_idx = (
            np.load(p, mmap_mode="r") for p in paths)

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, i: int) -> np.ndarray:
        j = int(self.shuffle_idx[i % len(self.shuffle_idx)])
        (pos, offset), (end_pos, end_offset) = self.sample_idx[j], self.sample_idx[j + 1]
        if pos == end_pos:
            tokens = self.indexed.get(int(self.doc_idx[pos]), int(offset),
                                      int(end_offset - offset) + 1)
        else:
            parts = [self.indexed.get(int(self.doc_idx[pos]), int(offset))]
            parts += [self.indexed.get(int(self.doc_idx[p])) for p in range(pos + 1, end_pos)]
            parts.append(self.indexed.get(int(self.doc_idx[end_pos]), 0, int(end_offset) + 1))
            tokens = np.concatenate(parts)
        return tokens.astype(np.int64)
