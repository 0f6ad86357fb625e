"""Train a model: ``torchrun --nproc_per_node N -m megatron_lite.train CONFIG [key=value ...]``.

Also runs as plain ``python -m megatron_lite.train CONFIG ...`` with one process.
``key=value`` overrides (``section.key=value``, e.g. ``train.max_steps=50``) are applied
on top of the YAML file; the resolved config is written to ``train.run_dir`` (paths made
absolute, so later commands work from any directory).

Ctrl-C, SIGTERM (SLURM preemption, time limit) or SIGUSR1 finish the current step, save a
checkpoint and exit; rerun the same command to resume (metrics continue without repeats).
A second Ctrl-C exits at once. ``train.load=RUN train.finetune=true`` starts a new run
from another run's weights (fresh optimizer, step 0). ``--dry-run`` prints the resolved
config, the layout, the data plan and the planner's verdict, and exits without training
or writing anything.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from megatron_lite.cli import config_command, config_keys_help, end_of_run
from megatron_lite.dryrun import dry_run
from megatron_lite.hooks import TrainingHook
from megatron_lite.training.trainer import Trainer


def main(argv: list[str] | None = None, hooks: Sequence[TrainingHook] = ()) -> int:
    """The command; ``hooks`` go to the Trainer after the model's own (tests inject faults
    this way: see :mod:`megatron_lite.hooks`)."""

    def body(cfg, ctx) -> int:
        trainer = Trainer(cfg, ctx, hooks=hooks)
        trainer.fit()
        written = [p.name for p in (trainer.run_dir / "metrics.jsonl",
                                    trainer.run_dir / "loss.png") if p.exists()]
        return end_of_run(ctx, trainer.run_dir, trainer.step, trainer.interrupted,
                          ", ".join([*written, f"checkpoints/step_{trainer.step:08d}"]))

    return config_command("python -m megatron_lite.train", __doc__, body, argv,
                          config_help="a YAML config (configs/gpt2/*.yaml, configs/bert/*.yaml)",
                          epilog=config_keys_help(), dry_run=dry_run)


if __name__ == "__main__":
    sys.exit(main())
