"""Train a model: ``torchrun --nproc_per_node N -m megatron_lite.train CONFIG [key=value ...]``.

Also runs as plain ``python -m megatron_lite.train CONFIG ...`` with one process.
``key=value`` overrides (``section.key=value``, e.g. ``train.max_steps=50``) are applied
on top of the YAML file; the resolved config is written to ``train.run_dir`` (paths made
absolute, so later commands work from any directory).

Ctrl-C, SIGTERM (SLURM preemption, time limit) or SIGUSR1 finish the current step, save a
checkpoint and exit; rerun the same command to resume (metrics continue without repeats).
A second Ctrl-C exits at once. ``train.load=RUN train.finetune=true`` starts a new run
from another run's weights (fresh optimizer, step 0).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import torch.distributed as dist

from megatron_lite.cli import config_keys_help, parse_args, run_cli
from megatron_lite.config import load_config
from megatron_lite.hooks import TrainingHook
from megatron_lite.parallel import parallel_session


def main(argv: list[str] | None = None, hooks: Sequence[TrainingHook] = ()) -> int:
    """The command; ``hooks`` go to the Trainer after the model's own (tests inject faults
    this way: see :mod:`megatron_lite.hooks`)."""
    p = argparse.ArgumentParser(prog="python -m megatron_lite.train", description=__doc__,
                                epilog=config_keys_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML config (configs/gpt2/*.yaml, configs/bert/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    a = parse_args(p, argv)

    def body() -> None:
        cfg = load_config(a.config, a.overrides)
        with parallel_session(cfg.parallel.tensor_parallel_size, seed=cfg.train.seed) as ctx:
            from megatron_lite.training.trainer import Trainer

            trainer = Trainer(cfg, ctx, hooks=hooks)
            trainer.fit()
            saved = trainer.run_dir / "checkpoints" / f"step_{trainer.step:08d}"
            if trainer.interrupted:
                if ctx.is_main:
                    print(f"interrupted at step {trainer.step} ({trainer.interrupted}): saved "
                          f"{saved}; rerun the same command to resume", file=sys.stderr,
                          flush=True)
                if dist.is_initialized():
                    dist.barrier()  # exit together: a launcher may kill the rest at the first
                return 128 + signal.Signals[trainer.interrupted]
            if ctx.is_main:
                written = [p.name for p in (trainer.run_dir / "metrics.jsonl",
                                            trainer.run_dir / "loss.png") if p.exists()]
                print(f"done: {trainer.run_dir} at step {trainer.step} "
                      f"({', '.join([*written, f'checkpoints/{saved.name}'])})")
            return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
