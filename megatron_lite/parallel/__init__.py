"""The tensor-parallel core: process groups, collectives, layers, loss and RNG."""

from megatron_lite.parallel.cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy
from megatron_lite.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    SharedColumnLinear,
    VocabParallelEmbedding,
    mark_sequence_parallel,
    mark_sequence_parallel_module,
    normal_init,
    scaled_normal_init,
)
from megatron_lite.parallel.linear_cross_entropy import linear_cross_entropy
from megatron_lite.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    gather_sequence_for_head,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
    scatter_to_tp_region,
    sequence_parallel_linear,
)
from megatron_lite.parallel.random import TPRNGTracker, checkpoint
from megatron_lite.parallel.state import (
    ParallelConfigError,
    ParallelContext,
    SequenceParallel,
    destroy_parallel,
    init_parallel,
    parallel_session,
    read_launch_env,
    validate_parallel_config,
)
from megatron_lite.parallel.state_dict import full_state_dict, load_full_state_dict
from megatron_lite.parallel.utils import merge_shards, pad_vocab_size, shard_tensor

__all__ = [
    "ColumnParallelLinear",
    "ParallelConfigError",
    "ParallelContext",
    "SequenceParallel",
    "RowParallelLinear",
    "SharedColumnLinear",
    "TPRNGTracker",
    "VocabParallelEmbedding",
    "checkpoint",
    "copy_to_tp_region",
    "destroy_parallel",
    "full_state_dict",
    "gather_from_sequence_region",
    "gather_from_tp_region",
    "gather_sequence_for_head",
    "init_parallel",
    "linear_cross_entropy",
    "parallel_session",
    "load_full_state_dict",
    "mark_sequence_parallel",
    "mark_sequence_parallel_module",
    "merge_shards",
    "normal_init",
    "pad_vocab_size",
    "read_launch_env",
    "reduce_from_tp_region",
    "reduce_scatter_to_sequence_region",
    "scaled_normal_init",
    "scatter_to_sequence_region",
    "scatter_to_tp_region",
    "sequence_parallel_linear",
    "shard_tensor",
    "validate_parallel_config",
    "vocab_parallel_argmax",
    "vocab_parallel_cross_entropy",
]
