"""Sharded (DCP) checkpoints: what each rank writes, resharding at other TP/DP layouts
against a full-gather reference, async saves, consolidation, and refused metadata."""

import json
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

from megatron_lite.checkpoint import CheckpointError, load_checkpoint, load_file
from megatron_lite.checkpoint.commands import main as checkpoint_main
from megatron_lite.checkpoint.optim_state import full_optimizer_state
from megatron_lite.checkpoint.sharded import flat_boxes, narrow, read_dcp_metadata
from megatron_lite.config import load_config
from megatron_lite.convert import main as convert_main
from megatron_lite.models import build_model
from megatron_lite.parallel import ParallelContext, full_state_dict
from megatron_lite.train import main as train_main
from megatron_lite.training.trainer import Trainer
from tests.training.conftest import gpt_yaml, tiny_overrides

VOCAB = 2000  # the test tokenizer's; divisible_by 7 pads it to 2002 at TP=1/2, 2016 at TP=4
SAVED = {"parallel.tensor_parallel_size": 2, "train.max_steps": 3, "train.eval_interval": 3,
         "model.make_vocab_size_divisible_by": 7, "train.global_batch_size": 8}


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _trim(name, t):
    return t[:VOCAB] if name == "wte.weight" and t.dim() else t


def _train_and_gather(ctx, overrides, ref_path):
    """Train, save (at the end), and keep a full-gather reference of what was saved."""
    trainer = Trainer(load_config(None, overrides), ctx)
    trainer.fit()
    model = full_state_dict(trainer.model, ctx.tp_group)
    optim = full_optimizer_state(trainer.model, trainer.optimizer, ctx)
    if ctx.rank == 0:
        torch.save({"model": model, "optim": optim}, ref_path)


def test_flat_boxes_tile_any_range():
    for shape in [(5, 7), (3, 4, 5), (10,), (2, 3, 4, 5)]:
        n = torch.Size(shape).numel()
        t = torch.arange(n).view(shape)
        for a in range(0, n, 3):
            for b in range(a + 1, n + 1, 5):
                got = []
                for (off, size), first in flat_boxes(shape, a, b):
                    piece = narrow(t, off, size).reshape(-1)
                    assert torch.equal(piece, torch.arange(first, first + piece.numel()))
                    got += piece.tolist()
                assert got == list(range(a, b)), (shape, a, b)


@pytest.fixture(scope="module")
def tp2xdp2(gpt_shard, bpe_files, tmp_path_factory):
    """A run saved at TP=2 x DP=2 (4 processes), dropout on, with its full-gather reference."""
    from tests.distributed import run_distributed

    root = tmp_path_factory.mktemp("tp2xdp2")
    over = tiny_overrides(gpt_shard, bpe_files, root / "run", **SAVED,
                          **{"model.hidden_dropout": 0.1})
    run_distributed(_train_and_gather, 4, over, root / "ref.pt", tp_size=2)
    return root


def test_every_rank_writes_only_its_share(tp2xdp2):
    ckpt = tp2xdp2 / "run/checkpoints/step_00000003"
    files = sorted(p.name for p in ckpt.glob("*.distcp"))
    assert files == [f"__{r}_0.distcp" for r in range(4)] and not (ckpt / "model.pt").exists()
    md = read_dcp_metadata(ckpt / ".metadata")
    per_rank = dict.fromkeys(files, 0)
    stored = 0
    for fqn, tmd in md.state_dict_metadata.items():
        size = tmd.properties.dtype.itemsize
        stored += tmd.size.numel() * size
        for chunk in tmd.chunks:
            where = md.storage_data[MetadataIndex(fqn, chunk.offsets)].relative_path
            per_rank[where] += chunk.sizes.numel() * size
    ref = torch.load(tp2xdp2 / "ref.pt")
    full = sum(_trim(k, t).numel() * t.element_size() for k, t in ref["model"].items())
    full += sum(_trim(k, v).numel() * v.element_size() for k, e in ref["optim"]["state"].items()
                for v in e.values() if v.dim())
    assert sum(per_rank.values()) == stored == full  # everything once, vocab unpadded
    assert max(per_rank.values()) < 1.05 * full / 4  # DP replicas split their TP shard


