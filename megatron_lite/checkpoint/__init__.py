"""The checkpoint format, below training: every command that reads or writes a
checkpoint (train, evaluate, generate, convert, prune, distill, averaging) uses this.

- :mod:`.format`: save (sharded, optionally in the background), load (at any TP/DP
  layout), resolve, list and consolidate checkpoints;
- :mod:`.sharded`: the pieces each rank writes and reads through
  ``torch.distributed.checkpoint``, and the safe reading of its metadata;
- :mod:`.optim_state`: the optimizer state by parameter name, gathered and resharded
  (the full form of format 2 and of consolidated checkpoints);
- :mod:`.average`: averaging checkpoints; :mod:`.commands`: ``python -m
  megatron_lite.checkpoint``.
"""

from megatron_lite.checkpoint.format import (
    FORMAT_VERSION,
    CheckpointError,
    consolidate,
    has_optimizer_state,
    list_checkpoints,
    load_checkpoint,
    load_file,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    wait_for_checkpoint,
)

__all__ = ["FORMAT_VERSION", "CheckpointError", "consolidate", "has_optimizer_state",
           "list_checkpoints", "load_checkpoint", "load_file", "read_meta",
           "resolve_checkpoint", "save_checkpoint", "wait_for_checkpoint"]
