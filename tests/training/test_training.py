"""The trainer end to end on real (stdlib) text, and its parts against references."""

import json
import math

import numpy as np
import pytest
import torch

from megatron_lite.config import ConfigError, OptimConfig, load_config
from megatron_lite.models import build_model
from megatron_lite.parallel import ParallelContext
from megatron_lite.train import main as train_main
from megatron_lite.training.optim import global_grad_norm, param_groups
from megatron_lite.training.precision import DynamicLossScaler
from megatron_lite.training.schedule import learning_rate
from megatron_lite.training.trainer import Trainer
from tests.training.conftest import gpt_yaml, tiny_overrides


def _train(ctx, overrides):
    cfg = load_config(None, overrides)
    Trainer(cfg, ctx).fit()


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], [r["val_loss"] for r in rows if "val_loss" in r]


def test_tp1_tp2_and_tp2xdp2_give_the_same_losses(distributed, gpt_shard, bpe_files, tmp_path):
    runs = {"tp1": (1, 1), "tp2": (2, 2), "tp2dp2": (4, 2)}
    for name, (world, tp) in runs.items():
        overrides = tiny_overrides(gpt_shard, bpe_files, tmp_path / name,
                                   **{"parallel.tensor_parallel_size": tp})
        distributed(_train, world, overrides, tp_size=tp)
    ref, ref_val = _losses(tmp_path / "tp1")
    assert len(ref) == 10 and ref[-1] < ref[0]
    for name in ("tp2", "tp2dp2"):
        got, val = _losses(tmp_path / name)
        rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True))
        print(f"{name}: max relative loss difference vs TP=1 over 10 steps {rel:.2e}")
        assert rel <= 1e-4, f"{name} deviates from TP=1 by {rel:.2e}"
        assert np.allclose(val, ref_val, rtol=1e-4)
    assert (tmp_path / "tp2" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "tp2" / "checkpoints" / "latest").read_text().strip() == "step_00000010"


def test_accumulating_4_micro_batches_equals_one_4x_batch(gpt_shard, bpe_files, tmp_path):
    results = []
    for mb in (2, 8):
        cfg = load_config(None, tiny_overrides(gpt_shard, bpe_files, tmp_path / f"mb{mb}", **{
            "train.micro_batch_size": mb, "train.max_steps": 3, "train.eval_interval": 0}))
        trainer = Trainer(cfg, ParallelContext())
        assert trainer.accum == 8 // mb
        records = trainer.fit()
        results.append(([r["loss"] for r in records], trainer.model.state_dict()))
    (loss_a, state_a), (loss_b, state_b) = results
    assert np.allclose(loss_a, loss_b, rtol=1e-5, atol=0)
    for k in state_a:
        assert torch.allclose(state_a[k], state_b[k], atol=1e-5), k


def test_lr_schedule_values():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_style="cosine")
    assert learning_rate(0, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(9, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(60, cfg, 110) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert learning_rate(110, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(500, cfg, 110) == pytest.approx(0.1)
    cfg.decay_style = "linear"
    assert learning_rate(35, cfg, 110) == pytest.approx(1.0 - 0.9 * 0.25)
    cfg.decay_style = "constant"
    assert learning_rate(100, cfg, 110) == 1.0


def test_weight_decay_skips_biases_and_layernorms():
    cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=16",
                             "model.num_attention_heads=2", "model.vocab_size=64"])
    model = build_model(cfg.model)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("bias") or ".ln" in names[id(p)] or "final_ln" in
               names[id(p)] for p in no_decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"wte.weight", "wpe.weight",
                                                      "transformer.layers.0.attn.qkv.weight"}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0


def _check_grad_norm(ctx):
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32",
                             "model.num_attention_heads=4", "model.vocab_size=100",
                             "model.make_vocab_size_divisible_by=8", "model.hidden_dropout=0",
                             "model.attention_dropout=0"]).model
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    ctx.seed(0)
    model = build_model(cfg, ctx)
    model(ids, ids).backward()
    torch.manual_seed(0)
    dense = build_model(cfg)
    dense(ids, ids).backward()
    ours = global_grad_norm(list(model.parameters()), ctx)
    ref = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                for p in dense.parameters()])).item()
    assert abs(ours - ref) / ref < 1e-5, (ours, ref)


def test_global_grad_norm_equals_dense_under_tp2(distributed):
    distributed(_check_grad_norm, 2)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(gpt_shard, bpe_files, tmp_path):
    cfg = load_config(None, tiny_overrides(gpt_shard, bpe_files, tmp_path, **{
        "train.precision": "fp16", "train.max_steps": 2, "train.eval_interval": 0,
        "model.seq_length": 8, "train.global_batch_size": 2}))
    trainer = Trainer(cfg, ParallelContext())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.scaler.scale = 3e38  # loss x scale overflows: every gradient becomes inf
    out = trainer.train_step()
    assert out["skipped"] and math.isnan(out["grad_norm"])
    assert trainer.scaler.scale == 1.5e38 and trainer.scaler.skipped == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.scaler.scale = 2.0**10
    out = trainer.train_step()
    assert not out["skipped"] and math.isfinite(out["loss"])
    assert not all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_metrics_jsonl_is_strict_json(tmp_path):
    from megatron_lite.training.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, True, False)
    log.log({"step": 1, "loss": 2.5, "grad_norm": math.nan, "skipped": True})
    log.log({"step": 2, "loss": math.inf, "grad_norm": 0.5})

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    rows = [json.loads(x, parse_constant=refuse)
            for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5, "grad_norm": None, "skipped": True},
                    {"step": 2, "loss": None, "grad_norm": 0.5}]
    assert log.close() == tmp_path / "loss.png"  # the plot skips the null


def test_loss_scaler_grows_after_clean_steps():
    s = DynamicLossScaler(initial_scale=4.0, growth_interval=2)
    s.update(True)
    assert s.scale == 4.0
    s.update(True)
    assert s.scale == 8.0
    s.update(False)
    assert s.scale == 4.0 and s.good_steps == 0


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file (is the data prefix right?)"),
    ("vocab", "does not fit model.vocab_size"),
    ("empty_split", "the train split has 0 documents"),
    ("no_data_path", "data.data_path is not set"),
    ("bad_key", "unknown key train.max_step"),
])
def test_clear_errors(gpt_shard, bpe_files, tmp_path, capsys, case, message):
    config = gpt_yaml(tmp_path)
    overrides = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run")
    if case == "missing":
        overrides.append(f"data.data_path={tmp_path / 'nope'}")
    elif case == "vocab":
        overrides = [o for o in overrides if not o.startswith("data.vocab_file")]
        overrides += ["data.tokenizer_type=null", "model.vocab_size=50"]
    elif case == "empty_split":
        overrides.append("data.split=0,1,0")
    elif case == "no_data_path":
        overrides.append("data.data_path=null")
    else:
        overrides.append("train.max_step=3")
    assert train_main([str(config), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_config_rejects_wrong_tp_for_the_job(gpt_shard, bpe_files, tmp_path):
    cfg = load_config(None, tiny_overrides(gpt_shard, bpe_files, tmp_path,
                                           **{"parallel.tensor_parallel_size": 2}))
    with pytest.raises(ConfigError, match="not divisible|TP=1"):
        Trainer(cfg, ParallelContext())
