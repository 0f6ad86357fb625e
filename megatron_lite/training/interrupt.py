"""Stop a run cleanly on a signal: finish the step, save a checkpoint, exit with one line.

Ctrl-C (SIGINT), a scheduler's SIGTERM (SLURM preemption or time limit, ``scancel``)
and SIGUSR1 (``sbatch --signal=USR1@120``, forwarded by ``torchrun
--signals-to-handle``) all ask the same thing: the Trainer asks :meth:`Interrupt.agreed`
after every optimizer step, and when any rank has seen a signal every rank saves the
same step and leaves. A second signal exits at once (without a checkpoint).

A single Ctrl-C in a terminal reaches a worker twice: from the terminal (the whole
foreground process group) and forwarded by torchrun a moment later. Repeats within
``GRACE_S`` of the first signal therefore count as the same request.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

from megatron_lite.parallel.comm import MAX, all_reduce

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
GRACE_S = 2.0


class Interrupt:
    """Signal handlers for the length of a ``with`` block (only in the main thread;
    elsewhere it never triggers). ``received`` is the first signal's number, or None."""

    def __init__(self, signals=SIGNALS, grace_s: float = GRACE_S, verbose: bool = True):
        self.signals, self.grace_s, self.verbose = signals, grace_s, verbose
        self.received: int | None = None
        self._first = 0.0
        self._previous = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._first = signum, now
            if self.verbose:
                print(f"{signal.Signals(signum).name} received: saving a checkpoint after "
                      "this step (again to exit at once)", file=sys.stderr, flush=True)
        elif now - self._first > self.grace_s:
            if self.verbose:
                print(f"{signal.Signals(signum).name} again: exiting without a checkpoint",
                      file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def agreed(self, device: torch.device) -> int | None:
        """Collective over every rank: the signal any rank has received, or None. Every
        rank gets the same answer, so they all stop after the same step."""
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        if torch.distributed.is_initialized():
            flag = all_reduce(flag, torch.distributed.group.WORLD, MAX)
        value = int(flag.item())
        return value or None

