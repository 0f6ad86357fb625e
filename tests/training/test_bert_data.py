"""BERT samples on a real sentence shard: structure, masking and NSP statistics, training."""

import json

import numpy as np
import pytest

from megatron_lite.config import DataConfig, load_config
from megatron_lite.data.bert_dataset import BertDataset
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.parallel import ParallelContext
from megatron_lite.training.trainer import Trainer
from preprocessing.__main__ import main as preprocess_main


@pytest.fixture(scope="module")
def sentence_shard(tmp_path_factory, corpus_file, wordpiece_file):
    out = tmp_path_factory.mktemp("bert")
    assert preprocess_main(["--input", str(corpus_file), "--output-prefix", str(out / "c"),
                            "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
                            str(wordpiece_file), "--split-sentences", "--quiet",
                            "--workers", "1"]) == 0
    return out / "c_text_sentence"


def _dataset(shard, wordpiece_file, n=2000, wwm=False, seq=128):
    tok = build_tokenizer("BertWordPieceLowerCase", str(wordpiece_file))
    indexed = IndexedDataset(shard)
    cont = None
    if wwm:
        cont = np.zeros(tok.vocab_size, dtype=bool)
        for piece, i in tok._backend.get_vocab().items():
            cont[i] = piece.startswith("##")
    return tok, BertDataset(indexed, (0, indexed.num_documents), seq, n, 1,
                            dict(tok.specials, vocab_size=tok.vocab_size),
                            DataConfig(whole_word_masking=wwm), continuation=cont)


def test_sample_structure(sentence_shard, wordpiece_file):
    tok, ds = _dataset(sentence_shard, wordpiece_file, n=200)
    cls, sep, pad = tok.token_id("[CLS]"), tok.token_id("[SEP]"), tok.token_id("[PAD]")
    for i in range(200):
        s = ds[i]
        n = int(s["attention_mask"].sum())
        ids = s["input_ids"]
        assert ids.shape == (128,) and ids[0] == cls and ids[n - 1] == sep
        assert (ids[n:] == pad).all() and (s["mlm_labels"][n:] == -100).all()
        labels_and_ids = np.where(s["mlm_labels"] >= 0, s["mlm_labels"], ids)
        seps = np.flatnonzero(labels_and_ids[:n] == sep)
        assert len(seps) == 2  # [CLS] A [SEP] B [SEP]
        types = s["token_type_ids"][:n]
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1:] == 1).all()
    assert all(np.array_equal(ds[7][k], ds[7][k]) for k in ds[7])  # deterministic


def test_masking_and_nsp_statistics(sentence_shard, wordpiece_file):
    tok, ds = _dataset(sentence_shard, wordpiece_file)
    specials = set(tok.specials.values())
    candidates = masked = as_mask = as_same = 0
    nsp = []
    for i in range(len(ds) if len(ds) < 2000 else 2000):
        s = ds[i]
        n = int(s["attention_mask"].sum())
        labels, ids = s["mlm_labels"][:n], s["input_ids"][:n]
        original = np.where(labels >= 0, labels, ids)
        candidates += sum(int(t) not in specials for t in original)
        picked = labels >= 0
        masked += int(picked.sum())
        as_mask += int((ids[picked] == tok.token_id("[MASK]")).sum())
        as_same += int((ids[picked] == labels[picked]).sum())
        nsp.append(int(s["nsp_labels"]))
    frac, mask_share, same_share = masked / candidates, as_mask / masked, as_same / masked
    print(f"masked {frac:.3f} of tokens; [MASK] {mask_share:.3f}, unchanged {same_share:.3f}, "
          f"random {1 - mask_share - same_share:.3f}; NSP random {np.mean(nsp):.3f}")
    assert abs(frac - 0.15) < 0.01
    assert abs(mask_share - 0.8) < 0.02 and abs(same_share - 0.1) < 0.02
    assert abs(np.mean(nsp) - 0.5) < 0.04


def test_whole_word_masking_masks_whole_words(sentence_shard, wordpiece_file):
    tok, ds = _dataset(sentence_shard, wordpiece_file, n=300, wwm=True)
    vocab = {i: p for p, i in tok._backend.get_vocab().items()}
    for i in range(300):
        s = ds[i]
        labels = s["mlm_labels"]
        original = np.where(labels >= 0, labels, s["input_ids"])
        for pos in np.flatnonzero(labels >= 0):
            nxt = pos + 1
            if nxt < len(original) and vocab.get(int(original[nxt]), "").startswith("##"):
                assert labels[nxt] >= 0, "a word was masked without its continuation"


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
    """evaluate's one-forward loss equals the trainer's (labels inside the model), and its
    accuracies equal a count made here from the logits."""
    import itertools

    import torch

    from megatron_lite.evaluate import evaluate

    cfg = load_config(None, [
        "model.arch=bert", "model.num_layers=2", "model.hidden_size=32",
        "model.num_attention_heads=4", "model.seq_length=32", "model.max_position_embeddings=32",
        "model.make_vocab_size_divisible_by=8", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.eval_iters=3", f"train.run_dir={tmp_path}",
        f"data.data_path={sentence_shard}", "data.tokenizer_type=BertWordPieceLowerCase",
        f"data.vocab_file={wordpiece_file}"])
    trainer = Trainer(cfg, ParallelContext(), training=False)
    result = evaluate(trainer, "valid", 3)
    assert result["batches"] == 6
    assert result["loss"] == pytest.approx(trainer.evaluate(), rel=1e-6)
    correct = total = nsp = 0
    with torch.no_grad():
        for batch in itertools.islice(trainer._iterator(trainer.valid_data, 0), 6):
            mlm, nsp_logits = trainer.model(batch["input_ids"], batch["token_type_ids"],
                                            batch["attention_mask"])
            picked = batch["mlm_labels"] != -100
            pred = mlm[..., :cfg.model.vocab_size].argmax(-1)
            correct += int((pred[picked] == batch["mlm_labels"][picked]).sum())
            total += int(picked.sum())
            nsp += int((nsp_logits.argmax(-1) == batch["nsp_labels"]).sum())
    assert total > 50
    assert result["mlm_accuracy"] == correct / total
    assert result["nsp_accuracy"] == nsp / 24
