"""The planner: parameter counts against built models, activation memory against what
autograd keeps, the fit verdict and its suggestion, and its command line."""

import json
from pathlib import Path

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.models import build_model
from megatron_lite.plan import (
    activation_bytes,
    apply_overrides,
    count_parameters,
    device_spec,
    main,
    measured_activation_bytes,
    parse_memory,
    plan,
    report,
    suggest,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/*/*.yaml"))
TINY = ["model.num_layers=3", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.seq_length=64", "model.max_position_embeddings=64", "model.vocab_size=500",
        "model.make_vocab_size_divisible_by=8", "model.hidden_dropout=0.1",
        "model.attention_dropout=0.1"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_parameter_count_of_every_shipped_config_equals_the_built_model(path):
    cfg = load_config(path)
    built = sum(p.numel() for p in build_model(cfg.model, device="meta").parameters())
    assert count_parameters(cfg, 1)["total"] == built


@pytest.mark.parametrize("name,rounded", [
    ("gpt2/1.2b", "1.2"), ("gpt2/2.5b", "2.5"), ("gpt2/4.2b", "4.2"), ("gpt2/8.3b", "8.3"),
    ("bert/large", "0.34"), ("bert/1.3b", "1.3"), ("bert/3.9b", "3.9")])
def test_the_megatron_papers_models_round_to_its_figures(name, rounded):
    """Table 1's GPT-2 series (vocab padded to 51,200 at every TP) and the BERT models."""
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    out = count_parameters(cfg, cfg.parallel.tensor_parallel_size)
    digits = len(rounded.split(".")[1])
    assert f"{out['total'] / 1e9:.{digits}f}" == rounded
    if name.startswith("gpt2"):
        assert out["padded_vocab"] == 51200


def _per_rank(ctx, overrides, out):
    cfg = load_config(None, overrides + [f"parallel.tensor_parallel_size={ctx.tp_size}"])
    model = build_model(cfg.model, ctx)
    local = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 500, (2, 64), generator=g),
             "labels": torch.randint(0, 500, (2, 64), generator=g)}
    saved = measured_activation_bytes(model, batch, cfg.train.precision, ctx.device)
    if ctx.rank == 0:
        Path(out).write_text(json.dumps([local, saved]))


@pytest.mark.parametrize("tp,extra", [
    (1, ["model.activation_checkpointing=none"]),
    (2, ["model.activation_checkpointing=selective", "train.precision=bf16"]),
    (2, ["model.activation_checkpointing=full"]),
    (1, ["model.activation_checkpointing=none", "train.precision=bf16",
         "model.hidden_dropout=0", "model.attention_dropout=0"])])
def test_per_rank_parameters_and_activations_against_a_real_tp_model(distributed, tmp_path,
                                                                     tp, extra):
    """A model built at TP (gloo): its local parameters are the plan's per-rank count, and
    what autograd saves in a forward is within 15 % of the predicted activations."""
    overrides = TINY + extra
    distributed(_per_rank, tp, overrides, str(tmp_path / "out.json"), tp_size=tp)
    local, saved = json.loads((tmp_path / "out.json").read_text())
    cfg = load_config(None, overrides)
    assert count_parameters(cfg, tp)["per_rank"] == local
    predicted = activation_bytes(cfg, tp, 2)["saved"]
    assert abs(predicted / saved - 1) < 0.15, (predicted, saved)


def test_a_plan_that_does_not_fit_proposes_a_change_the_planner_accepts():
    cfg = load_config(ROOT / "configs/gpt2/8.3b.yaml")
    with torch.device("meta"):
        out = plan(cfg, 1, 8, "a100-80g")
        assert not out["fits"] and out["max_micro_batch"] == 0
        fix = suggest(cfg, 1, 8, "a100-80g")
        assert fix is not None
        fixed = plan(apply_overrides(cfg, fix["overrides"]), fix["tp"], 8, "a100-80g")
    assert fixed["fits"]
    # what fits is said so, with the largest micro-batch that still does
    small = load_config(ROOT / "configs/gpt2/124m.yaml")
    with torch.device("meta"):
        ok = plan(small, 1, 1, "h100")
        assert ok["fits"] and ok["max_micro_batch"] >= small.train.micro_batch_size
        bigger = apply_overrides(small, [f"train.micro_batch_size={ok['max_micro_batch']}"])
        assert plan(bigger, 1, 1, "h100")["fits"]


def test_zero_partitions_optimizer_state_over_dp():
    cfg = load_config(ROOT / "configs/gpt2/1.5b.yaml")
    with torch.device("meta"):
        ddp = plan(cfg, 4, 8, "h100")["memory_per_rank"]
        z1 = plan(apply_overrides(cfg, ["parallel.engine=deepspeed"]), 4, 8, "h100")
        z2 = plan(apply_overrides(cfg, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
                  4, 8, "h100")
    p = z1["params_per_rank"]
    assert ddp["optimizer"] == 8 * p and ddp["ddp_buckets"] == 4 * p
    assert z1["memory_per_rank"]["optimizer"] == int(12 * p / 8)  # bf16: fp32 masters + Adam
    assert z2["memory_per_rank"]["gradients"] == int(2 * p / 8)
    assert z2["memory_per_rank"]["total"] < z1["memory_per_rank"]["total"] < ddp["total"]


def test_bf16_params_state_is_18_bytes_per_parameter():
    """train.params_dtype=bf16: bf16 weight 2 + fp32 main grad 4 + master 4 + Adam 8, no DDP
    buckets (the main grads are reduced in place)."""
    cfg = load_config(ROOT / "configs/gpt2/1.5b.yaml", ["train.params_dtype=bf16"])
    with torch.device("meta"):
        out = plan(cfg, 2, 4, "h100")
    p, mem = out["params_per_rank"], out["memory_per_rank"]
    assert (mem["weights"], mem["gradients"], mem["masters"], mem["optimizer"]) == \
        (2 * p, 4 * p, 4 * p, 8 * p)
    assert "ddp_buckets" not in mem
    assert "masters" in report(out)


@pytest.mark.parametrize("text,value", [("80GiB", 80 * 2**30), ("80G", 80 * 2**30),
                                        ("81920M", 80 * 2**30), ("80GB", 80 * 10**9),
                                        ("1.5T", int(1.5 * 2**40))])
def test_memory_sizes_parse(text, value):
    assert parse_memory(text) == value


def test_command_line_json_and_errors(capsys):
    assert main([str(ROOT / "configs/gpt2/8.3b.yaml"), "--tp", "8", "--dp", "4", "--device",
                 "h100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_per_rank", "memory_per_rank", "device_memory", "fits",
                "max_micro_batch", "flops_per_step", "tp_allreduce_bytes_per_step",
                "dp_allreduce_bytes_per_step", "suggestion"):
        assert key in out
    assert out["fits"] and out["suggestion"] is None and out["tp_allreduce_bytes_per_step"] > 0
    assert main([str(ROOT / "configs/gpt2/8.3b.yaml"), "--tp", "1", "--device", "80G"]) == 0
    text = capsys.readouterr().out
    assert "does NOT fit" in text and "cheapest fix:" in text
    for bad in (["--device", "tpu9"], ["--tp", "5"]):
        assert main([str(ROOT / "configs/gpt2/124m.yaml"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


def test_auto_micro_batch_and_token_batches_are_planned(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  num_layers: 2\n  hidden_size: 64\n  num_attention_heads: 4\n"
                      "  seq_length: 128\n  max_position_embeddings: 128\n")
    assert main([str(config), "train.micro_batch_size=auto",
                 "train.global_batch_tokens=65536", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["global_batch_size"] == 512  # 65536 / 128 tokens
    assert out["config"]["micro_batch_size"] == 1 and out["max_micro_batch"] >= 1


def test_a_smaller_micro_batch_dividing_the_batch_comes_before_full_recomputation():
    cfg = load_config(ROOT / "configs/gpt2/124m.yaml", ["train.micro_batch_size=8",
                                                        "train.global_batch_size=24"])
    with torch.device("meta"):
        full = plan(cfg, 1, 1, "h100")["memory_per_rank"]["total"]
        fix = suggest(cfg, 1, 1, f"{int(full * 0.8 / 2**20)}M")
    assert fix["overrides"] in (["model.activation_checkpointing=selective"],
                                ["train.micro_batch_size=6"], ["train.micro_batch_size=4"],
                                ["train.micro_batch_size=3"])  # divisors of 24 below 8


def test_one_device_table_serves_the_planner_and_the_mfu():
    from megatron_lite.devices import DEVICES, device_for_cuda_name

    # names as torch.cuda.get_device_name reports them; "A100" must not read as "A10"
    assert device_for_cuda_name("NVIDIA A100-SXM4-80GB") is DEVICES["a100-80g"]
    assert device_for_cuda_name("NVIDIA A10") is DEVICES["a10"]
    assert device_for_cuda_name("NVIDIA H100 80GB HBM3") is DEVICES["h100"]
    assert device_for_cuda_name("NVIDIA GeForce RTX 4090") is None
    assert device_spec("a100-80g")["peak_flops"] == {"bf16": 312e12, "fp32": 19.5e12}


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_checkpoint_bytes_equal_a_saved_sharded_checkpoint(tmp_path, arch):
    from megatron_lite.checkpoint import save_checkpoint
    from megatron_lite.checkpoint.sharded import read_dcp_metadata
    from megatron_lite.parallel import ParallelContext
    from megatron_lite.training.optim import build_optimizer

    cfg = load_config(None, [*TINY, f"model.arch={arch}", "model.make_vocab_size_divisible_by=64"])
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    ckpt = save_checkpoint(tmp_path, 1, model, ParallelContext(), cfg, {}, optimizer=opt)
    md = read_dcp_metadata(ckpt / ".metadata")
    saved = sum(t.size.numel() * t.properties.dtype.itemsize
                for t in md.state_dict_metadata.values())
    out = plan(cfg, 2, 3, "h100")
    assert out["checkpoint_bytes"] == saved  # the vocab (500, padded to 512) unpadded
    assert out["checkpoint_bytes_per_rank"] == -(-saved // 6)
    assert "checkpoint:" in report(out) and "GB/s of disk per node" in report(out)


def test_distributed_optimizer_is_megatrons_count_and_is_suggested_first():
    """6 + 12/d bytes/param with bf16 weights and fp32 main grads, 8 + 8/d with fp32
    weights (they are the masters); suggested before ZeRO when DDP does not fit."""
    cfg = load_config(ROOT / "configs/gpt2/1.5b.yaml", [
        "train.precision=bf16", "train.params_dtype=bf16", "train.micro_batch_size=1",
        "model.activation_checkpointing=full"])
    with torch.device("meta"):
        ddp = plan(cfg, 1, 8, "24G")
        low = plan(apply_overrides(cfg, ["parallel.distributed_optimizer=true"]), 1, 8, "24G")
        fp32 = plan(apply_overrides(cfg, ["parallel.distributed_optimizer=true",
                                          "train.params_dtype=fp32"]), 1, 8, "24G")
        fix = suggest(cfg, 1, 8, "24G")
    p = low["params_per_rank"]
    states = lambda out: sum(v for k, v in out["memory_per_rank"].items()  # noqa: E731
                             if k not in ("total", "activations", "temporary"))
    assert states(low) == pytest.approx((6 + 12 / 8) * p, abs=8)
    assert states(fp32) == pytest.approx((8 + 8 / 8) * p, abs=8)
    assert "ddp_buckets" not in fp32["memory_per_rank"]
    assert not ddp["fits"] and low["fits"]
    assert fix["overrides"] == ["parallel.distributed_optimizer=true"]
    assert "distributed optimizer" in report(low)
