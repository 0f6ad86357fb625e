"""Sequence parallelism through the trainer: TP=N with it equals TP=1; exact resume."""

import json

import pytest

from megatron_lite.config import load_config
from megatron_lite.training.trainer import Trainer
from tests.training import test_checkpoints
from tests.training.conftest import tiny_overrides
from tests.training.test_compile import _count_breaks


def _train(ctx, overrides):
    cfg = load_config(None, overrides)
    Trainer(cfg, ctx).fit()
    # the last forward (validation, seq_length divisible by TP) split the sequence
    assert ctx.sequence_parallel.active == (cfg.parallel.sequence_parallel and ctx.tp_size > 1)


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows
                                                      if "val_loss" in r]


@pytest.mark.parametrize("runs", [{"tp2-sp": (2, 2)},
                                  pytest.param({"tp4-sp": (4, 4), "tp2xdp2-sp": (4, 2)},
                                               marks=pytest.mark.slow)],
                         ids=["tp2", "tp4-and-tp2xdp2"])
def test_sequence_parallel_trains_like_tp1(distributed, gpt_shard, bpe_files, tmp_path, runs):
    """Through the trainer (fp32, dropout off): the losses of TP=N with sequence
    parallelism equal TP=1's within 1e-5 relative, step by step and in validation."""
    common = {"train.max_steps": 4, "train.eval_interval": 2}
    ref_dir = tmp_path / "tp1"
    distributed(_train, 1, tiny_overrides(gpt_shard, bpe_files, ref_dir, **common), tp_size=1)
    ref, ref_val = _losses(ref_dir)
    assert len(ref) == 4 and ref[-1] < ref[0]
    for name, (world, tp) in runs.items():
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / name, **common,
                              **{"parallel.tensor_parallel_size": tp,
                                 "parallel.sequence_parallel": True})
        distributed(_train, world, over, tp_size=tp)
        got, val = _losses(tmp_path / name)
        rel = max(abs(a - b) / abs(b) for a, b in zip(got + val, ref + ref_val, strict=True))
        print(f"{name}: max relative loss difference vs TP=1 {rel:.2e}")
        assert rel <= 1e-5, f"{name} deviates from TP=1 by {rel:.2e}"


def _norms(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


def test_sequence_parallel_with_the_distributed_optimizer(distributed, gpt_shard, bpe_files,
                                                          tmp_path):
    """The norm gradients are summed over TP once (by the hook at the source), not again
    by the engine: TP=2 with sequence parallelism and the distributed optimizer follows
    TP=1 in losses and gradient norms (a second sum doubles the norm weights' gradients,
    which Adam's update hides but the norm does not)."""
    common = {"train.max_steps": 4, "train.eval_interval": 2}
    ref_dir, sp_dir = tmp_path / "tp1", tmp_path / "tp2-sp-distopt"
    distributed(_train, 1, tiny_overrides(gpt_shard, bpe_files, ref_dir, **common), tp_size=1)
    distributed(_train, 2, tiny_overrides(gpt_shard, bpe_files, sp_dir, **common, **{
        "parallel.tensor_parallel_size": 2, "parallel.sequence_parallel": True,
        "parallel.distributed_optimizer": True}), tp_size=2)
    (ref, ref_val), (got, val) = _losses(ref_dir), _losses(sp_dir)
    pairs = zip(got + val + _norms(sp_dir), ref + ref_val + _norms(ref_dir), strict=True)
    rel = max(abs(a - b) / abs(b) for a, b in pairs)
    assert rel <= 1e-5, f"deviates from TP=1 by {rel:.2e}"


@pytest.mark.slow
def test_sequence_parallel_resume_is_bitwise_exact(distributed, gpt_shard, bpe_files, tmp_path):
    # the checkpoint test's own harness (dropout on, a run split at step 6 vs straight)
    test_checkpoints.test_resume_is_bitwise_exact(distributed, gpt_shard, bpe_files, tmp_path, 2, 2,
                                 {"parallel.sequence_parallel": True,
                                  "model.activation_checkpointing": "selective"})




def _count_breaks_sp(ctx) -> None:
    ctx.sequence_parallel.enabled = True
    _count_breaks(ctx)
    assert ctx.sequence_parallel.active


@pytest.mark.slow  # dynamo traces every region on each rank
def test_sequence_parallel_regions_compile_without_graph_breaks(distributed):
    # train.compile's regions (each sublayer, GPT's loss) with the all-gathers and
    # reduce-scatters as functional collectives and the region's dropout hashed
    distributed(_count_breaks_sp, 2)


@pytest.mark.slow  # inductor compiles the model in every rank
def test_sequence_parallel_compiled_training_matches_eager(distributed, gpt_shard, bpe_files,
                                                           tmp_path):
    losses = {}
    for compile_ in (False, True):
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / f"c{compile_}", **{
            "train.compile": compile_, "parallel.tensor_parallel_size": 2,
            "parallel.sequence_parallel": True, "train.max_steps": 6,
            "train.eval_interval": 0})
        distributed(_train, 2, over, tp_size=2)
        losses[compile_] = _losses(tmp_path / f"c{compile_}")[0]
    diff = max(abs(a - b) for a, b in zip(losses[True], losses[False], strict=True))
    print(f"sequence parallel TP=2: max |compiled - eager| = {diff:.1e}")
    assert len(losses[True]) == 6 and diff <= 1e-5


@pytest.mark.slow
def test_sequence_parallel_under_zero2_matches_ddp(distributed, gpt_shard, bpe_files, tmp_path):
    """DeepSpeed ZeRO-2 (TP=2 x DP=2) sees the norms' gradients already summed over TP
    (the hook runs before any engine's) and counts them once in its clipping norm."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    rows = {}
    for name, extra in (("ddp", {}), ("zero2", {"parallel.engine": "deepspeed",
                                                "parallel.zero_stage": 2})):
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / name, **{
            "parallel.tensor_parallel_size": 2, "parallel.sequence_parallel": True,
            "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
            "train.max_steps": 6, "train.eval_interval": 6, **extra})
        distributed(_train, 4, over, tp_size=2)
        rows[name] = [json.loads(x) for x in
                      (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    ref, got = rows["ddp"], rows["zero2"]
    assert max(r["grad_norm"] for r in ref if "grad_norm" in r) > 1.0  # clipping exercised
    for a, b in zip(ref, got, strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]), (key, a, b)
