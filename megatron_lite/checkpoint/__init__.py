"""The checkpoint format, below training: every command that reads or writes a
checkpoint (train, evaluate, generate, convert, prune, distill, averaging) uses this.

- :mod:`.format`: save, load (at any TP/DP layout), resolve and list checkpoints;
- :mod:`.optim_state`: the optimizer state by parameter name, gathered and resharded;
- :mod:`.average`: averaging checkpoints; :mod:`.commands`: ``python -m
  megatron_lite.checkpoint``.
"""

from megatron_lite.checkpoint.format import (
    FORMAT_VERSION,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_file,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)

__all__ = ["FORMAT_VERSION", "CheckpointError", "list_checkpoints", "load_checkpoint",
           "load_file", "read_meta", "resolve_checkpoint", "save_checkpoint"]