def _load_and_compare(ctx, overrides, ckpt, ref_path, val_loss):
    trainer = Trainer(load_config(None, overrides + [f"train.load={ckpt}"]), ctx)
    ref = torch.load(ref_path)
    model = full_state_dict(trainer.model, ctx.tp_group)
    optim = full_optimizer_state(trainer.model, trainer.optimizer, ctx)
    for name, t in ref["model"].items():
        assert torch.equal(_trim(name, model[name]), _trim(name, t)), name
        if name == "wte.weight":  # the padding rows of this layout are zeros
            assert not model[name][VOCAB:].any()
    assert optim["param_groups"] == ref["optim"]["param_groups"]
    for name, entry in ref["optim"]["state"].items():
        for key, t in entry.items():
            assert torch.equal(_trim(name, optim["state"][name][key]), _trim(name, t)), \
                (name, key)
    got = trainer.evaluate()["val_loss"]
    assert abs(got - val_loss) <= 1e-6, (got, val_loss)


@pytest.mark.parametrize("world,tp", [(1, 1), (4, 4), (2, 1), (2, 2)],
                         ids=["tp1", "tp4", "tp1xdp2", "tp2xdp1"])
def test_tp2xdp2_checkpoint_loads_at_other_layouts(distributed, gpt_shard, bpe_files, tmp_path,
                                                   tp2xdp2, world, tp):
    ckpt = tp2xdp2 / "run/checkpoints/step_00000003"
    val_loss = _rows(tp2xdp2 / "run")[-1]["val_loss"]
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "load", **{
        **SAVED, "parallel.tensor_parallel_size": tp, "train.max_steps": 4,
        "model.hidden_dropout": 0.1})
    distributed(_load_and_compare, world, over, str(ckpt), tp2xdp2 / "ref.pt", val_loss,
                tp_size=tp)


def _train(ctx, overrides):
    Trainer(load_config(None, overrides), ctx).fit()


ZERO = {"parallel.engine": "deepspeed"}


@pytest.mark.parametrize("tp,variant", [(2, {}), (2, {"train.async_save": True}),
                                        (1, {**ZERO, "train.async_save": True})],
                         ids=["tp2-sync", "tp2-async", "zero-async"])
