from pathlib import Path

import pytest

from megatron_lite.train import main as train_main
from preprocessing.__main__ import main as preprocess_main


@pytest.fixture(scope="session")
def gpt_shard(tmp_path_factory, corpus_file, bpe_files):
    out = tmp_path_factory.mktemp("shard")
    vocab, merges = bpe_files
    assert preprocess_main(["--input", str(corpus_file), "--output-prefix", str(out / "c"),
                            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab),
                            "--merge-file", str(merges), "--append-eod", "--quiet",
                            "--workers", "1"]) == 0
    return out / "c_text_document"


def gpt_yaml(tmp_path) -> Path:
    """The smallest config file for the CLIs: everything else comes from overrides."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: gpt\n")
    return path


def tiny_overrides(shard, bpe_files, run_dir, **kw) -> list[str]:
    vocab, merges = bpe_files
    base = {"model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4,
            "model.seq_length": 32, "model.max_position_embeddings": 32,
            "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0,
            "model.make_vocab_size_divisible_by": 8,
            "optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.warmup_steps": 2,
            "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.max_steps": 10,
            "train.log_interval": 1, "train.eval_interval": 5, "train.eval_iters": 2,
            "train.run_dir": str(run_dir), "log.tensorboard": False,
            "data.data_path": str(shard), "data.tokenizer_type": "GPT2BPETokenizer",
            "data.vocab_file": str(vocab), "data.merge_file": str(merges)}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, gpt_shard, bpe_files) -> Path:
    """A finished run of the tiny GPT (2 steps, checkpoint ``step_00000002``), shared by
    the tests that only read it; a test that changes a run copies it first
    (``shutil.copytree``)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    over = tiny_overrides(gpt_shard, bpe_files, tmp / "run",
                          **{"train.max_steps": 2, "train.eval_interval": 0})
    assert train_main([str(gpt_yaml(tmp)), *over]) == 0
    return tmp / "run"
