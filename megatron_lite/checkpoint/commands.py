"""Checkpoint tools.

    python -m megatron_lite.checkpoint average RUN_DIR [--last 5] --output DIR
    python -m megatron_lite.checkpoint consolidate CKPT --output DIR

``average`` writes a checkpoint whose parameters are the mean of the last N checkpoints
of a run (a cheap ensemble that often evaluates better than the last one alone); it
loads like any other checkpoint (``evaluate``, ``generate``, ``convert --to-hf``).

``consolidate`` writes the full form of a sharded checkpoint (a checkpoint, or a run
folder's latest) into one ``model.safetensors`` (``model/<param>`` and
``optim/<param>/<moment>``, unsharded, vocab unpadded) next to ``optim_groups.pt``,
``meta.json`` and ``config.yaml``: one file to share, which loads like any checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_lite.checkpoint.average import average_checkpoints
from megatron_lite.checkpoint.format import consolidate, list_checkpoints
from megatron_lite.cli import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    avg = sub.add_parser("average", help="average the parameters of the last N checkpoints")
    avg.add_argument("run_dir", type=Path)
    avg.add_argument("--last", type=int, default=5)
    avg.add_argument("--output", type=Path, required=True)
    con = sub.add_parser("consolidate", help="write a checkpoint's full form to one file")
    con.add_argument("checkpoint", type=Path, help="a checkpoint or run folder")
    con.add_argument("--output", type=Path, required=True)
    a = p.parse_args(argv)

    def body() -> None:
        if a.command == "consolidate":
            out = consolidate(a.checkpoint, a.output)
            print(f"wrote {out / 'model.safetensors'}")
            return
        found = list_checkpoints(a.run_dir)
        if not found:
            raise FileNotFoundError(f"{a.run_dir}: no checkpoints/step_* folders")
        chosen = found[-a.last:]
        out = average_checkpoints(chosen, a.output)
        print(f"wrote {out}: mean of {', '.join(c.name for c in chosen)}")

    return run_cli(body)

