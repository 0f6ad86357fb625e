"""``train.compile``: the compiled regions trace whole (no graph break) and train like eager."""

import json

import pytest
import torch

from megatron_lite.config import ModelConfig, load_config
from megatron_lite.models import GPTModel
from megatron_lite.parallel import ParallelContext
from megatron_lite.training.compile import compile_model, compiled_regions
from megatron_lite.training.trainer import Trainer
from tests.distributed import gather_shards
from tests.training.conftest import tiny_overrides


def _tiny_gpt(ctx, **kw) -> GPTModel:
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                      max_position_embeddings=16, vocab_size=96, make_vocab_size_divisible_by=8,
                      hidden_dropout=0.1, attention_dropout=0.1, **kw)
    return GPTModel(cfg, ctx)


def _region_calls(model, ids):
    """Each compiled region with the arguments one training forward passes it."""
    calls, loss = [], model.loss
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((m, args, kwargs)), with_kwargs=True)
        for layer in model.transformer.layers]

    def record_loss(x, labels, reduction="mean"):
        calls.append((loss, (x, labels), {}))
        return loss(x, labels, reduction)

    model.loss = record_loss
    model(ids, torch.roll(ids, -1, 1))
    del model.loss
    for h in hooks:
        h.remove()
    assert len(calls) == len(compiled_regions(model))
    return calls


def _count_breaks(ctx) -> None:
    ctx.seed(7)
    model = _tiny_gpt(ctx)
    model.train()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    for fn, args, kwargs in _region_calls(model, ids):
        args = tuple(a.detach().requires_grad_(a.is_floating_point()) if torch.is_tensor(a)
                     else a for a in args)
        explanation = torch._dynamo.explain(fn)(*args, **kwargs)
        name = getattr(fn, "kind", "loss")
        assert explanation.graph_break_count == 0, (name, explanation.break_reasons)
        assert explanation.graph_count == 1, name


def test_regions_have_no_graph_breaks_tp1():
    _count_breaks(ParallelContext())


def test_regions_have_no_graph_breaks_tp2(distributed):
    distributed(_count_breaks, 2)


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(ctx, overrides):
    Trainer(load_config(None, overrides), ctx).fit()


@pytest.mark.slow  # inductor compiles the model in every rank
@pytest.mark.parametrize("tp,dropout", [(1, 0.1), (2, 0.0)])
def test_compiled_training_matches_eager(distributed, gpt_shard, bpe_files, tmp_path, tp,
                                         dropout):
    """10 steps, compiled vs eager: the same losses (at TP=1 with the same dropout masks:
    inductor runs eager random ops; at TP>1 the TP-region masks come from another stream,
    so dropout is off there)."""
    losses = {}
    for compile_ in (False, True):
        run = tmp_path / f"c{compile_}"
        overrides = tiny_overrides(gpt_shard, bpe_files, run, **{
            "train.compile": compile_, "parallel.tensor_parallel_size": tp,
            "model.hidden_dropout": dropout, "model.attention_dropout": dropout,
            "train.eval_interval": 0})
        distributed(_train, tp, overrides, tp_size=tp)
        losses[compile_] = _losses(run)
    assert len(losses[True]) == 10
    diff = max(abs(a - b) for a, b in zip(losses[True], losses[False], strict=True))
    print(f"TP={tp} dropout={dropout}: max |compiled - eager| = {diff:.1e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_compiled_checkpointing_gives_eager_gradients(mode):
    """Recomputation inside (selective) and around (full) compiled regions, with dropout:
    the gradients of eager, un-checkpointed training."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        ctx = ParallelContext()
        ctx.seed(1)
        model = _tiny_gpt(ctx, activation_checkpointing=mode if compiled else "none")
        model.train()
        if compiled:
            compile_model(model, ctx)
        ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
        losses = []
        for _ in range(2):  # the second step draws new masks: the RNG streams advanced alike
            loss = model(ids, torch.roll(ids, -1, 1))
            loss.backward()
            losses.append(loss.item())
        results.append((losses, {n: p.grad for n, p in model.named_parameters()}))
    (eager, eager_grads), (got, grads) = results
    assert got == pytest.approx(eager, abs=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def _compiled_tp_dropout(ctx) -> None:
    ctx.seed(11)
    p = 0.25

    @torch.compile(fullgraph=True)
    def drop(x):
        return ctx.rng.dropout(x, p)

    ones = torch.ones(64, 256)
    a, b = drop(ones), drop(ones)
    keep = (a != 0).float().mean().item()
    assert abs(keep - (1 - p)) < 0.01, keep
    assert torch.allclose(a[a != 0], torch.full_like(a[a != 0], 1 / (1 - p)))
    assert not torch.equal(a, b), "each call draws a new mask"
    masks = gather_shards(a, ctx.tp_group)
    assert not torch.equal(masks[0], masks[1]), "TP ranks must draw different masks"


def test_compiled_tp_region_dropout_differs_across_ranks(distributed):
    distributed(_compiled_tp_dropout, 2)
