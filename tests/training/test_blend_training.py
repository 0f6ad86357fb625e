"""Training on a blend of two corpora: TP=2 x DP=2 equals one process, bitwise resume,
per-source metrics and validation, the plan printed at start, BERT, bad input."""

import json
import shutil

import numpy as np
import pytest

from megatron_lite.config import load_config
from megatron_lite.data.gpt_dataset import split_ranges
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.evaluate import main as evaluate_main
from megatron_lite.parallel import ParallelContext
from megatron_lite.train import main as train_main
from megatron_lite.training.trainer import Trainer
from preprocessing.__main__ import main as preprocess_main
from tests.data.test_blend import brute_force_blend
from tests.training.conftest import gpt_yaml, tiny_overrides


@pytest.fixture(scope="session")
def web_shard(tmp_path_factory, stdlib_docs, bpe_files):
    """A second corpus: other stdlib documents than ``gpt_shard``'s, the same tokenizer."""
    out = tmp_path_factory.mktemp("web")
    corpus = out / "web.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_docs[120:180]))
    vocab, merges = bpe_files
    assert preprocess_main(["--input", str(corpus), "--output-prefix", str(out / "web"),
                            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab),
                            "--merge-file", str(merges), "--append-eod", "--quiet",
                            "--workers", "1"]) == 0
    return out / "web_text_document"


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(ctx, overrides):
    Trainer(load_config(None, overrides), ctx).fit()


def _expected_counts(weights, prefixes, n):
    chosen, _ = brute_force_blend([w / sum(weights) for w in weights], n)
    return {p: chosen.count(j) for j, p in enumerate(prefixes)}


def test_blend_at_tp2xdp2_equals_one_process_per_source(distributed, gpt_shard, web_shard,
                                                        bpe_files, tmp_path, capsys):
    blend = f"0.3 {gpt_shard} 0.7 {web_shard}"
    common = {"train.max_steps": 6, "train.eval_interval": 3, "train.eval_iters": 1,
              "data.data_path": f"'{blend}'"}
    for name, (world, tp) in {"tp1": (1, 1), "tp2dp2": (4, 2)}.items():
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / name,
                              **{**common, "parallel.tensor_parallel_size": tp})
        distributed(_train, world, over, tp_size=tp)
    ref, got = _rows(tmp_path / "tp1"), _rows(tmp_path / "tp2dp2")
    assert [r["step"] for r in ref] == [1, 2, 3, 4, 5, 6]
    prefixes = [str(gpt_shard), str(web_shard)]
    for a, b in zip(ref, got, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
        # the samples drawn: the greedy rule, brute force, at every logged step
        want = _expected_counts([0.3, 0.7], prefixes, 8 * a["step"])
        assert a["samples_per_source"] == b["samples_per_source"] == want
    for a, b in ((r, g) for r, g in zip(ref, got, strict=True) if "val_loss" in r):
        per_a, per_b = a["val_loss_per_source"], b["val_loss_per_source"]
        assert set(per_a) == set(prefixes)
        assert np.allclose([per_a[p] for p in prefixes], [per_b[p] for p in prefixes],
                           rtol=1e-4)
        assert a["val_loss"] == pytest.approx(0.3 * per_a[prefixes[0]] + 0.7 *
                                              per_a[prefixes[1]], rel=1e-12)
    # each source's validation loss is that corpus's own: evaluate it alone
    capsys.readouterr()
    for prefix in prefixes:
        assert evaluate_main([str(tmp_path / "tp1"), "--iters", "1",
                              f"data.data_path={prefix}"]) == 0
        alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert alone["loss"] == pytest.approx(ref[-1]["val_loss_per_source"][prefix],
                                              rel=1e-6)
    # a separate test set (read whole): the same samples as that corpus read whole for
    # validation; a blend of them reports each and the weighted total
    results = {}
    for split, key in (("test", "test_data_path"), ("valid", "valid_data_path")):
        assert evaluate_main([str(tmp_path / "tp1"), "--iters", "1", "--split", split,
                              f"data.{key}='1 {web_shard} 3 {gpt_shard}'"]) == 0
        results[split] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    test, valid = results["test"], results["valid"]
    assert test["loss_per_source"] == valid["loss_per_source"]
    assert test["loss"] == pytest.approx(0.25 * test["loss_per_source"][str(web_shard)] + 0.75
                                         * test["loss_per_source"][str(gpt_shard)], rel=1e-12)


def test_blend_resume_is_bitwise_exact_and_the_plan_is_printed(gpt_shard, web_shard,
                                                                bpe_files, tmp_path, capsys):
    blend = f"1 {gpt_shard} 3 {web_shard}"
    common = {"train.max_steps": 8, "train.eval_interval": 4, "train.eval_iters": 1,
              "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
              "data.data_path": f"'{blend}'"}
    config = str(gpt_yaml(tmp_path))
    assert train_main([config, *tiny_overrides(gpt_shard, bpe_files, tmp_path / "straight",
                                               **common)]) == 0
    out = capsys.readouterr().out
    split = tiny_overrides(gpt_shard, bpe_files, tmp_path / "split", **common)
    assert train_main([config, *split, "train.exit_after=4"]) == 0
    assert train_main([config, *split]) == 0
    a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "val_loss", "val_loss_per_source",
                    "samples_per_source"):
            assert ra.get(key) == rb.get(key), (key, ra, rb)
    # the plan: weight, documents, tokens, samples planned, epochs of each source
    assert "data.data_path: a blend of 2 corpora, 64 train samples planned" in out
    for prefix, weight, planned in ((gpt_shard, 0.25, 16), (web_shard, 0.75, 48)):
        ix = IndexedDataset(prefix)
        first, end = split_ranges(ix.num_documents, "949,50,1")[0]
        di = ix.document_indices
        tokens = int(ix.sequence_lengths[di[first]:di[end]].sum())
        assert (f"weight {weight:.4f}  {prefix}: {end - first} documents, {tokens} tokens, "
                f"{planned} samples planned, {planned * 32 / tokens:.2f} epochs") in out


