"""What every command line shares: override parsing, and one ``error:`` line (exit code 2)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def _rank() -> int:
    value = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return int(value) if value.isdigit() else 0


def run_cli(body: Callable[[], int | None]) -> int:
    """Run ``body``; turn user-facing errors into one line on stderr and exit code 2.

    Config, layout, data, tokenizer and checkpoint errors are ``ValueError``s and the same
    on every rank, so only rank 0 reports them; an ``OSError`` may be local to one rank,
    so every rank reports its own.
    """
    try:
        return body() or 0
    except ValueError as err:
        if _rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        rank = _rank()
        print(f"error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr)
        return 2


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parse a command line whose ``section.key=value`` overrides may come anywhere:
    before, between or after the options (``parse_intermixed_args``; plain
    ``parse_args`` stops collecting positionals once an option has appeared)."""
    return parser.parse_intermixed_args(argv)
