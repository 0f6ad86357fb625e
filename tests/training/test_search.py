"""python -m megatron_lite.search: freeze, TP, resume, found.yaml, errors."""

import json

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.experiments.search import main as search_main
from megatron_lite.experiments.search import search_trainer
from megatron_lite.parallel.comm import all_gather_list
from megatron_lite.train import main as train_main
from tests.training.conftest import gpt_yaml, tiny_overrides

SEARCH = {"search.blocks": 4, "search.freeze_steps": 3, "train.max_steps": 6,
          "train.eval_interval": 0, "search.arch_lr": 0.05}


def test_alpha_is_frozen_then_learns(gpt_shard, bpe_files, tmp_path):
    from megatron_lite.parallel import ParallelContext

    cfg = load_config(None, tiny_overrides(gpt_shard, bpe_files, tmp_path / "s", **SEARCH))
    trainer = search_trainer(cfg, ParallelContext())
    net = trainer.model.transformer  # the supernet
    start = net.alpha.detach().clone()
    for _ in range(3):
        trainer.train_step()
    assert torch.equal(net.alpha, start)  # bitwise, through 3 AdamW steps
    trainer.train_step()
    assert not torch.equal(net.alpha, start)


def _search(ctx, overrides):
    trainer = search_trainer(load_config(None, overrides), ctx)
    trainer.fit()
    alphas = all_gather_list(trainer.model.transformer.alpha.detach(), ctx.tp_group)
    assert all(torch.equal(a, alphas[0]) for a in alphas)  # every TP rank holds the same


def test_tp2_equals_tp1_during_the_search(distributed, gpt_shard, bpe_files, tmp_path):
    rows = {}
    for tp in (1, 2):
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / f"tp{tp}", **SEARCH,
                              **{"parallel.tensor_parallel_size": tp})
        distributed(_search, tp, over, tp_size=tp)
        rows[tp] = [json.loads(x) for x in (tmp_path / f"tp{tp}/metrics.jsonl").read_text()
                    .splitlines()]
    rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(rows[1], rows[2],
                                                                            strict=True))
    print(f"search: max relative loss difference TP=2 vs TP=1 {rel:.2e}")
    assert len(rows[1]) == 6 and rel <= 1e-5
    a1 = json.loads((tmp_path / "tp1/search.json").read_text())["history"][-1]["alpha"]
    a2 = json.loads((tmp_path / "tp2/search.json").read_text())["history"][-1]["alpha"]
    assert torch.allclose(torch.tensor(a1), torch.tensor(a2), atol=1e-4)


def test_resume_is_exact_and_found_yaml_trains(gpt_shard, bpe_files, tmp_path, capsys):
    config = str(gpt_yaml(tmp_path))
    straight = tiny_overrides(gpt_shard, bpe_files, tmp_path / "straight", **SEARCH)
    assert search_main([config, *straight]) == 0
    split = tiny_overrides(gpt_shard, bpe_files, tmp_path / "split", **SEARCH)
    assert search_main([config, *split, "train.exit_after=4"]) == 0
    assert search_main([config, *split]) == 0
    a = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    summary = json.loads((tmp_path / "straight/search.json").read_text())
    assert summary == json.loads((tmp_path / "split/search.json").read_text())
    assert (tmp_path / "straight/search.png").stat().st_size > 1000
    found = tmp_path / "straight/found.yaml"
    assert load_config(found).model.pattern == summary["pattern"]
    capsys.readouterr()
    assert train_main([str(found)]) == 0  # trains as written
    assert "found" in load_config(found).train.run_dir


@pytest.mark.parametrize("override,message", [
    ("search.branches=''", "at least one"),
    ("search.branches=sx", "give each of s, f, i"),
    ("search.blocks=-1", "search.blocks=-1 must be > 0"),
    ("search.tau_end=2.0", "search.tau_end=2.0 must be in (0, search.tau_start=1.0]"),
    ("model.mem_len=8", "the search has no Transformer-XL memory"),
])
def test_bad_search_config_is_one_line(gpt_shard, bpe_files, tmp_path, capsys, override,
                                       message):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "s", **SEARCH)
    assert search_main([str(gpt_yaml(tmp_path)), *over, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
