"""Fault injection for the tests: TrainingHooks, never config keys.

In-process: ``train_main(argv, hooks=[NanLossAt(6)])`` or ``Trainer(cfg, ctx, hooks=...)``.
Under torchrun, this file is the script that installs the hook:

    torchrun ... tests/training/faults.py --kill-rank 1 --after-step 5 CONFIG [key=value ...]
"""

import argparse
import math
import os
import signal
import sys

from megatron_lite.hooks import TrainingHook
from megatron_lite.train import main as train_main


class NanLossAt(TrainingHook):
    """Step ``step``'s logged loss becomes ``value`` (NaN), the first ``times`` times it is
    reached (the divergence guard's tests)."""

    def __init__(self, step: int, times: int = 1, value: float = math.nan):
        self.step, self.times, self.done, self.value = step, times, 0, value

    def step_metrics(self, trainer) -> dict:
        if trainer.step == self.step and self.done < self.times:
            self.done += 1
            return {"loss": self.value}
        return {}


class KillRankAfter(TrainingHook):
    """SIGKILL rank ``rank`` after step ``step`` (and its checkpoint, when one is due) of
    the first attempt (torchrun's TORCHELASTIC_RESTART_COUNT unset or 0)."""

    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def before_step(self, trainer) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if trainer.step == self.step and first_attempt and trainer.ctx.rank == self.rank:
            print(f"fault injection: killing rank {self.rank} after step {self.step}",
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="megatron_lite.train with a rank killed")
    p.add_argument("--kill-rank", type=int, required=True)
    p.add_argument("--after-step", type=int, required=True)
    a, rest = p.parse_known_args()
    sys.exit(train_main(rest, hooks=[KillRankAfter(a.after_step, a.kill_rank)]))
