"""Transformer-XL end to end: TP=2 equals TP=1 through the CLI, the evaluation protocol,
and the errors for what it does not cover."""

import json

import pytest

from megatron_lite.data.gpt_dataset import split_ranges
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.stream import TokenStream
from megatron_lite.evaluate import main as evaluate_main
from megatron_lite.train import main as train_main
from tests.training.conftest import gpt_yaml, tiny_overrides

XL = {"model.position_embedding": "relative", "model.mem_len": 32, "model.clamp_len": 48,
      "data.ordering": "consecutive", "train.eval_interval": 0}


def _train_cli(ctx, argv):
    assert train_main(argv) == 0


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tp2_equals_tp1_with_relative_positions_and_memory(distributed, gpt_shard, bpe_files,
                                                           tmp_path):
    for tp in (1, 2):
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / f"tp{tp}", **XL,
                              **{"parallel.tensor_parallel_size": tp})
        distributed(_train_cli, tp, [str(gpt_yaml(tmp_path)), *over], tp_size=tp)
    ref, got = _losses(tmp_path / "tp1"), _losses(tmp_path / "tp2")
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True))
    print(f"Transformer-XL: max relative loss difference TP=2 vs TP=1, 10 steps {rel:.2e}")
    assert len(ref) == 10 and ref[-1] < ref[0] and rel <= 1e-5


@pytest.fixture(scope="module")
def xl_run(tmp_path_factory, gpt_shard, bpe_files):
    tmp = tmp_path_factory.mktemp("xl")
    over = tiny_overrides(gpt_shard, bpe_files, tmp / "run", **XL, **{"train.max_steps": 6})
    assert train_main([str(gpt_yaml(tmp)), *over]) == 0
    return tmp / "run"


def test_evaluation_protocol_scores_every_token_once(xl_run, gpt_shard, capsys):
    indexed = IndexedDataset(gpt_shard)
    valid = TokenStream(indexed, split_ranges(indexed.num_documents, "949,50,1")[1], "valid")
    results = {}
    for mem in (0, 32, 128):  # 128: four times the memory it was trained with
        assert evaluate_main([str(xl_run), f"model.mem_len={mem}", "model.seq_length=16"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["tokens"] == valid.num_tokens - 1 and out["mem_len"] == mem
        assert out["segment"] == 16 and out["tokens_per_sec"] > 0
        results[mem] = out["loss"]
    print("XL evaluation loss by memory:", results)
    assert len(set(results.values())) == 3  # the memory is used
    assert evaluate_main([str(xl_run), "--iters", "1"]) == 0  # one global batch of segments
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] == 8 * 32


def test_memory_with_shuffled_training_data_is_an_error(gpt_shard, bpe_files, tmp_path,
                                                         capsys):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run",
                          **{**XL, "data.ordering": "shuffled"})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs data.ordering=consecutive" in err and "\n" not in err


def test_adaptive_span_logs_spans_and_keeps_its_penalty_out_of_the_loss(gpt_shard, bpe_files,
                                                                          tmp_path):
    span = {**XL, "model.mem_len": 0, "model.adaptive_span": True, "model.attn_span": 64,
            "model.adaptive_span_init": 0.5, "train.max_steps": 4}
    rows = {}
    for lam in (0.0, 0.05):
        run = tmp_path / f"lam{lam}"
        over = tiny_overrides(gpt_shard, bpe_files, run, **span,
                              **{"model.adaptive_span_loss": lam})
        assert train_main([str(gpt_yaml(tmp_path)), *over]) == 0
        rows[lam] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert (run / "spans.png").stat().st_size > 1000
    free, penalised = rows[0.0], rows[0.05]
    assert free[0]["loss"] == penalised[0]["loss"]  # the penalty is not in `loss`
    # step 1: every z = 0.5 * 64 = 32, 2 layers x 4 heads
    assert penalised[0]["span_loss"] == pytest.approx(0.05 * 32 * 8) and free[0]["span_loss"] == 0
    assert len(free[-1]["span_mean"]) == 2 and free[-1]["span_max"][0] <= 64
    assert sum(penalised[-1]["span_mean"]) < sum(free[-1]["span_mean"])  # lambda shrinks spans
