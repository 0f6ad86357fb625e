"""GPT and BERT at TP 1, 2, 4 against the same model built dense (TP=1) in one process."""

import pytest
import torch

from megatron_lite.config import ModelConfig
from megatron_lite.examples.tp_block import count_all_reduces
from megatron_lite.models import build_model
from megatron_lite.parallel import full_state_dict
from tests.distributed import gather_full, max_dev

TOL = 1e-5
LR = 1e-3
# NOTE: Adam divides each gradient element by its own running RMS, so float noise on an
# element whose gradient is ~eps-sized becomes a sizeable fraction of lr. After the
# optimizer steps, parameters are compared at a tolerance of lr / 10.
PARAM_TOL = LR / 10
VOCAB = 100


def tiny_cfg(arch: str, **kw) -> ModelConfig:
    base = dict(arch=arch, num_layers=2, hidden_size=32, num_attention_heads=4,
                ffn_hidden_size=64, seq_length=12, max_position_embeddings=16,
                vocab_size=VOCAB, make_vocab_size_divisible_by=8,  # padded 104/112/128
                hidden_dropout=0.0, attention_dropout=0.0)
    if arch == "bert":
        base.update(layernorm_order="post", activation="gelu", layernorm_epsilon=1e-12)
    base.update(kw)
    return ModelConfig(**base)


def make_batch(arch: str, seed: int = 1, batch: int = 3, seq: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    if arch == "gpt":
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        return {"input_ids": ids, "labels": labels}
    mlm = torch.full_like(ids, -100)
    pick = torch.rand(batch, seq, generator=g) < 0.3
    mlm[pick] = ids[pick]
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding in the first sequence
    types = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).clone()
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
            "mlm_labels": mlm, "nsp_labels": torch.tensor([0, 1, 0])[:batch]}


def _trim(name: str, t: torch.Tensor) -> torch.Tensor:
    """Drop vocab padding (which differs between TP sizes) before comparing."""
    if name in ("wte.weight", "word.weight", "lm_bias", "output_layer.weight"):
        return t[:VOCAB]
    return t


def _logits(model, batch, ctx):
    inputs = {k: v for k, v in batch.items() if "labels" not in k}
    out = model(**inputs)
    logits = out[0] if isinstance(out, tuple) else out
    return gather_full(logits, ctx.tp_group if ctx else None, -1)[..., :VOCAB]


def _check_against_dense(ctx, arch: str, extra: dict | None = None) -> None:
    cfg = tiny_cfg(arch, **(extra or {}))
    ctx.seed(0)
    model = build_model(cfg, ctx)
    torch.manual_seed(0)
    dense = build_model(cfg)

    full = full_state_dict(model, ctx.tp_group)
    for name, ref in dense.state_dict().items():
        assert torch.equal(_trim(name, full[name]), _trim(name, ref)), f"init differs: {name}"

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    opt_ref = torch.optim.AdamW(dense.parameters(), lr=LR, weight_decay=0.01)
    worst = {"logits": 0.0, "loss": 0.0, "grads": 0.0}
    dense_params = dict(dense.named_parameters())
    for step in range(3):
        batch = make_batch(arch, seed=step)
        loss, loss_ref = model(**batch), dense(**batch)
        loss.backward()
        loss_ref.backward()
        if step == 0:  # identical parameters: logits, loss and every gradient must agree
            worst["logits"] = max_dev(_logits(model, batch, ctx), _logits(dense, batch, None))
            worst["loss"] = abs(loss.item() - loss_ref.item())
            for name, p in model.named_parameters():
                g = gather_full(p.grad, ctx.tp_group, p.tp_dim, p.tp_stride) \
                    if getattr(p, "tp_dim", None) is not None else p.grad
                dev = max_dev(_trim(name, g), _trim(name, dense_params[name].grad))
                worst["grads"] = max(worst["grads"], dev)
        opt.step(), opt_ref.step()
        opt.zero_grad(), opt_ref.zero_grad()
    for key, value in worst.items():
        assert value <= TOL, f"{arch} TP={ctx.tp_size}: {key} deviates by {value:.3e}"

    full = full_state_dict(model, ctx.tp_group)
    worst["params after 3 AdamW steps"] = max(
        max_dev(_trim(name, full[name]), _trim(name, ref))
        for name, ref in dense.state_dict().items())
    if ctx.rank == 0:
        print(f"{arch} TP={ctx.tp_size}: " + ", ".join(f"{k}={v:.2e}" for k, v in worst.items()))
    assert worst["params after 3 AdamW steps"] <= PARAM_TOL


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_model_matches_dense(distributed, arch, tp):
    distributed(_check_against_dense, tp, arch)


def _check_dropout_runs_repeat(ctx, arch: str) -> None:
    cfg = tiny_cfg(arch, hidden_dropout=0.1, attention_dropout=0.1)
    ctx.seed(0)
    model = build_model(cfg, ctx)
    batch = make_batch(arch)
    results = []
    for _ in range(2):
        ctx.seed(3)
        loss = model(**batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))
    ctx.seed(4)
    assert not torch.equal(model(**batch).detach(), results[0][0]), "dropout had no effect"


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_dropout_is_reproducible_from_the_seed(distributed, arch):
    distributed(_check_dropout_runs_repeat, 2, arch)


def _check_comm_count(ctx, arch: str) -> None:
    cfg = tiny_cfg(arch, num_layers=3)
    ctx.seed(0)
    model = build_model(cfg, ctx)
    batch = make_batch(arch)
    with count_all_reduces() as fwd:
        loss = model(**batch)
    with count_all_reduces() as bwd:
        loss.backward()
    sublayers = 2 * cfg.num_layers
    # forward: one per sublayer (Megatron's minimum), 1 for the vocab-parallel embedding,
    # 2 for the (one-chunk) vocab-parallel cross-entropy (max; target logit and sum of
    # exps together)
    assert fwd[0] == sublayers + 1 + 2, f"forward all-reduces: {fwd[0]}"
    # backward: one per sublayer, 1 where the hidden state enters the tied output layer
    assert bwd[0] == sublayers + 1, f"backward all-reduces: {bwd[0]}"


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_all_reduce_count_is_megatron_minimum(distributed, arch):
    distributed(_check_comm_count, 2, arch)


def _check_activation_checkpointing(ctx, arch: str, extra: dict | None = None) -> None:
    batch = make_batch(arch)
    results = {}
    for mode in ("none", "selective", "full"):
        cfg = tiny_cfg(arch, hidden_dropout=0.1, attention_dropout=0.1,
                       activation_checkpointing=mode, **(extra or {}))
        ctx.seed(0)
        model = build_model(cfg, ctx)
        ctx.seed(11)
        loss = model(**batch)
        loss.backward()
        results[mode] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    loss_none, grads_none = results["none"]
    for mode in ("selective", "full"):
        loss, grads = results[mode]
        assert torch.equal(loss, loss_none), f"{mode}: loss differs"
        for a, b in zip(grads, grads_none, strict=True):
            assert torch.equal(a, b), f"{mode}: grads differ by {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_checkpointing_gives_identical_gradients_with_dropout(distributed, arch, tp):
    distributed(_check_activation_checkpointing, tp, arch)