def test_bert_blend_with_a_separate_validation_blend(sentence_shard, wordpiece_file,
                                                     tmp_path):
    other = tmp_path / "other_text_sentence"
    for ext in (".bin", ".idx"):  # a second sentence corpus (a copy under its own name)
        shutil.copyfile(f"{sentence_shard}{ext}", f"{other}{ext}")
    cfg = load_config(None, [
        "model.arch=bert", "model.num_layers=2", "model.hidden_size=32",
        "model.num_attention_heads=4", "model.seq_length=32", "model.max_position_embeddings=32",
        "model.make_vocab_size_divisible_by=8", "train.micro_batch_size=4",
        "train.global_batch_size=4", "train.max_steps=3", "train.log_interval=1",
        "train.eval_interval=3", "train.eval_iters=1", f"train.run_dir={tmp_path / 'run'}",
        "log.tensorboard=false", f"data.data_path=2 {sentence_shard} 1 {other}",
        f"data.valid_data_path=1 {sentence_shard} 1 {other}",
        "data.tokenizer_type=BertWordPieceLowerCase", f"data.vocab_file={wordpiece_file}"])
    records = Trainer(cfg, ParallelContext()).fit()
    assert [r["samples_per_source"] for r in records] == [
        _expected_counts([2, 1], [str(sentence_shard), str(other)], 4 * s) for s in (1, 2, 3)]
    last = records[-1]
    per = last["val_loss_per_source"]
    assert last["val_loss"] == pytest.approx(0.5 * per[str(sentence_shard)] +
                                             0.5 * per[str(other)], rel=1e-12)
    # the same corpus read whole by both sources: the same validation samples
    assert per[str(sentence_shard)] == pytest.approx(per[str(other)], rel=1e-6)


@pytest.mark.parametrize("blend,message", [
    ("0.5 {a} 0.5 {missing}", "data.data_path: {missing}.idx: no such file"),
    ("0.5 {a} 0.5", "data.data_path="),
    ("x {a} 1 {a}", "weight 'x' (field 1) is not a number"),
    ("-1 {a}", "data.data_path="),
])
def test_bad_blends_are_one_line_through_the_cli(gpt_shard, bpe_files, tmp_path, capsys,
                                                 blend, message):
    fill = {"a": gpt_shard, "missing": tmp_path / "nope"}
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run")
    assert train_main([str(gpt_yaml(tmp_path)), *over,
                       f"data.data_path='{blend.format(**fill)}'"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message.format(**fill) in err and "\n" not in err


def test_a_missing_validation_prefix_is_an_error_not_a_warning(gpt_shard, bpe_files,
                                                                tmp_path, capsys):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run",
                          **{"data.valid_data_path": f"'1 {gpt_shard} 1 {tmp_path}/nope'"})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: data.valid_data_path: {tmp_path}/nope.idx: no such file (is the " \
        "data prefix right?)"


def test_consecutive_ordering_refuses_a_blend(gpt_shard, web_shard, bpe_files, tmp_path,
                                              capsys):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run", **{
        "data.ordering": "consecutive", "model.position_embedding": "relative",
        "model.mem_len": 16, "data.data_path": f"'1 {gpt_shard} 1 {web_shard}'"})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.data_path is a blend of 2 corpora, but data.ordering=consecutive" in err
    assert "\n" not in err


def test_a_memory_model_evaluates_each_sources_stream(gpt_shard, web_shard, bpe_files,
                                                      tmp_path, capsys):
    """Transformer-XL's evaluation reads each source's token stream alone: a blend reports
    what evaluating each corpus alone gives, and their weighted total."""
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run", **{
        "model.position_embedding": "relative", "model.mem_len": 16, "train.max_steps": 2,
        "train.eval_interval": 0, "data.ordering": "consecutive"})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 0
    results = {}
    for name, path in (("blend", f"'1 {gpt_shard} 3 {web_shard}'"), ("a", gpt_shard),
                       ("b", web_shard)):
        capsys.readouterr()
        assert evaluate_main([str(tmp_path / "run"), "--iters", "1", "data.ordering=shuffled",
                              f"data.data_path={path}"]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    per = results["blend"]["loss_per_source"]
    assert per == {str(gpt_shard): results["a"]["loss"], str(web_shard): results["b"]["loss"]}
    assert results["blend"]["loss"] == pytest.approx(0.25 * results["a"]["loss"] +
                                                     0.75 * results["b"]["loss"], rel=1e-12)
