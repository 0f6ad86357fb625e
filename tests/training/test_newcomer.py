"""A newcomer's first hour (issue 42): errors that say what to change, variants that
announce themselves, --dry-run, train.sample_interval, log.wandb, the launcher's exit codes."""

import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.checkpoint import load_checkpoint
from megatron_lite.config import ConfigError, load_config
from megatron_lite.convert import main as convert_main
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.experiments.distill import main as distill_main
from megatron_lite.experiments.search import main as search_main
from megatron_lite.generate import SAMPLE_TOKENS, generate
from megatron_lite.launch import failure_code, reported_codes
from megatron_lite.models.adaptive_span import span_summary
from megatron_lite.parallel import ParallelContext, validate_parallel_config
from megatron_lite.plan import main as plan_main
from megatron_lite.run import build_run
from megatron_lite.train import main as train_main
from preprocessing import executors
from tests.training.conftest import gpt_yaml, tiny_overrides

FAST = {"train.max_steps": 2, "train.eval_interval": 0}
ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ------------------------------------------------------------------ messages


@pytest.mark.parametrize("override,hint", [
    ("model.hiden_size=64", "unknown key model.hiden_size (did you mean model.hidden_size?)"),
    ("train.lr=1e-3", "unknown key train.lr (did you mean optim.lr?)"),
    ("modle.num_layers=2", "unknown section 'modle' (did you mean model.num_layers?"),
])
def test_a_mistyped_key_gets_the_closest_one(override, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert hint in str(err.value)


def test_an_unknown_key_without_a_near_one_gets_no_guess():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.zzzzzz=1"])
    assert "did you mean" not in str(err.value)


def test_data_path_with_a_suffix_and_a_missing_vocab_say_what_to_change(
        gpt_shard, bpe_files, tmp_path, capsys):
    config = str(gpt_yaml(tmp_path))
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "r", **FAST)
    assert train_main([config, *over, f"data.data_path={gpt_shard}.bin"]) == 2
    err = _one_line_error(capsys)
    assert f"drop the suffix, {gpt_shard}" in err
    assert train_main([config, *over, f"data.vocab_file={tmp_path / 'nothing.json'}"]) == 2
    err = _one_line_error(capsys)
    assert f"data.vocab_file {tmp_path / 'nothing.json'}: no such file" in err
    assert "--vocab-file" not in err
    assert not (tmp_path / "r").exists()


def test_a_world_size_error_names_the_launcher_and_the_key(gpt_shard, bpe_files, tmp_path,
                                                           capsys):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "r", **FAST)
    assert train_main([str(gpt_yaml(tmp_path)), *over, "parallel.tensor_parallel_size=2"]) == 2
    err = _one_line_error(capsys)
    assert ("world size 1 is not divisible by parallel.tensor_parallel_size=2: run with "
            "torchrun --nproc-per-node 2 (launch/torchrun.sh), or add "
            "parallel.tensor_parallel_size=1") in err
    with pytest.raises(ValueError, match="start a multiple of 2 processes"):
        validate_parallel_config(3, 2)


def test_help_lists_each_commands_keys(capsys):
    for main, first in ((distill_main, "distill.teacher="), (search_main, "search.blocks=")):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        keys = [m.group(1) for line in out.splitlines()
                if (m := re.match(r"    (\w+\.\w+=)", line))]
        assert keys[0].startswith(first) and "--dry-run" in out  # its own section first
        assert any(k.startswith("train.sample_interval=") for k in keys)
        assert any(k.startswith("log.wandb=") for k in keys)
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--tp TP with --from-hf: the parallel.tensor_parallel_size" in out


def test_a_skipped_preprocessing_stage_reports_no_rate(monkeypatch):
    stats = [{"bytes_read": 2**20, "documents_read": 3, "stored": 2}] * 2
    monkeypatch.setattr(executors.stages, "task_stats", lambda *a: stats)
    ran = executors.progress_line(None, "text", "prepare", 2, 0, 2.0)
    assert "6 documents, 4 kept by length, 2.0 MB at 1.0 MB/s (2.0s)" in ran
    skipped = executors.progress_line(None, "text", "prepare", 2, 2, 0.001)
    assert "(2 done earlier)" in skipped and "MB/s" not in skipped


