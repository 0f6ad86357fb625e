"""Run a test body on N gloo processes, the way torchrun would start them."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from megatron_lite.parallel import destroy_parallel, init_parallel, merge_shards
from megatron_lite.parallel.comm import all_gather_list


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# NOTE: every rank is a fresh process with a clean interpreter state, as under torchrun, but
# forked from a server that imported torch and the package once ("forkserver"): "spawn"
# imported torch anew in every rank, 2-3 s of CPU each, most of a small distributed test's
# time on 2 cores. The server holds no threads and has run no torch op when it forks.
START_METHOD = "forkserver"
mp.get_context(START_METHOD).set_forkserver_preload(
    ["torch", "torch.distributed", "megatron_lite.parallel", "megatron_lite.training.trainer"])


class DistributedTestFailure(AssertionError):
    """A rank of a distributed test failed; the message holds the first failure's traceback."""


def _worker(rank: int, world_size: int, port: int, tp_size: int, pp_size: int, err_dir: str,
            env: dict, fn, args) -> None:
    # the caller's environment as it is now (the server's copy is from its own start)
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # NOTE: N processes share 2 cores; oversubscription is slow
    ctx = init_parallel(tp_size, pipeline_parallel_size=pp_size, backend="gloo", timeout_s=120)
    try:
        fn(ctx, *args)
        # NOTE: tear down together: a rank leaving while a peer still works can make gloo
        # abort the peer (SIGABRT) from its background thread.
        if dist.is_initialized():
            dist.barrier()
    except BaseException:
        # NOTE: record the failure before tearing down: peers blocked in a collective then
        # fail with "connection reset", and the runner must report the root cause first.
        # Written aside and renamed: the runner SIGTERMs the survivors as soon as one rank
        # has exited, possibly mid-write, and must never read half a report.
        tmp = Path(err_dir, f".rank{rank}.err.tmp")
        tmp.write_text(f"{time.time()}\n{traceback.format_exc()}")
        os.replace(tmp, Path(err_dir, f"rank{rank}.err"))
        raise
    finally:
        destroy_parallel()


def run_distributed(fn, world_size: int, *args, tp_size: int | None = None,
                    pp_size: int = 1) -> None:
    """Run ``fn(ctx, *args)`` on ``world_size`` processes; re-raise the first failure.

    The grid is ``tp_size`` (default: all ranks but the pipeline's) x DP x ``pp_size``.

    ``fn`` must be a module-level function (it is pickled by reference). When one rank
    fails, ``torch.multiprocessing`` terminates the others, so a peer blocked in a
    collective cannot hang the test. The error raised carries the traceback of the rank
    that failed first (later ones usually only saw their peer disappear).
    """
    with tempfile.TemporaryDirectory() as err_dir:
        context = mp.start_processes(
            _worker, args=(world_size, free_port(), tp_size or world_size // pp_size, pp_size,
                           err_dir, dict(os.environ), fn, args),
            nprocs=world_size, join=False, start_method=START_METHOD)
        try:
            while not context.join():
                pass
        except ProcessException as exc:
            raise DistributedTestFailure(_failure_report(context, err_dir)) from exc


def _failure_report(context, err_dir: str) -> str:
    """Name the root cause: a rank that died without a Python error, else the first traceback."""
    reports = []
    for path in Path(err_dir).glob("rank*.err"):
        stamp, tb = path.read_text().split("\n", 1)
        reports.append((float(stamp), path.stem, tb))
    reports.sort()
    # NOTE: torch.multiprocessing SIGTERMs the survivors once one rank fails; a rank with
    # another non-zero exit code and no traceback file died on its own (os._exit, a signal,
    # the OOM killer) and is what made its peers fail.
    died = [f"rank{i} exited with code {p.exitcode}" for i, p in enumerate(context.processes)
            if p.exitcode not in (0, None, -15) and not Path(err_dir, f"rank{i}.err").exists()]
    if died:
        return "; ".join(died) + (f" (then {reports[0][1]} failed)" if reports else "")
    if not reports:
        return "a rank failed without a traceback"
    _, who, tb = reports[0]
    others = ", ".join(r[1] for r in reports[1:]) or "none"
    return f"{who} failed first (later failures: {others}):\n{tb}"


def gather_shards(t: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (no autograd), in rank order."""
    return all_gather_list(t.detach(), group)


def gather_full(t: torch.Tensor, group, dim: int, stride: int = 1) -> torch.Tensor:
    """Rebuild an unsharded tensor from every rank's shard."""
    return merge_shards(gather_shards(t, group), dim % t.dim(), stride)


def max_dev(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()
