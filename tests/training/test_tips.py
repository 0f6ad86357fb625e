"""The training tips in the trainer: a global batch in tokens, the micro-batch probe, the
divergence guard."""

import json
import math

import pytest

from megatron_lite.config import ConfigError, load_config
from megatron_lite.parallel import ParallelContext
from megatron_lite.train import main as train_main
from megatron_lite.training.probe import try_micro_batch
from megatron_lite.training.trainer import Trainer
from tests.training.conftest import gpt_yaml, tiny_overrides
from tests.training.faults import NanLossAt


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_global_batch_tokens_resolve_to_samples(gpt_shard, bpe_files, tmp_path, capsys):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run", **{
        "train.max_steps": 1, "train.eval_interval": 0, "train.global_batch_tokens": 300})
    over = [o for o in over if not o.startswith("train.global_batch_size")]
    cfg = load_config(None, over)
    trainer = Trainer(cfg, ParallelContext())
    # 300 tokens / 32 per sample = 9.4 -> a multiple of micro-batch 2: 10 samples
    assert cfg.train.global_batch_size == 10 and trainer.accum == 5
    assert "global_batch_size=10 samples = 320 tokens" in capsys.readouterr().out
    saved = load_config(tmp_path / "run" / "config.yaml")  # reusable as it is
    assert saved.train.global_batch_size == 10 and saved.train.global_batch_tokens == 0
    both = load_config(None, over + ["train.global_batch_size=8"])
    with pytest.raises(ConfigError, match="both set: give one"):
        Trainer(both, ParallelContext())
    # a config file's global_batch_size gives way to a command-line global_batch_tokens
    file = tmp_path / "batch.yaml"
    file.write_text("train:\n  global_batch_size: 8\n")
    cfg = load_config(file, over)
    Trainer(cfg, ParallelContext())
    assert cfg.train.global_batch_size == 10
    file.write_text("train:\n  global_batch_size: 8\n  global_batch_tokens: 300\n")
    with pytest.raises(ConfigError, match="batch.yaml: train.global_batch_size and"):
        Trainer(load_config(file, [o for o in over if "global_batch_tokens" not in o]),
                ParallelContext())


def test_micro_batch_auto_picks_the_largest_that_fits_the_budget(gpt_shard, bpe_files,
                                                                 tmp_path, capsys):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run", **{
        "train.max_steps": 2, "train.eval_interval": 0, "train.micro_batch_size": "auto",
        "train.global_batch_size": 16, "train.memory_budget": "7M", "model.hidden_size": 64})
    cfg = load_config(None, over)
    trainer = Trainer(cfg, ParallelContext())
    chosen = cfg.train.micro_batch_size
    assert "micro_batch_size=auto:" in capsys.readouterr().out
    assert 1 < chosen < 16 and trainer.accum == 16 // chosen
    # checked by running it and the next size up: the chosen one fits, the next does not
    budget = 7 * 2**20
    fits, peak = try_micro_batch(trainer, chosen, budget)
    bigger = {1: 2, 2: 4, 4: 8, 8: 16}[chosen]
    too_big, peak_up = try_micro_batch(trainer, bigger, budget)
    assert fits and not too_big and peak < peak_up
    records = trainer.fit()  # and the run trains with it
    assert [r["step"] for r in records] == [1, 2]
    with pytest.raises(ConfigError, match="needs train.memory_budget"):
        Trainer(load_config(None, [o for o in over if "memory_budget" not in o]),
                ParallelContext())


def _guard(gpt_shard, bpe_files, run, **kw):
    return tiny_overrides(gpt_shard, bpe_files, run, **{
        "train.max_steps": 12, "train.eval_interval": 0, "train.save_interval": 4,
        "train.divergence_guard": True, "train.divergence_window": 3, **kw})