def test_resume_is_bitwise_exact_with_async_saves(distributed, gpt_shard, bpe_files, tmp_path,
                                                  tp, variant):
    """Saves every 2 steps (in the background: training goes on meanwhile); stopped after
    3 and resumed, the run repeats the straight one bit for bit (dropout on)."""
    if variant.get("parallel.engine") == "deepspeed":
        pytest.importorskip("deepspeed")
    common = {"parallel.tensor_parallel_size": tp, "train.max_steps": 6,
              "train.eval_interval": 3, "train.save_interval": 2,
              "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1, **variant}
    straight = tiny_overrides(gpt_shard, bpe_files, tmp_path / "straight", **common)
    distributed(_train, 2, straight, tp_size=tp)
    split = tiny_overrides(gpt_shard, bpe_files, tmp_path / "split", **common)
    distributed(_train, 2, split + ["train.exit_after=3"], tp_size=tp)
    assert (tmp_path / "split/checkpoints/latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in (tmp_path / "split/checkpoints").iterdir()) == [
        "latest", "step_00000002", "step_00000003"]
    distributed(_train, 2, split, tp_size=tp)
    a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        assert (ra["loss"], ra["grad_norm"], ra.get("val_loss")) == \
            (rb["loss"], rb["grad_norm"], rb.get("val_loss")), (ra, rb)


def test_kill_9_during_a_background_write_keeps_the_previous_checkpoint(gpt_shard, bpe_files,
                                                                       tmp_path):
    config = gpt_yaml(tmp_path)
    run = tmp_path / "run"
    over = tiny_overrides(gpt_shard, bpe_files, run, **{
        "train.max_steps": 400, "train.save_interval": 1, "train.eval_interval": 0,
        "train.log_interval": 50, "train.async_save": True})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    latest = run / "checkpoints/latest"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_lite.train", str(config), *over],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    # a complete checkpoint exists, and the next one's pieces are being written
    while not (latest.exists() and list((run / "checkpoints").glob(".step_*.tmp/*.distcp"))):
        assert proc.poll() is None and time.monotonic() < deadline, "no background write seen"
        time.sleep(0.0005)
    proc.kill()
    proc.wait()
    pointed = latest.read_text().strip()
    half = list((run / "checkpoints").glob(".step_*.tmp"))
    assert half and all(int(h.name[6:14]) > int(pointed[5:]) for h in half)
    model = build_model(load_config(run / "config.yaml").model)
    k = load_checkpoint(run, model, ParallelContext())["step"]
    assert f"step_{k:08d}" == pointed
    assert train_main([str(config), *over, f"train.max_steps={k + 1}"]) == 0
    assert _rows(run)[-1]["step"] == k + 1  # resumed from there
    assert latest.read_text().strip() == f"step_{k + 1:08d}"
    assert not list((run / "checkpoints").glob(".step_*.tmp"))


def test_hf_export_of_sharded_equals_export_of_consolidated(distributed, gpt_shard, bpe_files,
                                                            tmp_path):
    pytest.importorskip("transformers")
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run", **{
        **SAVED, "train.max_steps": 2})
    distributed(_train, 2, over, tp_size=2)
    assert checkpoint_main(["consolidate", str(tmp_path / "run"), "--output",
                            str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "config.yaml", "meta.json", "model.safetensors", "optim_groups.pt"]
    for src, out in (("run", "hf_sharded"), ("one", "hf_one")):
        assert convert_main(["--from", str(tmp_path / src), "--to-hf", str(tmp_path / out)]) == 0
    a, b = (tmp_path / "hf_sharded/model.safetensors"), (tmp_path / "hf_one/model.safetensors")
    assert a.read_bytes() == b.read_bytes()
    # the consolidated file is the full form: optimizer state included, vocab unpadded
    full = load_file(tmp_path / "one/optim.pt")
    assert full["state"]["wte.weight"]["exp_avg"].shape[0] == VOCAB
    assert load_file(tmp_path / "one/model.pt")["wte.weight"].shape[0] == VOCAB


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", [".metadata", "model.pt"])
def test_a_checkpoint_that_would_run_code_is_refused(gpt_shard, bpe_files, tmp_path, capsys,
                                                     where):
    """DCP's .metadata is a pickle: read through an allow-list, a payload is refused before
    it runs (and format 2's model.pt through weights_only)."""
    config = gpt_yaml(tmp_path)
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run",
                          **{"train.max_steps": 1, "train.eval_interval": 0})
    assert train_main([str(config), *over]) == 0
    ckpt = tmp_path / "run/checkpoints/step_00000001"
    marker = tmp_path / "pwned"
    if where == "model.pt":  # today's format: a full-form checkpoint with a payload
        for p in ckpt.glob("*.distcp"):
            p.unlink()
        (ckpt / ".metadata").unlink()
        torch.save({"wte.weight": _Payload(marker)}, ckpt / "model.pt")
    else:
        (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    model = build_model(load_config(ckpt / "config.yaml").model)
    with pytest.raises(CheckpointError, match="refused|unreadable"):
        load_checkpoint(ckpt, model, ParallelContext())
    capsys.readouterr()
    again = tiny_overrides(gpt_shard, bpe_files, tmp_path / "new", **{
        "train.max_steps": 2, "train.eval_interval": 0, "train.load": str(ckpt)})
    assert train_main([str(config), *again]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(ckpt.name) in err
    assert not marker.exists()
