"""Entry point: ``torchrun --nproc_per_node N -m megatron_lite.train CONFIG [key=value ...]``.

Also runs as plain ``python -m megatron_lite.train CONFIG ...`` with one process.
"""

from __future__ import annotations

import sys

from megatron_lite.cli import run_cli
from megatron_lite.config import load_config
from megatron_lite.parallel import destroy_parallel, init_parallel

USAGE = "usage: python -m megatron_lite.train CONFIG.yaml [section.key=value ...]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2

    def body() -> None:
        cfg = load_config(argv[0], argv[1:])
        ctx = init_parallel(cfg.parallel.tensor_parallel_size, seed=cfg.train.seed)
        try:
            from megatron_lite.training.trainer import Trainer

            trainer = Trainer(cfg, ctx)
            trainer.fit()
            if ctx.is_main:
                print(f"done: {trainer.run_dir} (metrics.jsonl, loss.png, checkpoints/)")
        finally:
            destroy_parallel()

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
