"""Launcher environments, the TP x DP grid, validation errors and the test harness itself."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_lite.parallel import (
    ParallelConfigError,
    init_parallel,
    pad_vocab_size,
    read_launch_env,
    validate_parallel_config,
)
from megatron_lite.parallel.state import first_slurm_host
from tests.distributed import DistributedTestFailure, gather_shards


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    got = read_launch_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (3, 8, 1, "torchrun")
    assert (got.master_addr, got.master_port) == ("n0", 1234)


def test_slurm_env():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[007-010,12],cpu1", "SLURM_JOB_ID": "4242"}
    got = read_launch_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (5, 8, 1, "slurm")
    assert got.master_addr == "gpu007"
    assert got.master_port == 15000 + 4242


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"),
    ("node1,node2", "node1"),
    ("a-b[3,5-7]", "a-b3"),
    ("gpu[001-004]", "gpu001"),
    ("x[9],y[1-2]", "x9"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_single_process_needs_no_environment():
    ctx = init_parallel(1, env={})
    assert (ctx.rank, ctx.world_size, ctx.tp_size, ctx.dp_size) == (0, 1, 1, 1)
    assert ctx.tp_group is None and ctx.dp_group is None and not dist.is_initialized()


def test_bad_env_value_is_one_clear_error():
    with pytest.raises(ParallelConfigError, match="RANK='x'"):
        read_launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_validation_names_every_problem():
    with pytest.raises(ParallelConfigError) as err:
        validate_parallel_config(6, 4)
    assert "world size 6 is not divisible by parallel.tensor_parallel_size=4" in str(err.value)

    with pytest.raises(ParallelConfigError) as err:
        validate_parallel_config(8, 4, hidden_size=66, num_attention_heads=6, ffn_hidden_size=264)
    msg = str(err.value)
    assert "model.hidden_size=66" in msg and "model.num_attention_heads=6" in msg
    assert "model.ffn_hidden_size" not in msg  # 264 divides by 4
    assert "\n" not in msg

    with pytest.raises(ParallelConfigError, match="global_batch_size=10"):
        validate_parallel_config(4, 2, global_batch_size=10, micro_batch_size=4)
    validate_parallel_config(8, 2, hidden_size=64, num_attention_heads=4,
                             global_batch_size=32, micro_batch_size=2)


def test_init_refuses_bad_layout_before_any_group():
    env = {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(ParallelConfigError, match="not divisible"):
        init_parallel(2, env=env)
    assert not dist.is_initialized()


def test_pad_vocab_size_matches_megatron():
    assert [pad_vocab_size(50257, 128, tp) for tp in (1, 2, 4, 8)] == [50304, 50432, 50688, 51200]


def _check_grid(ctx) -> None:
    assert (ctx.tp_size, ctx.dp_size) == (2, 2)
    assert (ctx.tp_rank, ctx.dp_rank) == (ctx.rank % 2, ctx.rank // 2)
    me = torch.tensor([ctx.rank])
    tp_peers = [int(t) for t in gather_shards(me, ctx.tp_group)]
    dp_peers = [int(t) for t in gather_shards(me, ctx.dp_group)]
    assert tp_peers == [ctx.rank - ctx.rank % 2, ctx.rank - ctx.rank % 2 + 1]  # consecutive
    assert dp_peers == [ctx.rank % 2, ctx.rank % 2 + 2]  # strided


def test_tp_groups_are_consecutive_and_dp_groups_strided(distributed):
    distributed(_check_grid, 4, tp_size=2)


def _rank1_raises(ctx) -> None:
    if ctx.rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    dist.all_reduce(torch.ones(1))  # rank 0 blocks here: its peer never arrives


def _rank1_dies(ctx) -> None:
    if ctx.rank == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def test_harness_reraises_child_failure_without_hanging(distributed):
    start = time.monotonic()
    with pytest.raises(DistributedTestFailure, match="(?s)rank1 failed first.*failed on purpose"):
        distributed(_rank1_raises, 2)
    with pytest.raises(DistributedTestFailure, match="rank1 exited with code 3"):
        distributed(_rank1_dies, 2)
    assert time.monotonic() - start < 60