def test_the_planner_says_what_its_all_reduce_figures_count(capsys):
    argv = [str(ROOT / "configs/gpt2/355m.yaml"), "--dp", "4", "--device", "a100-80g"]
    lines = {}
    for tp in (2, 4):
        assert plan_main([*argv, "--tp", str(tp), "--json"]) == 0
        lines[tp] = json.loads(capsys.readouterr().out)
        assert plan_main([*argv, "--tp", str(tp)]) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if x.startswith("communication"))
        assert line.startswith("communication per step, per rank: TP all-reduce ")
        assert "the same at any TP size" in line
        ring = 2 * (tp - 1) / tp
        assert f"a ring sends {ring:.2f} x that" in line
    # the figure counts the full activations, so it does not shrink with TP
    assert lines[2]["tp_allreduce_bytes_per_step"] == lines[4]["tp_allreduce_bytes_per_step"]
    assert plan_main([*argv, "--tp", "1"]) == 0
    assert "no TP all-reduce" in capsys.readouterr().out


# ------------------------------------------------------------------ variants


def test_variants_announce_themselves_in_one_start_line(gpt_shard, bpe_files, tmp_path,
                                                        capsys):
    config = str(gpt_yaml(tmp_path))
    assert train_main([config, *tiny_overrides(gpt_shard, bpe_files, tmp_path / "plain",
                                               **FAST)]) == 0
    assert "variant:" not in capsys.readouterr().out  # GPT-2 as it is: nothing to announce
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "drop", **FAST,
                          **{"model.layerdrop": 0.5, "model.layerdrop_keep_ends": True,
                             "model.position_embedding": "relative", "model.mem_len": 16,
                             "data.ordering": "consecutive"})
    assert train_main([config, *over]) == 0
    said = [x for x in capsys.readouterr().out.splitlines() if x.startswith("variant: ")]
    assert said == [
        "variant: Transformer-XL (Dai et al. 2019): relative positions, a memory of "
        "model.mem_len=16 past positions per attention sublayer",
        "variant: LayerDrop (Fan et al. 2019): each layer (a pair of sublayers) of 2 skipped "
        "with p=0.5 in training, never the first and last; every one runs in evaluation"]


def test_span_summary_arithmetic():
    line = span_summary([[0.0, 0.0], [0.0, 0.0]], [[1.0, 3.0], [2.0, 6.0]], 10, 64, 1e-3)
    assert "over 10 steps: mean span 0.00 -> 3.00, largest 0.00 -> 6.00 positions" in line
    # 0.3 positions a step; S/4 = 16 is 13 positions away: 44 steps
    assert "at this run's 0.3 positions/step the mean reaches S/4 = 16 in ~44 more steps" in line
    assert "optim.lr x S = 0.064 positions a step, so reaching S/4 takes >= 250 steps" in line
    still = span_summary([[2.0]], [[2.0]], 5, 64, 1e-3)
    assert "did not grow" in still


def test_a_short_adaptive_span_run_says_how_its_spans_moved(gpt_shard, bpe_files, tmp_path,
                                                            capsys):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "span", **FAST, **{
        "model.position_embedding": "relative", "model.adaptive_span": True,
        "model.attn_span": 16, "model.adaptive_span_ramp": 4, "data.ordering": "consecutive",
        "model.adaptive_span_init": 0.25})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 0
    out = capsys.readouterr().out
    assert "variant: adaptive attention span (Sukhbaatar et al. 2019)" in out
    line = next(x for x in out.splitlines() if x.startswith("adaptive span over 2 steps"))
    assert "mean span 4.00 -> " in line  # 0.25 x 16 at the start
    rows = [json.loads(x) for x in (tmp_path / "span/metrics.jsonl").read_text().splitlines()]
    end_mean = np.mean(rows[-1]["span_mean"])  # every layer has the same number of heads
    assert f"-> {end_mean:.2f}, largest" in line


