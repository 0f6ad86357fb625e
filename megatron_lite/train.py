"""Train a model: ``torchrun --nproc_per_node N -m megatron_lite.train CONFIG [key=value ...]``.

Also runs as plain ``python -m megatron_lite.train CONFIG ...`` with one process.
``key=value`` overrides (``section.key=value``, e.g. ``train.max_steps=50``) are applied
on top of the YAML file; the resolved config is written to ``train.run_dir``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_lite.cli import parse_args, run_cli
from megatron_lite.config import load_config
from megatron_lite.parallel import destroy_parallel, init_parallel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML config (configs/gpt2/*.yaml, configs/bert/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    a = parse_args(p, argv)

    def body() -> None:
        cfg = load_config(a.config, a.overrides)
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