def test_the_divergence_guard_goes_back_lowers_the_lr_and_moves_on(gpt_shard, bpe_files,
                                                                   tmp_path, capsys):
    run = tmp_path / "run"
    config = str(gpt_yaml(tmp_path))
    assert train_main([config, *_guard(gpt_shard, bpe_files, run)], hooks=[NanLossAt(6)]) == 0
    out = capsys.readouterr().out
    assert "divergence at step 6 (loss is nan): back to step 4, 16 samples skipped" in out
    rows = _rows(run)
    event = next(r for r in rows if r.get("event") == "divergence")
    assert event == {"step": 4, "event": "divergence", "reason": "loss is nan",
                     "at_step": 6, "skipped_samples": 16, "lr_scale": 0.5}
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 13))  # no step twice
    straight = tmp_path / "straight"
    assert train_main([config, *_guard(gpt_shard, bpe_files, straight)]) == 0
    lr = {r["step"]: r["lr"] for r in _rows(straight)}
    after = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert after[4] == lr[4] and after[5] == pytest.approx(lr[5] * 0.5)
    assert after[12] == pytest.approx(lr[12] * 0.5)


def test_a_spike_is_a_loss_above_k_times_the_recent_mean(gpt_shard, bpe_files, tmp_path):
    cfg = load_config(None, _guard(gpt_shard, bpe_files, tmp_path / "run",
                                   **{"train.divergence_factor": 3.0}))
    trainer = Trainer(cfg, ParallelContext())
    assert [trainer._diverged(x) for x in (2.0, 2.2, 1.8)] == [None] * 3  # the window fills
    assert trainer._diverged(5.9) is None  # below 3 x 2.0
    reason = trainer._diverged(9.0)  # mean of (2.2, 1.8, 5.9) = 3.3: 9.0 < 9.9
    assert reason is None
    assert "> 3 x the mean of the last 3 steps" in trainer._diverged(20.0)
    assert trainer._diverged(float("inf")) == "loss is inf"
    # an applied update with a non-finite gradient norm wrote non-finite weights
    assert trainer._diverged(2.0, float("nan")) == "gradient norm is nan"


def test_the_divergence_guard_gives_up_after_n_tries(gpt_shard, bpe_files, tmp_path, capsys):
    run = tmp_path / "run"
    over = _guard(gpt_shard, bpe_files, run, **{"train.divergence_retries": 2})
    assert train_main([str(gpt_yaml(tmp_path)), *over], hooks=[NanLossAt(5, times=10)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: step 5: loss is nan; gave up after 2 recoveries "
                   "(train.divergence_retries)")
    events = [r for r in _rows(run) if r.get("event") == "divergence"]
    assert [e["lr_scale"] for e in events] == [0.5, 0.25]


def test_a_spike_at_the_first_steps_is_caught(gpt_shard, bpe_files, tmp_path):
    """No full window needed (optim.lr=10 had gone 9 -> 8219 at step 2 unnoticed): the
    baseline is the mean of the losses so far, before the first log(vocab_size)."""
    cfg = load_config(None, _guard(gpt_shard, bpe_files, tmp_path / "run",
                                   **{"train.divergence_window": 20}))
    trainer = Trainer(cfg, ParallelContext())
    log_v = math.log(cfg.model.vocab_size)
    assert "> 5 x log(vocab_size)" in trainer._diverged(5 * log_v + 1)
    assert trainer._diverged(9.0) is None
    assert "> 5 x the mean of the last 1 steps (9)" in trainer._diverged(8219.0)


def test_after_a_recovery_the_guard_still_holds_the_old_baseline(gpt_shard, bpe_files,
                                                                 tmp_path, capsys):
    """A spike (not a NaN) at step 6, twice: the recovery keeps the losses from before
    it, so the repeat is caught as well and the run gives up, exit 2 (with the window
    cleared, the repeat had become part of a new baseline and the run ended 'done')."""
    run = tmp_path / "run"
    over = _guard(gpt_shard, bpe_files, run, **{"train.divergence_retries": 1})
    spike = NanLossAt(6, times=2, value=1e4)
    assert train_main([str(gpt_yaml(tmp_path)), *over], hooks=[spike]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: step 6: loss 1e+04 > 5 x the mean of the last 3 steps")
    assert err.endswith("gave up after 1 recoveries (train.divergence_retries)")
    assert [r["at_step"] for r in _rows(run) if r.get("event") == "divergence"] == [6]