# ------------------------------------------------------------------ dry run


def test_dry_run_prints_the_plan_and_writes_nothing(gpt_shard, bpe_files, tmp_path, capsys):
    run_dir = tmp_path / "dry"
    over = tiny_overrides(gpt_shard, bpe_files, run_dir, **{"train.max_steps": 30})
    assert train_main([str(gpt_yaml(tmp_path)), *over, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not run_dir.exists()
    assert out.startswith("resolved config:\nmodel:\n  arch: gpt\n")
    assert "  vocab_size: 2000\n" in out  # resolved: the tokenizer's
    assert "layout: world size 1 = TP 1 x DP 1 on cpu" in out
    assert "batch: micro-batch 2 x accumulation 4 x DP 1 = 8 samples = 256 tokens per step" in out
    shard = IndexedDataset(gpt_shard)
    assert f"{shard.num_documents} documents, {int(shard.sequence_lengths.sum())} tokens" in out
    assert "reads: 30 steps x 8 samples x 32 tokens = 7680 tokens" in out
    assert "run folder: " + str(run_dir) + " (new)" in out
    assert "fits at micro-batch 2" in out and out.rstrip().endswith("nothing written")
    # a config that cannot run fails as the run would, in one line
    assert train_main([str(gpt_yaml(tmp_path)), *over, "--dry-run",
                       "model.num_attention_heads=3"]) == 2
    assert "not divisible by model.num_attention_heads=3" in _one_line_error(capsys)


def test_dry_run_of_search_and_distill_checks_their_keys(gpt_shard, bpe_files, tmp_path,
                                                         capsys):
    config = str(gpt_yaml(tmp_path))
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "s", **FAST)
    assert search_main([config, *over, "--dry-run", "search.freeze_steps=1"]) == 0
    assert "search: 4 mixed blocks of sfi" in capsys.readouterr().out
    assert search_main([config, *over, "--dry-run"]) == 2
    assert "train.max_steps=2 <= search.freeze_steps=100" in _one_line_error(capsys)
    assert distill_main([config, *over, "--dry-run",
                         f"distill.teacher={tmp_path / 'no-teacher'}"]) == 2
    assert "no-teacher" in _one_line_error(capsys)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ the search


def test_a_search_shorter_than_its_freeze_is_refused(gpt_shard, bpe_files, tmp_path, capsys):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "s", **{
        "search.blocks": 4, "train.max_steps": 3, "search.freeze_steps": 3,
        "train.eval_interval": 0})
    assert search_main([str(gpt_yaml(tmp_path)), *over]) == 2
    err = _one_line_error(capsys)
    assert "train.max_steps=3 <= search.freeze_steps=3: alpha would never train" in err
    assert not (tmp_path / "s").exists()


def test_found_yaml_records_how_far_the_search_got(gpt_shard, bpe_files, tmp_path, capsys):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "s", **{
        "search.blocks": 4, "train.max_steps": 4, "search.freeze_steps": 1,
        "train.eval_interval": 0, "search.window": 50})
    assert search_main([str(gpt_yaml(tmp_path)), *over]) == 0
    out = capsys.readouterr().out
    assert "variant: PAR search (Mandava et al. 2020): 4 mixed blocks of s, f, i" in out
    assert "after 4 steps, 3 with alpha trained (at train.max_steps, not converged)" in out
    found = tmp_path / "s/found.yaml"
    first = found.read_text().splitlines()[0]
    assert first == (f"# found by the PAR search in {tmp_path / 's'}: 4 steps, 3 of them with "
                     "alpha trained (after search.freeze_steps=1); at train.max_steps, "
                     "not converged")
    summary = json.loads((tmp_path / "s/search.json").read_text())
    assert summary["unfrozen_steps"] == 3 and summary["freeze_steps"] == 1
    assert load_config(found).model.pattern == summary["pattern"]  # still loads


