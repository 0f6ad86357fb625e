"""BERT training end to end (MLM + NSP, two-phase sequence length) and its evaluation."""

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import load_config
from megatron_lite.parallel import ParallelContext
from megatron_lite.run import build_run
from megatron_lite.training.evaluation import evaluate
from megatron_lite.training.trainer import Trainer


def test_bert_trains_and_switches_phase(sentence_shard, wordpiece_file, tmp_path):
    cfg = load_config(None, [
        "model.arch=bert", "model.num_layers=2", "model.hidden_size=32",
        "model.num_attention_heads=4", "model.seq_length=32", "model.max_position_embeddings=64",
        "model.make_vocab_size_divisible_by=8", "model.hidden_dropout=0",
        "model.attention_dropout=0", "optim.lr=2e-3", "optim.warmup_steps=2",
        "optim.decay_style=linear", "train.micro_batch_size=8", "train.global_batch_size=8",
        "train.max_steps=40", "train.log_interval=1", "train.eval_interval=20",
        "train.eval_iters=2", "train.phase2_seq_length=64", "train.phase2_start=0.75",
        f"train.run_dir={tmp_path}", "log.tensorboard=false",
        f"data.data_path={sentence_shard}", "data.tokenizer_type=BertWordPieceLowerCase",
        f"data.vocab_file={wordpiece_file}"])
    trainer = Trainer(cfg, ParallelContext())
    records = trainer.fit()
    assert trainer.train_data.seq_length == 64  # phase 2
    losses = [r["loss"] for r in records]
    print("BERT losses", [round(x, 2) for x in losses])
    assert np.mean(losses[:5]) - np.mean(losses[20:30]) > 0.3, losses  # phase 1 learns
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]


def test_bert_evaluate_metrics(sentence_shard, wordpiece_file, tmp_path):
    """The run's evaluation (one forward for loss and accuracies) against F.cross_entropy
    and accuracies counted here from the logits, and against the labels-inside-the-model
    loss the training step uses."""
    cfg = load_config(None, [
        "model.arch=bert", "model.num_layers=2", "model.hidden_size=32",
        "model.num_attention_heads=4", "model.seq_length=32", "model.max_position_embeddings=32",
        "model.make_vocab_size_divisible_by=8", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.eval_iters=3", f"train.run_dir={tmp_path}",
        f"data.data_path={sentence_shard}", "data.tokenizer_type=BertWordPieceLowerCase",
        f"data.vocab_file={wordpiece_file}"])
    run = build_run(cfg, ParallelContext(), training=False)
    result = evaluate(run, "valid", 3)
    assert result["global_batches"] == 3 and result["samples"] == 24
    vocab = cfg.model.vocab_size
    losses, model_losses, mlm_losses, nsp_losses = [], [], [], []
    correct = total = nsp = 0
    with torch.no_grad():
        for batch in itertools.islice(run.batches(run.valid_data), 6):
            mlm, nsp_logits = run.model(batch["input_ids"], batch["token_type_ids"],
                                        batch["attention_mask"])
            labels = batch["mlm_labels"]
            mlm_losses.append(float(F.cross_entropy(mlm[..., :vocab].reshape(-1, vocab),
                                                    labels.reshape(-1), ignore_index=-100)))
            nsp_losses.append(float(F.cross_entropy(nsp_logits, batch["nsp_labels"])))
            losses.append(mlm_losses[-1] + nsp_losses[-1])
            model_losses.append(float(run.model(**batch)))
            picked = labels != -100
            pred = mlm[..., :vocab].argmax(-1)
            correct += int((pred[picked] == labels[picked]).sum())
            total += int(picked.sum())
            nsp += int((nsp_logits.argmax(-1) == batch["nsp_labels"]).sum())
    assert total > 50
    assert result["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert result["loss"] == pytest.approx(np.mean(model_losses), rel=1e-6)
    assert result["mlm_loss"] == pytest.approx(np.mean(mlm_losses), rel=1e-5)
    assert result["nsp_loss"] == pytest.approx(np.mean(nsp_losses), rel=1e-5)
    assert result["mlm_accuracy"] == correct / total
    assert result["nsp_accuracy"] == nsp / 24


def _bert_records(ctx, overrides, out):
    records = Trainer(load_config(None, overrides), ctx).fit()
    if ctx.rank == 0:
        torch.save(records, out)


def test_bert_logs_its_loss_parts_and_accuracies_at_any_tp(distributed, sentence_shard,
                                                           wordpiece_file, tmp_path):
    """``loss`` = ``mlm_loss`` + ``nsp_loss``; accuracies counted without gathering the
    vocab-parallel logits agree between TP=1 and TP=2; validation logs the same keys and no
    meaningless exp(MLM + NSP)."""
    common = [
        "model.arch=bert", "model.num_layers=2", "model.hidden_size=32",
        "model.num_attention_heads=4", "model.seq_length=32", "model.max_position_embeddings=32",
        "model.make_vocab_size_divisible_by=8", "model.hidden_dropout=0",
        "model.attention_dropout=0", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.max_steps=3", "train.log_interval=1", "train.eval_interval=3",
        "train.eval_iters=2", "log.tensorboard=false", f"data.data_path={sentence_shard}",
        "data.tokenizer_type=BertWordPieceLowerCase", f"data.vocab_file={wordpiece_file}"]
    runs = {}
    for tp in (1, 2):
        over = common + [f"parallel.tensor_parallel_size={tp}",
                         f"train.run_dir={tmp_path / str(tp)}"]
        distributed(_bert_records, tp, over, tmp_path / f"r{tp}.pt", tp_size=tp)
        runs[tp] = torch.load(tmp_path / f"r{tp}.pt")
    for a, b in zip(runs[1], runs[2], strict=True):
        assert a["loss"] == pytest.approx(a["mlm_loss"] + a["nsp_loss"], rel=1e-6)
        for key in ("mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy"):
            assert 0 <= a[key] and a[key] == pytest.approx(b[key], abs=1e-4), key
    last = runs[2][-1]
    assert {"val_loss", "val_mlm_loss", "val_nsp_loss", "val_mlm_accuracy",
            "val_nsp_accuracy"} <= set(last) and "val_ppl" not in last
    assert last["val_loss"] == pytest.approx(last["val_mlm_loss"] + last["val_nsp_loss"],
                                             rel=1e-6)
