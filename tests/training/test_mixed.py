"""``train.params_dtype=bf16``: bf16 weights, fp32 main grads and masters (Megatron's --bf16)."""

import copy
import json

import pytest
import torch

from megatron_lite.checkpoint import load_file
from megatron_lite.config import ConfigError, ModelConfig, load_config
from megatron_lite.models import GPTModel
from megatron_lite.parallel import ParallelContext
from megatron_lite.training.mixed import MainParams
from megatron_lite.training.trainer import Trainer
from tests.training.conftest import tiny_overrides


def _tiny_gpt() -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                      max_position_embeddings=16, vocab_size=96, make_vocab_size_divisible_by=8,
                      hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(cfg, ParallelContext())


def test_main_grads_and_masters_against_a_hand_written_reference():
    model = _tiny_gpt()
    reference = copy.deepcopy(model)  # fp32 masters of the reference
    mixed = MainParams(model)
    low = copy.deepcopy(reference).to(torch.bfloat16)  # plain bf16 model, no hooks
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # two steps of two micro-batches
        sums = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
        for _ in range(2):
            ids = torch.randint(0, 96, (2, 16), generator=g)
            (model(ids, ids) / 2).backward()
            (low(ids, ids) / 2).backward()
            for n, p in low.named_parameters():
                sums[n] += p.grad.float()  # the bf16 gradient, accumulated in fp32
                p.grad = None
        assert all(p.grad is None for p in model.parameters()), "bf16 grads are freed"
        for n, p in model.named_parameters():
            assert torch.equal(p.main_grad, sums[n]), n
        with mixed.fp32(grads=True):
            assert all(p.dtype == torch.float32 for p in model.parameters())
            opt.step()
            opt.zero_grad(set_to_none=True)
        for n, p in reference.named_parameters():
            p.grad = sums[n]
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            low.load_state_dict({k: v.to(torch.bfloat16)
                                 for k, v in reference.state_dict().items()})
        assert all(not p.main_grad.any() for p in model.parameters()), "zeroed for the next step"
    own = dict(model.named_parameters())
    with mixed.fp32():
        for n, p in reference.named_parameters():
            torch.testing.assert_close(own[n], p, rtol=1e-6, atol=1e-7, msg=n)
    for n, p in reference.named_parameters():
        assert torch.equal(own[n], p.detach().to(torch.bfloat16)), n  # bf16 = rounded master


def _train(ctx, overrides):
    Trainer(load_config(None, overrides), ctx).fit()


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_params_train_like_autocast_save_fp32_masters_and_resume_exactly(
        distributed, gpt_shard, bpe_files, tmp_path):
    def overrides(name, **kw):
        return tiny_overrides(gpt_shard, bpe_files, tmp_path / name, **{
            "train.precision": "bf16", "train.eval_interval": 0, **kw})

    _train(ParallelContext(), overrides("autocast"))
    _train(ParallelContext(), overrides("mixed", **{"train.params_dtype": "bf16"}))
    # DP=2: the fp32 main grads are averaged over DP by MainParams (not DDP)
    distributed(_train, 2, overrides("mixed_dp2", **{"train.params_dtype": "bf16"}),
                tp_size=1)
    autocast, mixed, dp2 = (_losses(tmp_path / n) for n in ("autocast", "mixed", "mixed_dp2"))
    assert len(mixed) == 10 and mixed[-1] < mixed[0] - 0.1
    assert mixed == pytest.approx(autocast, rel=2e-2)
    assert dp2 == pytest.approx(mixed, rel=2e-3)

    saved = load_file(tmp_path / "mixed" / "checkpoints" / "step_00000010" / "model.pt")
    optim = load_file(tmp_path / "mixed" / "checkpoints" / "step_00000010" / "optim.pt")
    weights = [v for k, v in saved.items() if v.is_floating_point()]
    assert weights and all(v.dtype == torch.float32 for v in weights)
    assert any((v != v.to(torch.bfloat16).float()).any() for v in weights), "true fp32 masters"
    assert all(s["exp_avg"].dtype == torch.float32 for s in optim["state"].values())

    # 6 steps, stop, resume to 10: the same losses as the uninterrupted run
    _train(ParallelContext(), overrides("resumed", **{"train.params_dtype": "bf16",
                                                      "train.exit_after": 6}))
    _train(ParallelContext(), overrides("resumed", **{"train.params_dtype": "bf16"}))
    assert _losses(tmp_path / "resumed") == mixed


@pytest.mark.parametrize("kw", [{"train.precision": "fp32"},
                                {"train.precision": "bf16", "parallel.engine": "deepspeed"}])
def test_bf16_params_need_bf16_precision_on_ddp(kw):
    with pytest.raises(ConfigError, match="train.params_dtype=bf16 needs"):
        load_config(None, [f"{k}={v}" for k, v in {"train.params_dtype": "bf16",
                                                    **kw}.items()]).validate()
