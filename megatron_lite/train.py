"""Entry point: ``torchrun --nproc_per_node N -m megatron_lite.train CONFIG [key=value ...]``.

Also runs as plain ``python -m megatron_lite.train CONFIG ...`` with one process.
"""

from __future__ import annotations

import sys

from megatron_lite.config import ConfigError, load_config
from megatron_lite.data.indexed import IndexedDataError
from megatron_lite.data.tokenizer import TokenizerError
from megatron_lite.parallel import ParallelConfigError, destroy_parallel, init_parallel

USAGE = "usage: python -m megatron_lite.train CONFIG.yaml [section.key=value ...]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    rank = 0
    try:
        cfg = load_config(argv[0], argv[1:])
        ctx = init_parallel(cfg.parallel.tensor_parallel_size, seed=cfg.train.seed)
        rank = ctx.rank
        try:
            from megatron_lite.training.trainer import Trainer

            trainer = Trainer(cfg, ctx)
            trainer.fit()
            if ctx.is_main:
                print(f"done: {trainer.run_dir} (metrics.jsonl, loss.png, checkpoints/)")
        finally:
            destroy_parallel()
    except (ConfigError, ParallelConfigError, IndexedDataError, TokenizerError,
            FileNotFoundError) as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
