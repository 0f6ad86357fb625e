"""Helper processes die with the preprocessing run that started them.

A killed run (``kill``, ``kill -9``, a job's time limit) must not leave its helpers
working on: datatrove's task processes (forked by a forkserver, so not children of the
run: ``prctl(PR_SET_PDEATHSIG)`` cannot tie them to it), its ``Manager`` process, and the
prepare stage's tokenizer workers. Each of them holds a *lifeline*: a daemon thread that
waits for the run's process to end (on a Linux pidfd; elsewhere it polls every 0.2 s)
and then kills its own process with SIGKILL: no cleanup, no ``BrokenPipeError`` from a
result nobody reads; the run, when it could, already said why it stopped, in one line.

- :func:`hold` starts one in this process;
- :func:`install` makes every process forked from this one hold one to the process named
  by ``$MEGATRON_LITE_PREPROCESS_PID`` (set by the run for the while);
- :mod:`preprocessing.forkserver_preload`, imported into datatrove's forkserver, does
  :func:`install` there (its children are the task processes).
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

ENV = "MEGATRON_LITE_PREPROCESS_PID"
_installed = False


def _wait_for(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = -1  # already gone
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
        fd = None
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(0.2)
    if fd is not None and fd >= 0:
        select.select([fd], [], [])  # readable once the process has ended
    os.kill(os.getpid(), signal.SIGKILL)


def hold(pid: int) -> None:
    """This process is killed (SIGKILL) as soon as process ``pid`` ends."""
    if pid > 1 and pid != os.getpid():
        threading.Thread(target=_wait_for, args=(pid,), daemon=True,
                         name="preprocess-lifeline").start()


def _after_fork() -> None:
    pid = os.environ.get(ENV, "")
    if pid.isdigit():
        hold(int(pid))


def install() -> None:
    """Every later ``os.fork`` of this process starts a lifeline to ``$ENV`` (if set)."""
    global _installed
    if not _installed:
        os.register_at_fork(after_in_child=_after_fork)
        _installed = True
