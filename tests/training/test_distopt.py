"""``parallel.distributed_optimizer=true``: Megatron's distributed optimizer in the native
engine, against one process, the DDP engine, its own checkpoints and theirs.

Several runs share one group of processes (:func:`_runs`): a rank starts once for them."""

import json
import math
from pathlib import Path

import pytest
import torch

import megatron_lite.training.distopt as distopt
from megatron_lite.checkpoint import load_file, resolve_checkpoint
from megatron_lite.config import load_config
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.comm import all_reduce
from megatron_lite.training.trainer import Trainer
from tests.distributed import run_distributed
from tests.training.conftest import tiny_overrides

DISTOPT = {"parallel.distributed_optimizer": True}
# several buckets (the tiny GPT has ~90k parameters, 5k a bucket): the bucket logic is exercised
SMALL_BUCKETS = {"parallel.ddp_bucket_mb": 0.02}
STEP3 = "checkpoints/step_00000003"
# a new run from the step-3 weights in bf16: the fp32 masters must come from the file
FINETUNE = {"train.finetune": True, "train.max_steps": 2, "train.save_interval": 0,
            "train.precision": "bf16", "train.params_dtype": "bf16"}


def _over(gpt_shard, bpe_files, run, **kw):
    return tiny_overrides(gpt_shard, bpe_files, run, **{
        "train.max_steps": 6, "train.eval_interval": 0, "train.save_interval": 3, **kw})


def _runs(ctx, runs):
    """Train each override list in turn on the same processes."""
    for overrides in runs:
        Trainer(load_config(None, overrides), ctx).fit()


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _assert_close(ref, got, rtol):
    ref = [r for r in ref if r["step"] in {g["step"] for g in got}]
    assert [r["step"] for r in got] == [r["step"] for r in ref] and got
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        for key in ("loss", "grad_norm"):
            worst = max(worst, abs(a[key] - b[key]) / abs(a[key]))
    print(f"largest relative difference {worst:.1e}")
    assert worst <= rtol


def _same(rows):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows]


@pytest.fixture(scope="module")
def one_process(gpt_shard, bpe_files, tmp_path_factory):
    """The reference: one process, the plain model, fp32, 6 steps, checkpoints at 3 and 6."""
    run = tmp_path_factory.mktemp("one") / "run"
    _runs(ParallelContext(), [_over(gpt_shard, bpe_files, run)])
    rows = _rows(run)
    assert max(r["grad_norm"] for r in rows) > 1.0  # optim.clip_grad=1.0 is exercised
    return run


@pytest.fixture(scope="module")
def dp2(gpt_shard, bpe_files, tmp_path_factory, one_process):
    """DP=2: DDP; the distributed optimizer; it again stopped after 3 steps and resumed;
    it from the one-process (DDP) run's step-3 checkpoint."""
    tmp = tmp_path_factory.mktemp("dp2")
    over = lambda name, **kw: _over(gpt_shard, bpe_files, tmp / name,  # noqa: E731
                                    **{**DISTOPT, **SMALL_BUCKETS, **kw})
    run_distributed(_runs, 2, [
        _over(gpt_shard, bpe_files, tmp / "ddp"),
        over("dist"),
        over("resumed", **{"train.exit_after": 3}), over("resumed"),
        over("from_ddp", **{"train.load": one_process / STEP3}),
        *(_over(gpt_shard, bpe_files, tmp / f"finetune_{name}", **{
            **FINETUNE, **extra, "train.load": one_process / STEP3})
          for name, extra in (("ddp", {}), ("dist", {**DISTOPT, **SMALL_BUCKETS}))),
    ], tp_size=1)
    return tmp


def test_dp2_equals_one_process_and_ddp(one_process, dp2):
    _assert_close(_rows(one_process), _rows(dp2 / "dist"), 1e-5)
    _assert_close(_rows(dp2 / "ddp"), _rows(dp2 / "dist"), 1e-5)


