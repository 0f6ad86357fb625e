"""Generation at TP 1 and 2 picks the same tokens; sampling filters; evaluate CLI."""

import json

import pytest
import torch

from megatron_lite.config import ModelConfig
from megatron_lite.evaluate import main as evaluate_main
from megatron_lite.generate import decode_layout, generate, next_token
from megatron_lite.models import GPTModel, KVCache
from megatron_lite.parallel import ParallelContext
from megatron_lite.train import main as train_main
from tests.training.conftest import gpt_yaml, tiny_overrides

CFG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                  max_position_embeddings=16, vocab_size=100, make_vocab_size_divisible_by=8,
                  hidden_dropout=0.0, attention_dropout=0.0, init_std=0.5)


def _check_generate(ctx):
    ctx.seed(0)
    model = GPTModel(CFG, ctx)
    torch.manual_seed(0)
    dense = GPTModel(CFG, ParallelContext())
    prompt = [5, 17, 42]
    for kwargs in (dict(greedy=True), dict(temperature=0.8, top_k=20, top_p=0.9, seed=3)):
        # runs past the 16-token window; the reference recomputes every step, no KV cache
        ours = generate(model, ctx, prompt, 24, **kwargs)
        ref = generate(dense, ParallelContext(), prompt, 24, use_cache=False, **kwargs)
        assert ours == ref, (kwargs, ours, ref)


def test_decode_layout_keeps_logits_tokens_and_weights():
    """The input-major weight layout of decoding: the same logits (to float rounding) and
    tokens, and on exit the very same contiguous weights."""
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 100, (1, 6))
    prompt = [5, 17, 42]
    with torch.no_grad():
        ref_logits = model(ids)
    ref = generate(model, ParallelContext(), prompt, 20, greedy=True)
    with decode_layout(model):
        assert not model.wte.weight.is_contiguous()  # [V, h] stored as [h, V]
        with torch.no_grad():
            logits = model(ids)
        ours = generate(model, ParallelContext(), prompt, 20, greedy=True)
    assert ours == ref
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    for n, p in model.named_parameters():
        assert p.is_contiguous() and torch.equal(p, before[n]), n


def test_kv_cache_logits_equal_a_full_forward():
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        # a 5-token prompt, two single tokens, then a 4-token chunk and the rest
        pieces = [model(ids[:, a:b], cache=cache) for a, b in
                  [(0, 5), (5, 6), (6, 7), (7, 11), (11, 16)]]
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(ids[:, :1], cache=cache)


def test_generation_is_the_same_at_tp2(distributed):
    distributed(_check_generate, 2)


def test_sampling_filters():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    gen = torch.Generator().manual_seed(0)
    assert next_token(logits, gen, True, 1.0, 0, 1.0) == 1
    assert {next_token(logits, gen, False, 1.0, 1, 1.0) for _ in range(20)} == {1}
    assert {next_token(logits, gen, False, 1.0, 0, 0.3) for _ in range(20)} == {1}
    assert {next_token(logits, gen, False, 1.0, 2, 1.0) for _ in range(200)} == {1, 3}


def test_evaluate_cli_on_a_checkpoint_and_a_fresh_model(gpt_shard, bpe_files, tmp_path, capsys):
    config = gpt_yaml(tmp_path)
    overrides = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run",
                               **{"train.max_steps": 4, "train.eval_interval": 0})
    assert train_main([str(config), *overrides]) == 0
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "run"), "--iters", "2"]) == 0
    after = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert after["step"] == 4 and after["global_batches"] == 2 and after["samples"] == 2 * 8
    assert evaluate_main(["--config", str(config), *overrides, "--iters", "2"]) == 0
    before = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert before["step"] == 0 and after["loss"] < before["loss"]
    assert after["perplexity"] == __import__("math").exp(after["loss"])


@pytest.mark.parametrize("order", ["options_first", "overrides_first", "mixed"])
def test_overrides_go_anywhere_on_the_command_line(tiny_run, gpt_shard, bpe_files, tmp_path,
                                                   capsys, order):
    """``key=value`` overrides before, after or between evaluate's options (``train`` has
    no options besides ``--help``; its overrides follow the config)."""
    config = gpt_yaml(tmp_path)
    overrides = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run",
                               **{"train.max_steps": 1, "train.eval_interval": 0})
    head, tail = overrides[:3], overrides[3:]
    run, extra = str(tiny_run), ["model.hidden_dropout=0.0", "train.eval_iters=3"]
    argv = {"options_first": ["--iters", "1", "--split", "train", run, *extra],
            "overrides_first": [run, *extra, "--iters", "1", "--split", "train"],
            "mixed": [extra[0], "--iters", "1", run, extra[1], "--split", "train"]}[order]
    assert evaluate_main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["split"] == "train" and out["global_batches"] == 1  # --iters 1 wins
    fresh = {"options_first": ["--iters", "1", "--config", str(config), *overrides],
             "overrides_first": [*overrides, "--config", str(config), "--iters", "1"],
             "mixed": [*head, "--config", str(config), *tail, "--iters", "1"]}[order]
    assert evaluate_main(fresh) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 0
