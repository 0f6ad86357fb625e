"""torchrun, with the project's one-line errors and exit codes passed through.

    python -m megatron_lite.launch --standalone --nproc-per-node 2 -m megatron_lite.train CONFIG
    launch/torchrun.sh CONFIG [section.key=value ...]          # runs this

The arguments are torchrun's (``python -m torch.distributed.run``); torchrun itself runs
in this process, so its signal handling (forwarding Ctrl-C, SIGTERM, SIGUSR1 to the
workers, ``--shutdown-timeout``) is unchanged. What differs is the end of a job: each
worker that ends through :func:`megatron_lite.cli.run_cli` (every command) writes its
exit code into a folder this launcher gives it (``MEGATRON_LITE_EXIT_DIR``). When a
worker failed with a reported code (a config error: 2; a Ctrl-C or SIGTERM that saved a
checkpoint: 130, 143), this exits with that code, after the worker's own line, without
torchrun's traceback and failure summary on top. A failure no worker reported (a crash,
a kill -9) still gets torchrun's summary, and exit code 1.

Plain ``torchrun`` cannot do this: it turns every non-zero worker exit into its own
traceback and exit code 1 (a worker that exits with ``os._exit(2)`` after printing gets
the same 40 lines), so the only worker-side way out would be exiting 0 after a failure.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from megatron_lite.cli import EXIT_DIR


def reported_codes(folder: Path) -> dict[int, int]:
    """``{rank: exit code}`` of the workers of this node that reported one
    (:func:`megatron_lite.cli.record_exit_code`)."""
    codes = {}
    for path in folder.glob("rank*"):
        try:
            codes[int(path.name[4:])] = int(path.read_text())
        except ValueError:
            continue  # a file cut short
    return codes


def failure_code(codes: dict[int, int]) -> int | None:
    """The job's exit code from the reported ones: the lowest failing rank's (rank 0's
    errors are the ones printed), or None when no worker reported a failure."""
    failing = sorted(rank for rank, code in codes.items() if code)
    return codes[failing[0]] if failing else None


class _QuietWhenReported(logging.Filter):
    """Drops torchrun's own log lines (workers being stopped, "failed (exitcode: 2)")
    once a worker has reported its exit code: its one line said what happened."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(self.folder.glob("rank*"))


def main(argv: list[str] | None = None) -> int:
    folder = Path(tempfile.mkdtemp(prefix="megatron-lite-exit-"))
    os.environ[EXIT_DIR] = str(folder)  # the workers inherit it
    quiet = _QuietWhenReported(folder)
    for name in ("torch", "torch.distributed"):  # the handlers torch's log lines go through
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(quiet)
    try:
        try:
            run(parse_args(argv if argv is not None else sys.argv[1:]))
            return 0
        except ChildFailedError as err:
            code = failure_code(reported_codes(folder))
            if code is None:  # a crash nobody reported: torchrun's summary says which
                print(err.format_msg(), file=sys.stderr, flush=True)
                return 1
            return code
        except SignalException as err:  # the job was stopped; the workers saved and exited
            code = failure_code(reported_codes(folder))
            return code if code is not None else 128 + signal.Signals(err.sigval)
    finally:
        for handler in [h for n in ("torch", "torch.distributed")
                        for h in logging.getLogger(n).handlers]:
            handler.removeFilter(quiet)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