def test_tp2_dp2_equals_one_process(gpt_shard, bpe_files, tmp_path, one_process):
    run_distributed(_runs, 4, [_over(gpt_shard, bpe_files, tmp_path / "dist", **{
        "parallel.tensor_parallel_size": 2, **DISTOPT, **SMALL_BUCKETS})], tp_size=2)
    _assert_close(_rows(one_process), _rows(tmp_path / "dist"), 1e-5)


def test_resume_is_bitwise_and_checkpoints_cross_engines(gpt_shard, bpe_files, tmp_path,
                                                         one_process, dp2):
    assert _same(_rows(dp2 / "resumed")) == _same(_rows(dp2 / "dist"))
    # DDP's checkpoint (DP=1) into the distributed optimizer at DP=2: masters and moments
    _assert_close(_rows(one_process), _rows(dp2 / "from_ddp"), 1e-5)
    assert [r["step"] for r in _rows(dp2 / "from_ddp")] == [4, 5, 6]
    # the distributed optimizer's (DP=2) into DDP on one process: the same steps 4-6
    _runs(ParallelContext(), [_over(gpt_shard, bpe_files, tmp_path / "to_ddp", **{
        "train.load": dp2 / "dist" / STEP3})])
    _assert_close(_rows(dp2 / "dist"), _rows(tmp_path / "to_ddp"), 1e-5)


def test_finetune_starts_from_the_fp32_masters_with_a_fresh_optimizer(dp2):
    # DDP's bf16 (MainParams) loads the fp32 masters from the checkpoint; so must the
    # distributed optimizer's sharded ones (masters from the rounded bf16 weights would
    # differ by bf16's rounding, ~1e-3)
    _assert_close(_rows(dp2 / "finetune_ddp"), _rows(dp2 / "finetune_dist"), 1e-5)
    assert [r["step"] for r in _rows(dp2 / "finetune_dist")] == [1, 2]


def _bf16_checked(ctx, ddp, dist):
    """The DDP bf16 run, then the distributed optimizer's, whose first step records when
    each bucket's reduce-scatter starts; then its masters and moments are checked."""
    Trainer(load_config(None, ddp), ctx).fit()
    trainer = Trainer(load_config(None, dist), ctx)
    do = trainer.distopt
    calls = []
    real = distopt._reduce_scatter

    def spy(*args, **kwargs):
        calls.append(len(do.events))  # the collective starts after this many events
        return real(*args, **kwargs)

    distopt._reduce_scatter, do.record = spy, True
    trainer.fit()
    distopt._reduce_scatter = real
    # overlap: in the first step's (last micro-batch's) backward, the first bucket's
    # reduce-scatter started before the last gradient arrived
    grads = [i for i, (kind, _) in enumerate(do.events) if kind == "grad"]
    last_grad = grads[len(do.params) - 1]  # the first step's last gradient
    assert len(do.buckets) >= 3
    assert calls[0] < last_grad, (calls[:3], last_grad)
    assert do.events[calls[0] - 1] == ("launch", 0)  # bucket 0: the last layers' gradients
    assert len(calls) == trainer.cfg.train.max_steps * len(do.buckets)  # no_sync: none
    # masters: fp32, this rank's slice only; the bf16 weights are them rounded
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in params)
    total = sum(p.numel() for p in params)
    held = sum(pc.flat.numel() for pc in do.pieces)
    assert all(pc.flat.dtype == torch.float32 for pc in do.pieces)
    assert total / 2 <= held <= total / 2 + len(do.buckets)  # +1 padding per bucket
    both = all_reduce(torch.tensor([float(held)]), ctx.dp_group).item()
    assert both == sum(b.size for b in do.buckets) and both - total < 2 * len(do.buckets)
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel()
                  for s in do.base.state.values())
    assert moments == 2 * held
    for pc in do.pieces:
        assert torch.equal(do.param_buffer[pc.start:pc.stop], pc.flat.to(torch.bfloat16))


