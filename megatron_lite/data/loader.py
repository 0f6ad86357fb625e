"""Data-parallel batching: each DP rank reads a disjoint slice of every global batch.

The global sample order is the dataset's own (already shuffled) order. Micro-step k
of the run covers samples ``[consumed + k*mb*dp, consumed + (k+1)*mb*dp)``; DP rank r
takes the r-th block of ``mb`` of them. TP ranks of one DP rank read the same samples.
Restarting from ``consumed_samples`` continues exactly where a run stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class PretrainingSampler:
    """Endless micro-batches of sample indices for one DP rank.

    Args:
        consumed_samples: samples (over all DP ranks) already trained on.
        micro_batch_size: samples per micro-batch per DP rank.
        dp_rank, dp_size: this rank's place in the data-parallel group.
    """

    def __init__(self, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        self.consumed, self.mb, self.dp_rank, self.dp_size = (
            consumed_samples, micro_batch_size, dp_rank, dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed
        while True:
            first = start + self.dp_rank * self.mb
            yield list(range(first, first + self.mb))
            start += self.mb * self.dp_size


def gpt_collate(samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """``seq_length + 1`` tokens per sample -> inputs and next-token labels."""
    tokens = torch.from_numpy(np.stack(samples))
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def dict_collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack per-sample dicts of arrays (BERT)."""
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int, collate) -> Iterator[dict[str, torch.Tensor]]:
    """Endless collated micro-batches for this DP rank, starting after ``consumed_samples``."""
    for indices in PretrainingSampler(consumed_samples, micro_batch_size, dp_rank, dp_size):
        yield collate([dataset[i] for i in indices])
