"""What every command line shares: override parsing, one ``error:`` line (exit code 2),
and the shell of the commands that run a config (:func:`config_command`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from megatron_lite.config import Config, load_config
from megatron_lite.parallel import ParallelContext, parallel_session


def _rank() -> int:
    value = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return int(value) if value.isdigit() else 0


# set by ``python -m megatron_lite.launch`` (launch/torchrun.sh): a folder where each
# worker leaves its exit code, so the launcher exits with it instead of torchrun's 1
EXIT_DIR = "MEGATRON_LITE_EXIT_DIR"


def record_exit_code(code: int) -> int:
    """Under :mod:`megatron_lite.launch`: leave this rank's exit code for it. Returns it."""
    folder, rank = os.environ.get(EXIT_DIR), os.environ.get("RANK")
    if folder and rank is not None and os.path.isdir(folder):
        with contextlib.suppress(OSError):
            (Path(folder) / f"rank{rank}").write_text(f"{code}\n")
    return code


def run_cli(body: Callable[[], int | None]) -> int:
    """:func:`_run_cli`, its exit code recorded for the launcher (:func:`record_exit_code`)."""
    return record_exit_code(_run_cli(body))


def _run_cli(body: Callable[[], int | None]) -> int:
    """Run ``body``; turn user-facing errors into one line on stderr and exit code 2.

    Config, layout, data, tokenizer and checkpoint errors are ``ValueError``s and the same
    on every rank, so only rank 0 reports them; an ``OSError`` may be local to one rank,
    so every rank reports its own.
    """
    try:
        return body() or 0
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and exits)
        if _rank() == 0:
            print("interrupted", file=sys.stderr)
        return 130
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


def path_and_overrides(parser: argparse.ArgumentParser, args, required: bool = True) -> None:
    """Sort ``args.checkpoint`` and ``args.overrides`` (both positional, intermixed): the
    one word without ``=`` is the checkpoint, wherever it stands; the rest are
    ``section.key=value`` overrides."""
    words = [args.checkpoint, *args.overrides] if args.checkpoint else list(args.overrides)
    paths = [w for w in words if "=" not in w]
    args.overrides = [w for w in words if "=" in w]
    if len(paths) > 1:
        parser.error(f"one checkpoint, not {len(paths)}: {' '.join(paths)}")
    args.checkpoint = paths[0] if paths else None
    if required and args.checkpoint is None:
        parser.error("the checkpoint (a run folder, its checkpoints/ or a step folder) is "
                     "required")


def config_keys_help(first: str = "") -> str:
    """Every config section and key with its default and meaning, read from the
    dataclasses of :mod:`megatron_lite.config` (the trailing ``# comment`` of a field, else
    the comment just above it); section ``first`` (a command's own: ``distill``) first."""
    lines = ["config keys (section.key=value; YAML: section: {key: value}):"]
    sections = sorted(dataclasses.fields(Config), key=lambda s: s.name != first)
    for section in sections:
        cls = section.type if isinstance(section.type, type) else type(
            getattr(Config(), section.name))
        source = inspect.getsource(cls).splitlines()
        meanings = {}
        for line in source:
            match = re.match(r"\s*(\w+):\s[^=]+=[^#]*?(?:#\s*(.*))?$", line)
            if match:
                meanings[match.group(1)] = match.group(2) or ""
        lines.append(f"  {section.name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f"    {section.name}.{f.name}={default!s}"
            meaning = meanings.get(f.name, "")
            lines.append(f"{text:<46} {meaning}".rstrip())
    return "\n".join(lines)


def config_command(prog: str, doc: str, body: Callable[[Config, ParallelContext], int | None],
                   argv: list[str] | None = None, *, config_help: str,
                   overrides_help: str = "section.key=value", epilog: str | None = None,
                   dry_run: Callable[[Config, ParallelContext], int | None] | None = None
                   ) -> int:
    """The shell of a command that runs a config (train, search, distill): ``CONFIG
    [section.key=value ...]`` parsed (overrides anywhere), the config loaded, a parallel
    session of ``parallel.tensor_parallel_size`` (and ``pipeline_parallel_size``) opened
    around ``body(cfg, ctx)``, and every user error one line (:func:`run_cli`). With
    ``dry_run``, ``--dry-run`` calls it instead of ``body`` (:mod:`megatron_lite.dryrun`).
    Returns the exit code."""
    p = argparse.ArgumentParser(prog=prog, description=doc, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", help=overrides_help)
    if dry_run is not None:
        p.add_argument("--dry-run", action="store_true",
                       help="print the resolved config, the layout, the data plan and the "
                            "planner's verdict, then exit 0 without training or writing")
    a = parse_args(p, argv)

    def run() -> int | None:
        cfg = load_config(a.config, a.overrides)
        with parallel_session(cfg.parallel.tensor_parallel_size, seed=cfg.train.seed,
                              pipeline_parallel_size=cfg.parallel.pipeline_parallel_size) as ctx:
            if getattr(a, "dry_run", False):
                return dry_run(cfg, ctx)
            return body(cfg, ctx)

    return run_cli(run)


def end_of_run(ctx: ParallelContext, run_dir: Path, step: int, interrupted: str | None,
               done: str) -> int:
    """The last line of a training command and its exit code: interrupted by a signal
    (``interrupted`` names it; exit 128 + its number, every rank together), else
    ``done: RUN_DIR at step N (done)``."""
    if interrupted:
        if ctx.is_main:
            print(f"interrupted at step {step} ({interrupted}): saved "
                  f"{Path(run_dir) / 'checkpoints' / f'step_{step:08d}'}; rerun the same "
                  "command to resume", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.barrier()  # exit together: a launcher may kill the rest at the first
        return 128 + signal.Signals[interrupted]
    if ctx.is_main:
        print(f"done: {run_dir} at step {step} ({done})", flush=True)
    return 0
