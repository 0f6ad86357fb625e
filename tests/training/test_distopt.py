"""``parallel.distributed_optimizer=true``: Megatron's distributed optimizer in the native
engine, against one process, the DDP engine, and its own checkpoints."""

import json
from pathlib import Path

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.parallel import ParallelContext
from megatron_lite.training.trainer import Trainer
from tests.distributed import run_distributed
from tests.training.conftest import tiny_overrides

DISTOPT = {"parallel.distributed_optimizer": True}
# several buckets (the tiny GPT has ~60k parameters): the bucket logic is exercised
SMALL_BUCKETS = {"parallel.ddp_bucket_mb": 0.05}


def _train(ctx, overrides):
    Trainer(load_config(None, overrides), ctx).fit()


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _assert_close(ref, got, rtol):
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got, strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= rtol * abs(a[key]), (key, a, b)


def _over(gpt_shard, bpe_files, run, **kw):
    return tiny_overrides(gpt_shard, bpe_files, run, **{
        "train.max_steps": 6, "train.eval_interval": 0, **kw})


@pytest.fixture(scope="module")
def one_process(gpt_shard, bpe_files, tmp_path_factory):
    """The reference: one process, the plain model, fp32, 6 steps (clipping active)."""
    run = tmp_path_factory.mktemp("one")
    _train(ParallelContext(), _over(gpt_shard, bpe_files, run))
    rows = _rows(run)
    assert max(r["grad_norm"] for r in rows) > 1.0  # optim.clip_grad=1.0 is exercised
    return rows


@pytest.mark.parametrize("tp", [1, 2])
def test_dp2_equals_one_process_and_ddp(gpt_shard, bpe_files, tmp_path, one_process, tp):
    world = 2 * tp
    ddp = _over(gpt_shard, bpe_files, tmp_path / "ddp",
                **{"parallel.tensor_parallel_size": tp})
    dist = _over(gpt_shard, bpe_files, tmp_path / "dist",
                 **{"parallel.tensor_parallel_size": tp, **DISTOPT, **SMALL_BUCKETS})
    run_distributed(_train, world, ddp, tp_size=tp)
    run_distributed(_train, world, dist, tp_size=tp)
    _assert_close(one_process, _rows(tmp_path / "dist"), 1e-5)
    _assert_close(_rows(tmp_path / "ddp"), _rows(tmp_path / "dist"), 1e-5)
