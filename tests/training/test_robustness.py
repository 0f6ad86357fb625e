"""Failure paths found in review: rank-0-only failures, stale caches, mismatched checkpoints."""

import numpy as np
import pytest

from megatron_lite.config import ConfigError, load_config
from megatron_lite.data.gpt_dataset import GPTDataset
from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_lite.train import main as train_main
from megatron_lite.training.trainer import Trainer


def _shard(prefix, docs):
    w = IndexedDatasetWriter(prefix, np.uint16)
    for doc in docs:
        w.add_document([doc])
    w.finalize()
    return IndexedDataset(prefix)


def test_rebuilt_shard_never_reuses_stale_indices(tmp_path):
    a = GPTDataset(_shard(tmp_path / "d", [list(range(50))] * 4), (0, 4), 8, 10, seed=1)
    assert not a.cached and int(a[0].max()) < 50
    b = GPTDataset(_shard(tmp_path / "d", [list(range(100, 130))] * 3), (0, 3), 8, 10, seed=1)
    assert not b.cached and int(b[0].min()) >= 100


def _train_with_tiny_valid(ctx, prefix, run_dir):
    cfg = load_config(None, [
        "model.num_layers=1", "model.hidden_size=16", "model.num_attention_heads=2",
        "model.seq_length=16", "model.max_position_embeddings=16", "model.vocab_size=64",
        f"parallel.tensor_parallel_size={ctx.tp_size}", "train.micro_batch_size=2",
        "train.global_batch_size=2", "train.max_steps=2", "train.eval_interval=1",
        "train.eval_iters=1", f"train.run_dir={run_dir}", "log.tensorboard=false",
        f"data.data_path={prefix}", "data.split=9,1,0"])
    trainer = Trainer(cfg, ctx)
    assert trainer.run.valid_data is None  # too small: a warning on every rank, not a hang
    trainer.fit()


def test_a_split_too_small_is_skipped_on_every_rank(distributed, tmp_path):
    docs = [list(range(i, i + 40)) for i in range(9)] + [[1, 2, 3]]  # valid: 3 tokens
    _shard(tmp_path / "d", docs)
    distributed(_train_with_tiny_valid, 2, tmp_path / "d", tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("override,message", [
    ("parallel.zero_stage=2", "parallel.zero_stage is for parallel.engine=deepspeed"),
    ("parallel.engine=deepspeed parallel.zero_stage=3", "zero_stage=3 is not 1 or 2"),
    ("train.phase2_seq_length=64", "phase2_seq_length is for model.arch=bert only"),
])
def test_options_that_would_do_nothing_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split()).validate()


def test_loading_a_checkpoint_of_another_model_is_one_line(tmp_path, tiny_run, gpt_shard,
                                                            bpe_files, capsys):
    from tests.training.conftest import gpt_yaml, tiny_overrides

    other = tiny_overrides(gpt_shard, bpe_files, tmp_path / "b",
                           **{"train.max_steps": 3, "train.eval_interval": 0,
                              "model.num_layers": 3, "train.load": str(tiny_run)})
    capsys.readouterr()
    assert train_main([str(gpt_yaml(tmp_path)), *other]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "cannot load into this model" in err
    assert "\n" not in err
