"""Process groups for tensor (TP), data (DP) and pipeline (PP) parallelism.

The grid is ``world = TP x DP x PP`` in Megatron's order: TP innermost (blocks of
consecutive ranks, so on a multi-GPU node the TP partners share NVLink), then DP, then
PP outermost (a pipeline stage is a block of ``TP x DP`` consecutive ranks, so stages
sit on different nodes and only their point-to-point activations cross between them):

    world 8, TP 2:         TP [0,1] [2,3] [4,5] [6,7]    DP [0,2,4,6] [1,3,5,7]
    world 8, TP 2, PP 2:   TP [0,1] [2,3] [4,5] [6,7]    DP [0,2] [1,3] [4,6] [5,7]
                           PP [0,4] [1,5] [2,6] [3,7]    (rank = tp + TP x (dp + DP x pp))

Everything that needs a group receives it explicitly, from a :class:`ParallelContext`;
there are no module-level globals. A group of size one is represented by ``None`` and
every collective in this package treats ``None`` as "nothing to communicate".
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lite.parallel.random import TPRNGTracker


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work (raised before any process group is made)."""


# ---------------------------------------------------------------------------------------
# Launcher environment
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by its launcher."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # torchrun | slurm | single


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``.

    Args:
        nodelist: the value of ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``).
    """
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise ParallelConfigError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # keeps zero padding: "003"
    return prefix + first


def _env_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ParallelConfigError(
            f"environment variable {key}={env[key]!r} is not an integer") from None


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank and rendezvous from torchrun, SLURM, or nothing (one process).

    torchrun's variables win when both are present (torchrun inside a SLURM allocation).

    Args:
        env: the environment to read; ``os.environ`` by default.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=_env_int(env, "RANK"),
            world_size=_env_int(env, "WORLD_SIZE"),
            local_rank=_env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_env_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        if "MASTER_PORT" in env:
            port = _env_int(env, "MASTER_PORT")
        else:  # NOTE: derive the port from the job id so two jobs on one node do not collide.
            port = 15000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000
        return LaunchEnv(
            rank=_env_int(env, "SLURM_PROCID"),
            world_size=_env_int(env, "SLURM_NTASKS"),
            local_rank=_env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=port,
            launcher="slurm",
        )
    return LaunchEnv()


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def _world_hint(world_size: int, tp: int) -> str:
    """Which launcher or key to change when the world size does not split into TP groups."""
    if world_size == 1:
        return (f"run with torchrun --nproc-per-node {tp} (launch/torchrun.sh), or add "
                "parallel.tensor_parallel_size=1")
    return (f"start a multiple of {tp} processes (torchrun --nproc-per-node), or add "
            f"parallel.tensor_parallel_size=N with N dividing {world_size}")


def validate_parallel_config(
    world_size: int,
    tensor_parallel_size: int,
    *,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    ffn_hidden_size: int | None = None,
    global_batch_size: int | None = None,
    micro_batch_size: int | None = None,
    pipeline_parallel_size: int = 1,
) -> None:
    """Check a layout up front and raise one :class:`ParallelConfigError` naming every problem.

    Args:
        world_size: number of processes in the job.
        tensor_parallel_size: TP degree; data-parallel size is ``world_size // tp``.
        hidden_size, num_attention_heads, ffn_hidden_size: model dims that TP splits.
        global_batch_size, micro_batch_size: must satisfy ``global = micro x accum x DP``.
        pipeline_parallel_size: PP degree; data-parallel size is ``world_size // (tp x pp)``.
    """
    problems = []
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if tp < 1:
        problems.append(f"parallel.tensor_parallel_size={tp} must be >= 1")
    elif pp < 1:
        problems.append(f"parallel.pipeline_parallel_size={pp} must be >= 1")
    elif world_size % (tp * pp):
        problems.append(
            f"world size {world_size} is not divisible by parallel.tensor_parallel_size={tp}"
            + (f" x parallel.pipeline_parallel_size={pp}" if pp > 1 else "")
            + f": {_world_hint(world_size, tp * pp)}")
    else:
        for key, value in (
            ("model.hidden_size", hidden_size),
            ("model.num_attention_heads", num_attention_heads),
            ("model.ffn_hidden_size", ffn_hidden_size),
        ):
            if value is not None and value % tp:
                problems.append(
                    f"{key}={value} is not divisible by parallel.tensor_parallel_size={tp}")
        if global_batch_size is not None and micro_batch_size is not None:
            dp = world_size // (tp * pp)
            if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp):
                problems.append(
                    f"train.global_batch_size={global_batch_size} is not a multiple of "
                    f"train.micro_batch_size={micro_batch_size} x data-parallel size {dp}"
                )
    if hidden_size is not None and num_attention_heads and hidden_size % num_attention_heads:
        problems.append(
            f"model.hidden_size={hidden_size} is not divisible by "
            f"model.num_attention_heads={num_attention_heads}"
        )
    if problems:
        raise ParallelConfigError("invalid parallel layout: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------
# The context
# ---------------------------------------------------------------------------------------


class SequenceParallel:
    """Sequence parallelism (Korthikanti et al. 2022) of the models built on one context.

    ``enabled``: ``parallel.sequence_parallel`` at TP > 1 (set once, before the model is
    built; the layers and the norm-gradient hooks hold this object). ``active``: whether
    the forward in progress splits the sequence: the model sets it at the start of each
    forward (a sequence not divisible by TP, or a decoding step with a KV cache, runs
    the plain TP path: same weights, same result). A checkpointed sublayer recomputed
    in backward reads the flag of the forward it belongs to (the latest).
    """

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.active = False

    def begin(self, seq_len: int, tp_size: int, plain: bool = False) -> bool:
        """Decide (and return) ``active`` for a forward of ``seq_len`` positions;
        ``plain``: this forward cannot split (e.g. it extends a KV cache)."""
        self.active = self.enabled and tp_size > 1 and not plain and seq_len % tp_size == 0
        return self.active


@dataclass
class ParallelContext:
    """The single truth about this process's place in the TP x DP x PP grid.

    ``tp_group``/``dp_group``/``pp_group`` are ``None`` when that dimension has size
    one. ``pp_ranks`` are the global ranks of this rank's pipeline, stage by stage;
    ``embedding_group`` joins its first and last stage (GPT's tied embedding), None
    without pipelining; ``model_group`` holds every rank of one model replica (its
    TP x PP ranks: one reduction of a whole-model sum), the TP group without pipelining.
    """

    rank: int = 0
    world_size: int = 1
    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: dist.ProcessGroup | None = None
    pp_ranks: tuple[int, ...] = (0,)
    embedding_group: dist.ProcessGroup | None = None
    model_group: dist.ProcessGroup | None = None  # TP x PP: the ranks of one model replica
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rng: TPRNGTracker = field(default_factory=TPRNGTracker)
    # parallel.sequence_parallel: set before building a model (megatron_lite.run.build_run)
    sequence_parallel: SequenceParallel = field(default_factory=SequenceParallel)

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the one that logs and writes shared files)."""
        return self.rank == 0

    def seed(self, seed: int) -> None:
        """Seed the default RNG identically on every TP rank and the TP-region RNG per rank.

        Follows Megatron: replicated regions (and weight init) draw from the default
        generator, seeded ``seed`` everywhere; dropout inside TP regions draws from a
        tracked state seeded ``seed + 2718 + tp_rank``.
        """
        torch.manual_seed(seed)
        self.rng.device = self.device
        self.rng.reset()  # in place: models built earlier hold this tracker
        self.rng.add(TPRNGTracker.TP_REGION, seed + 2718 + self.tp_rank)


def _grid(world_size: int, tp: int, pp: int = 1
          ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(TP groups, DP groups, PP groups) of the grid, rank = tp + TP x (dp + DP x pp)."""
    stage = world_size // pp  # ranks per pipeline stage: TP x DP
    tp_groups = [list(range(s, s + tp)) for s in range(0, world_size, tp)]
    dp_groups = [list(range(base + i, base + stage, tp))
                 for base in range(0, world_size, stage) for i in range(tp)]
    pp_groups = [list(range(i, world_size, stage)) for i in range(stage)]
    return tp_groups, dp_groups, pp_groups


def init_parallel(
    tensor_parallel_size: int = 1,
    *,
    pipeline_parallel_size: int = 1,
    seed: int = 1234,
    backend: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
) -> ParallelContext:
    """Join the job described by the environment and build the TP and DP groups.

    With no launcher variables this is a one-process job and no process group is
    created. Otherwise the default group is initialized (``nccl`` with CUDA, ``gloo``
    without) unless the caller already did so.

    Args:
        tensor_parallel_size: TP degree; must divide the world size.
        pipeline_parallel_size: PP degree; TP x PP must divide the world size.
        seed: base seed for :meth:`ParallelContext.seed`.
        backend: force a backend (default: nccl if CUDA is available, else gloo).
        env: environment to read (default ``os.environ``).
        timeout_s: collective timeout, so a dead peer ends the job instead of hanging it.
    """
    launch = read_launch_env(env)
    validate_parallel_config(launch.world_size, tensor_parallel_size,
                             pipeline_parallel_size=pipeline_parallel_size)
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", launch.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if use_cuda else "gloo")

    tp, pp = tensor_parallel_size, pipeline_parallel_size
    dp = launch.world_size // (tp * pp)
    ctx = ParallelContext(
        rank=launch.rank,
        world_size=launch.world_size,
        tp_size=tp,
        tp_rank=launch.rank % tp,
        dp_size=dp,
        dp_rank=launch.rank // tp % dp,
        pp_size=pp,
        pp_rank=launch.rank // (tp * dp),
        pp_ranks=(launch.rank,),
        device=device,
    )
    if launch.world_size > 1:
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=timeout_s)
            if launch.launcher == "torchrun" and "TORCHELASTIC_RUN_ID" in (env or os.environ):
                # NOTE: torchrun keeps its store across restarts (--max-restarts); without a
                # per-attempt prefix the new workers read the addresses of the dead ones.
                store, _, _ = next(dist.rendezvous("env://", launch.rank, launch.world_size,
                                                   timeout=timeout))
                attempt = (env or os.environ).get("TORCHELASTIC_RESTART_COUNT", "0")
                dist.init_process_group(
                    backend=backend, store=dist.PrefixStore(f"megatron_lite/{attempt}", store),
                    rank=launch.rank, world_size=launch.world_size, timeout=timeout)
            else:
                dist.init_process_group(
                    backend=backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                    rank=launch.rank, world_size=launch.world_size, timeout=timeout)
        tp_groups, dp_groups, pp_groups = _grid(launch.world_size, tp, pp)
        # NOTE: new_group is collective: every rank creates every group, in the same order.
        for ranks in tp_groups if tp > 1 else []:
            group = dist.new_group(ranks)
            if launch.rank in ranks:
                ctx.tp_group = group
        for ranks in dp_groups if ctx.dp_size > 1 else []:
            group = dist.new_group(ranks)
            if launch.rank in ranks:
                ctx.dp_group = group
        for ranks in pp_groups if pp > 1 else []:
            group = dist.new_group(ranks)
            ends = dist.new_group([ranks[0], ranks[-1]])  # the tied embedding's two copies
            if launch.rank in ranks:
                ctx.pp_group, ctx.pp_ranks = group, tuple(ranks)
            if launch.rank in (ranks[0], ranks[-1]):
                ctx.embedding_group = ends
        stage = tp * ctx.dp_size
        for dp_index in range(ctx.dp_size) if pp > 1 else []:
            ranks = [t + tp * dp_index + stage * k for k in range(pp) for t in range(tp)]
            group = dist.new_group(ranks)
            if launch.rank in ranks:
                ctx.model_group = group
        if pp == 1:
            ctx.model_group = ctx.tp_group
    ctx.seed(seed)
    return ctx


def destroy_parallel() -> None:
    """Tear down the default process group (and with it every subgroup), if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def parallel_session(tensor_parallel_size: int = 1, *, seed: int = 1234,
                     pipeline_parallel_size: int = 1) -> Iterator[ParallelContext]:
    """``init_parallel`` for the block, ``destroy_parallel`` after it (also on an error):
    what every command's body runs in."""
    ctx = init_parallel(tensor_parallel_size, seed=seed,
                        pipeline_parallel_size=pipeline_parallel_size)
    try:
        yield ctx
    finally:
        destroy_parallel()


def group_size(group: dist.ProcessGroup | None) -> int:
    """Size of a group; ``None`` means a group of one."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank inside a group; ``None`` means a group of one."""
    return 0 if group is None else dist.get_rank(group)