# ------------------------------------------------------------------ samples


def test_samples_during_training_are_the_greedy_continuation_and_change_nothing(
        gpt_shard, bpe_files, tmp_path, capsys):
    config = str(gpt_yaml(tmp_path))
    steps = {"train.max_steps": 4, "train.eval_interval": 0}
    assert train_main([config, *tiny_overrides(gpt_shard, bpe_files, tmp_path / "plain",
                                               **steps)]) == 0
    assert train_main([config, *tiny_overrides(gpt_shard, bpe_files, tmp_path / "sampled",
                                               **steps, **{"train.sample_interval": 2})]) == 0
    out = capsys.readouterr().out
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text()
                   .splitlines()] for name in ("plain", "sampled")}
    assert [r["loss"] for r in rows["plain"]] == [r["loss"] for r in rows["sampled"]]
    samples = {r["step"]: r["sample"] for r in rows["sampled"] if "sample" in r}
    assert sorted(samples) == [2, 4]
    assert f"sample at step 4: {samples[4]!r}" in out
    # the last one: the checkpoint at step 4, decoded greedily here
    cfg = load_config(tmp_path / "sampled/config.yaml")
    ctx = ParallelContext()
    run = build_run(cfg, ctx, data=False)
    load_checkpoint(tmp_path / "sampled", run.model, ctx)
    tok = run.tokenizer
    ids = generate(run.model, ctx, [tok.eod], SAMPLE_TOKENS, greedy=True, eod=tok.eod)
    assert tok.decode(t for t in ids if t != tok.eod) == samples[4]


def test_samples_without_a_tokenizer_are_one_line(gpt_shard, bpe_files, tmp_path, capsys):
    over = [o for o in tiny_overrides(gpt_shard, bpe_files, tmp_path / "r", **FAST)
            if not o.startswith(("data.tokenizer_type", "data.vocab_file", "data.merge_file"))]
    assert train_main([str(gpt_yaml(tmp_path)), *over, "model.vocab_size=2000",
                       "train.sample_interval=1"]) == 2
    assert "train.sample_interval needs a tokenizer" in _one_line_error(capsys)


# ------------------------------------------------------------------ Weights & Biases


class FakeWandb(types.ModuleType):
    """What the logger uses of wandb: init -> a run with log and finish."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, dict(values)))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_logs_the_metrics_offline(gpt_shard, bpe_files, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "w", **{
        "train.max_steps": 3, "train.eval_interval": 0, "log.wandb": True})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 0
    (init,) = fake.inits
    assert init["mode"] == "offline" and init["project"] == "megatron-lite"
    assert init["dir"] == str(tmp_path / "w") and init["config"]["log"]["wandb"] is True
    rows = [json.loads(x) for x in (tmp_path / "w/metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in fake.logged] == [r["step"] for r in rows] == [1, 2, 3]
    assert [v["loss"] for _, v in fake.logged] == [r["loss"] for r in rows]
    assert fake.finished == 1
    assert (tmp_path / "w/wandb/run_id").read_text().strip() == init["id"]


def test_wandb_missing_is_one_line_before_anything_is_written(gpt_shard, bpe_files, tmp_path,
                                                              capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "w", **FAST, **{"log.wandb": True})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 2
    assert "log.wandb=true needs the wandb package" in _one_line_error(capsys)
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ the launcher


def test_the_launcher_takes_the_lowest_failing_ranks_code(tmp_path):
    for rank, code in ((0, 0), (1, 2), (3, 143)):
        (tmp_path / f"rank{rank}").write_text(f"{code}\n")
    (tmp_path / "rank2").write_text("")  # cut short
    codes = reported_codes(tmp_path)
    assert codes == {0: 0, 1: 2, 3: 143} and failure_code(codes) == 2
    assert failure_code({0: 0, 1: 0}) is None and failure_code({}) is None