def test_bf16_params_follow_ddp_bf16_with_sharded_fp32_masters(gpt_shard, bpe_files, tmp_path):
    bf16 = {"train.precision": "bf16", "train.params_dtype": "bf16", "train.save_interval": 0}
    ddp = _over(gpt_shard, bpe_files, tmp_path / "ddp", **bf16)
    dist = _over(gpt_shard, bpe_files, tmp_path / "dist", **bf16, **DISTOPT, **SMALL_BUCKETS)
    run_distributed(_bf16_checked, 2, ddp, dist, tp_size=1)
    _assert_close(_rows(tmp_path / "ddp"), _rows(tmp_path / "dist"), 2e-3)
    assert not any(math.isnan(r["loss"]) for r in _rows(tmp_path / "dist"))


def _parts(ctx, ddp_drop, dist_drop, span, fp16):
    """LayerDrop under DDP and the distributed optimizer; adaptive span with bf16
    weights; an fp16 overflow that skips the step (all on the same processes)."""
    _runs(ctx, [ddp_drop, dist_drop, span])
    trainer = Trainer(load_config(None, fp16), ctx)
    params = list(trainer.model.parameters())
    before = [p.detach().clone() for p in params]
    trainer.scaler.scale = 3e38  # loss x scale overflows: every gradient becomes inf
    out = trainer.train_step()
    assert out["skipped"] and math.isnan(out["grad_norm"])
    assert trainer.scaler.scale == 1.5e38
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all(not s for s in trainer.optimizer.state.values())  # Adam untouched
    trainer.scaler.scale = 2.0**10
    out = trainer.train_step()
    assert not out["skipped"] and math.isfinite(out["loss"]) and out["grad_norm"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, params, strict=True))


def test_layerdrop_adaptive_span_and_fp16(gpt_shard, bpe_files, tmp_path):
    drop = {"model.num_layers": 4, "model.layerdrop": 0.5, "train.save_interval": 0}
    span = {"model.position_embedding": "relative", "model.adaptive_span": True,
            "model.attn_span": 64, "model.adaptive_span_init": 0.0005,
            "model.adaptive_span_loss": 10.0, "data.ordering": "consecutive",
            "train.max_steps": 4, "train.precision": "bf16", "train.params_dtype": "bf16"}
    run_distributed(_parts, 2,
                    _over(gpt_shard, bpe_files, tmp_path / "ddp_drop", **drop),
                    _over(gpt_shard, bpe_files, tmp_path / "drop", **drop, **DISTOPT),
                    _over(gpt_shard, bpe_files, tmp_path / "span", **span, **DISTOPT),
                    _over(gpt_shard, bpe_files, tmp_path / "fp16", **DISTOPT, **{
                        "train.precision": "fp16", "model.seq_length": 8,
                        "train.global_batch_size": 4, "train.micro_batch_size": 2}),
                    tp_size=1)
    # LayerDrop p=0.5, each DP rank dropping its own layers: zero gradients reduce like
    # any other (the tolerance of the ZeRO engine's test: Adam amplifies the engines'
    # different summation orders on the elements LayerDrop zeroes or halves)
    _assert_close(_rows(tmp_path / "ddp_drop"), _rows(tmp_path / "drop"), 1e-3)
    # a large penalty pushes every span below 0: the clamp reaches the sharded fp32
    # masters, so the spans stay at 0 (the saved masters in range) instead of drifting
    assert _rows(tmp_path / "span")[-1]["span_max"] == [0.0, 0.0]
    state = load_file(resolve_checkpoint(tmp_path / "span") / "model.pt")
    spans = [v for k, v in state.items() if k.endswith("adaptive.fraction")]
    assert len(spans) == 2 and all(((s >= 0) & (s <= 1)).all() for s in spans)
    assert all(s.dtype == torch.float32 for s in spans)
