"""Checkpoint tools.

    python -m megatron_lite.checkpoint average RUN_DIR [--last 5] --output DIR

``average`` writes a checkpoint whose parameters are the mean of the last N checkpoints
of a run (a cheap ensemble that often evaluates better than the last one alone); it
loads like any other checkpoint (``evaluate``, ``generate``, ``convert --to-hf``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_lite.checkpoint.average import average_checkpoints
from megatron_lite.checkpoint.format import list_checkpoints
from megatron_lite.cli import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    avg = sub.add_parser("average", help="average the parameters of the last N checkpoints")
    avg.add_argument("run_dir", type=Path)
    avg.add_argument("--last", type=int, default=5)
    avg.add_argument("--output", type=Path, required=True)
    a = p.parse_args(argv)

    def body() -> None:
        found = list_checkpoints(a.run_dir)
        if not found:
            raise FileNotFoundError(f"{a.run_dir}: no checkpoints/step_* folders")
        chosen = found[-a.last:]
        out = average_checkpoints(chosen, a.output)
        print(f"wrote {out}: mean of {', '.join(c.name for c in chosen)}")

    return run_cli(body)

