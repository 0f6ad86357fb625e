"""Data: Megatron-compatible indexed shards, GPT and BERT datasets, DP-sharded loading."""

from megatron_lite.data.indexed import (
    IndexedDataError,
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
    merge_indexed,
)

__all__ = ["IndexedDataError", "IndexedDataset", "IndexedDatasetWriter", "best_dtype",
           "merge_indexed"]
