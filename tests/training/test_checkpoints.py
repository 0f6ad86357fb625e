"""Checkpoints: exact resume, resharding 2 -> 1 and 2 -> 4, crashes mid-save, restarts,
HF round trip, averaging, and bad checkpoint files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint import load_checkpoint, load_file
from megatron_lite.checkpoint.commands import main as checkpoint_main
from megatron_lite.checkpoint.optim_state import full_optimizer_state
from megatron_lite.config import load_config
from megatron_lite.convert import main as convert_main
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.parallel import ParallelContext, full_state_dict, gather_from_tp_region
from megatron_lite.train import main as train_main
from megatron_lite.training.trainer import Trainer
from tests.training.conftest import gpt_yaml, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
VOCAB_PARAMS = ("wte.weight",)


def _train(ctx, overrides):
    Trainer(load_config(None, overrides), ctx).fit()


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


XL = {"model.position_embedding": "relative", "model.mem_len": 16,
      "data.ordering": "consecutive"}


SPAN = {"model.position_embedding": "relative", "model.adaptive_span": True,
        "model.attn_span": 64, "model.adaptive_span_init": 0.2,
        "model.adaptive_span_loss": 1e-3, "data.ordering": "consecutive"}


@pytest.mark.parametrize("world,tp,variant", [
    (2, 2, {}), (2, 1, {}), (2, 1, {"model.layerdrop": 0.5}), (2, 2, XL), (2, 1, XL),
    (2, 2, SPAN), (2, 1, {**XL, "model.layerdrop": 0.5}),
    (2, 1, {**SPAN, "model.activation_checkpointing": "full"})],
    ids=["tp2xdp1", "tp1xdp2", "tp1xdp2-layerdrop", "tp2xdp1-xl-memory", "tp1xdp2-xl-memory",
         "tp2xdp1-adaptive-span", "tp1xdp2-xl-layerdrop", "tp1xdp2-adaptive-span-checkpointed"])
def test_resume_is_bitwise_exact(distributed, gpt_shard, bpe_files, tmp_path, world, tp,
                                 variant):
    """With LayerDrop the two DP ranks drop different layers (no hang under DDP), and the
    decisions after a resume are those of the straight run. With Transformer-XL's memory
    the lanes and every rank's memories continue where they were."""
    common = {"parallel.tensor_parallel_size": tp, "train.max_steps": 12,
              "train.eval_interval": 6, "model.hidden_dropout": 0.1,
              "model.attention_dropout": 0.1, "model.num_layers": 4, **variant}
    straight = tiny_overrides(gpt_shard, bpe_files, tmp_path / "straight", **common)
    distributed(_train, world, straight, tp_size=tp)
    split = tiny_overrides(gpt_shard, bpe_files, tmp_path / "split", **common)
    distributed(_train, world, split + ["train.exit_after=6"], tp_size=tp)
    assert (tmp_path / "split/checkpoints/latest").read_text().strip() == "step_00000006"
    distributed(_train, world, split, tp_size=tp)  # resumes from the run dir by itself
    a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"] and ra.get("val_loss") == rb.get("val_loss"), (ra, rb)
        assert ra["grad_norm"] == rb["grad_norm"]


def _trim(name, t):
    return t[:2000] if name in VOCAB_PARAMS and t.dim() else t  # padding differs by TP


def _check_reshard(ctx, overrides, ckpt, expect_path):
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, ctx)  # loads train.load: saved at TP=2, here at ctx.tp_size
    model_state = full_state_dict(trainer.model, ctx.tp_group)
    optim_state = full_optimizer_state(trainer.model, trainer.optimizer, ctx)
    saved_model = load_file(Path(ckpt) / "model.pt")  # the full form, assembled
    saved_optim = load_file(Path(ckpt) / "optim.pt")
    for name, t in saved_model.items():
        assert torch.equal(_trim(name, model_state[name]), _trim(name, t)), name
    for name, entry in saved_optim["state"].items():
        for key, t in entry.items():
            assert torch.equal(_trim(name, optim_state["state"][name][key]), _trim(name, t)), \
                (name, key)
    ids = torch.arange(64).view(2, 32) % 2000
    logits = gather_from_tp_region(trainer.model(ids), ctx.tp_group)[..., :2000]
    if ctx.rank == 0:
        torch.save(logits.detach(), expect_path)


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_tp4(distributed, gpt_shard, bpe_files,
                                                       tmp_path):
    base = {"train.max_steps": 3, "train.eval_interval": 0}
    src = tiny_overrides(gpt_shard, bpe_files, tmp_path / "tp2",
                         **base, **{"parallel.tensor_parallel_size": 2})
    distributed(_train, 2, src, tp_size=2)
    ckpt = tmp_path / "tp2/checkpoints/step_00000003"
    outs = {}
    for tp in (1, 4):
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / f"load{tp}", **{
            **base, "train.max_steps": 4, "parallel.tensor_parallel_size": tp,
            "train.load": str(ckpt)})
        distributed(_check_reshard, tp, over, str(ckpt), tmp_path / f"logits{tp}.pt", tp_size=tp)
        outs[tp] = torch.load(tmp_path / f"logits{tp}.pt")
    assert torch.allclose(outs[1], outs[4], atol=1e-5, rtol=0)


def test_keep_only_the_newest_checkpoints(gpt_shard, bpe_files, tmp_path):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path, **{
        "train.max_steps": 5, "train.save_interval": 1, "train.keep_checkpoints": 2,
        "train.eval_interval": 0})
    Trainer(load_config(None, over), ParallelContext()).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000004", "step_00000005"]


@pytest.mark.slow  # three training processes killed mid-save, a fourth that finishes
def test_kill_9_during_saves_never_breaks_latest(gpt_shard, bpe_files, tmp_path):
    from megatron_lite.models import build_model

    config = gpt_yaml(tmp_path)
    run = tmp_path / "run"
    over = tiny_overrides(gpt_shard, bpe_files, run, **{
        "train.max_steps": 400, "train.save_interval": 1, "train.eval_interval": 0,
        "train.log_interval": 50})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    latest = run / "checkpoints/latest"
    steps, half_written = [], 0
    # kill as a save starts, as it writes, and at any moment (saves happen every step)
    for moment in (".step_*.tmp", ".step_*.tmp/*.distcp", None):
        before = latest.read_text() if latest.exists() else None
        proc = subprocess.Popen([sys.executable, "-m", "megatron_lite.train", str(config),
                                 *over], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # NOTE: wait for this attempt's own first save, however slow the machine, then kill
        # at the moment: the process is stopped (SIGSTOP) as soon as the moment is seen and
        # let go again if the save finished meanwhile, so however fast the machine saves,
        # the kill lands inside one
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
            if (latest.read_text() if latest.exists() else None) != before and \
                    (not moment or list((run / "checkpoints").glob(moment))):
                proc.send_signal(signal.SIGSTOP)
                if not moment or list((run / "checkpoints").glob(moment)):
                    break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        half_written += bool(list((run / "checkpoints").glob(".step_*.tmp")))
        model = build_model(load_config(run / "config.yaml").model)
        steps.append(load_checkpoint(run, model, ParallelContext())["step"])
    assert steps == sorted(steps) and len(set(steps)) == 3  # each restart resumed, moved on
    assert half_written >= 2  # the kills inside a save leave a .step_*.tmp behind
    # the next start resumes from latest and removes what the kills left half-written
    k = steps[-1]
    assert train_main([str(config), *over, f"train.max_steps={k + 1}"]) == 0
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{k + 1:08d}"
    assert not list((run / "checkpoints").glob(".step_*.tmp"))


@pytest.mark.slow  # two torchrun jobs, one restarting after a rank is killed
def test_torchrun_restart_after_a_killed_rank_finishes_like_no_fault(gpt_shard, bpe_files,
                                                                     tmp_path):
    config = gpt_yaml(tmp_path)
    finals = {}
    # the fault: tests/training/faults.py runs megatron_lite.train with a hook that kills
    # rank 1 after step 5 of the first attempt
    faults = ["--kill-rank", "1", "--after-step", "5"]
    for name, command in (("clean", ["-m", "megatron_lite.train"]),
                          ("fault", [str(ROOT / "tests/training/faults.py"), *faults])):
        over = tiny_overrides(gpt_shard, bpe_files, tmp_path / name, **{
            "parallel.tensor_parallel_size": 2, "train.max_steps": 8, "train.save_interval": 2,
            "train.eval_interval": 0, "model.hidden_dropout": 0.1})
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2", "--max-restarts", "1",
                              *command, str(config), *over],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        if name == "fault":
            assert "fault injection: killing rank 1 after step 5" in out.stdout
            assert "resumed from" in out.stdout
        finals[name] = {r["step"]: r["loss"] for r in _rows(tmp_path / name)}
    assert finals["fault"][8] == finals["clean"][8]


def test_hf_round_trip_and_back(tiny_run, gpt_shard, bpe_files, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run",
                          **{"train.max_steps": 2, "train.eval_interval": 0})
    assert convert_main(["--from", str(tiny_run), "--to-hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf/model.safetensors").exists()
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    eod = build_tokenizer("GPT2BPETokenizer", *map(str, bpe_files)).eod
    assert eod == 0 and hf.config.eos_token_id == hf.config.bos_token_id == eod  # not V - 1

    ours = Trainer(load_config(None, over + [f"train.load={tiny_run}",
                                             "train.max_steps=3",
                                             f"train.run_dir={tmp_path / 'x'}"]),
                   ParallelContext()).model.eval()
    ids = torch.arange(40).view(2, 20) * 7 % 2000
    with torch.no_grad():
        ref = ours(ids)[..., :2000]
        assert (hf(ids).logits - ref).abs().max() <= 1e-5
    assert convert_main(["--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "back"),
                         "--tp", "2"]) == 0
    from megatron_lite.models import build_model

    back = build_model(load_config(tmp_path / "back/config.yaml").model)
    load_checkpoint(tmp_path / "back", back, ParallelContext())
    with torch.no_grad():
        assert (back.eval()(ids)[..., :2000] - ref).abs().max() <= 1e-5


def test_average_of_checkpoints(gpt_shard, bpe_files, tmp_path):
    over = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run", **{
        "train.max_steps": 3, "train.save_interval": 1, "train.eval_interval": 0})
    Trainer(load_config(None, over), ParallelContext()).fit()
    assert checkpoint_main(["average", str(tmp_path / "run"), "--last", "2", "--output",
                            str(tmp_path / "avg")]) == 0
    ck = tmp_path / "run/checkpoints"
    a, b = (load_file(ck / f"step_0000000{i}/model.pt") for i in (2, 3))
    avg = load_file(tmp_path / "avg/model.pt")
    for k in a:
        assert torch.allclose(avg[k], (a[k] + b[k]) / 2, atol=1e-7)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_damaged_checkpoint_gives_one_line_naming_the_file(tiny_run, gpt_shard, bpe_files,
                                                          tmp_path, capsys, damage):
    shutil.copytree(tiny_run, tmp_path / "run")
    model_pt = tmp_path / "run/checkpoints/step_00000002/__0_0.distcp"  # rank 0's pieces
    if damage == "truncated":
        model_pt.write_bytes(model_pt.read_bytes()[:1000])
    elif damage == "garbage":
        model_pt.write_bytes(b"not a checkpoint")
    else:
        model_pt.unlink()
    capsys.readouterr()
    again = tiny_overrides(gpt_shard, bpe_files, tmp_path / "new", **{
        "train.max_steps": 3, "train.eval_interval": 0, "train.load": str(tmp_path / "run")})
    assert train_main([str(gpt_yaml(tmp_path)), *again]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "step_00000002" in err and "\n" not in err


def test_resuming_a_run_dir_with_another_model_is_refused(tiny_run, gpt_shard, bpe_files,
                                                          tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    over = tiny_overrides(gpt_shard, bpe_files, run,
                          **{"train.max_steps": 3, "train.eval_interval": 0})
    assert train_main([str(gpt_yaml(tmp_path)), *over, "model.hidden_size=64"]) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint of a different model (model.hidden_size changed)" in err


def test_an_unreadable_latest_checkpoint_falls_back_to_the_newest_readable(
        gpt_shard, bpe_files, tmp_path, capsys):
    """A restart whose latest checkpoint is damaged resumes from the one before it, saying
    so, and trains on: its losses from there equal an undamaged run's."""
    config = str(gpt_yaml(tmp_path))
    runs = {}
    for name in ("damaged", "clean"):
        runs[name] = tmp_path / name
        over = tiny_overrides(gpt_shard, bpe_files, runs[name], **{
            "train.max_steps": 3, "train.save_interval": 1, "train.eval_interval": 0})
        assert train_main([config, *over]) == 0
    (runs["damaged"] / "checkpoints/step_00000003/__0_0.distcp").write_bytes(b"garbage")
    capsys.readouterr()
    over = tiny_overrides(gpt_shard, bpe_files, runs["damaged"], **{
        "train.max_steps": 5, "train.save_interval": 1, "train.eval_interval": 0})
    assert train_main([config, *over]) == 0
    out = capsys.readouterr().out
    assert "warning: the latest checkpoint step_00000003 is unreadable (" in out
    assert "resuming from step_00000002, the newest readable one" in out
    assert f"resumed from {runs['damaged']} at step 2" in out
    # a reference that resumed from step 2 on purpose: the same losses at steps 3..5
    shutil.rmtree(runs["clean"] / "checkpoints/step_00000003")
    (runs["clean"] / "checkpoints/latest").write_text("step_00000002\n")
    assert train_main([config, *tiny_overrides(gpt_shard, bpe_files, runs["clean"], **{
        "train.max_steps": 5, "train.save_interval": 1, "train.eval_interval": 0})]) == 0
    got, want = ({r["step"]: r["loss"] for r in map(json.loads, open(r / "metrics.jsonl"))
                  if "loss" in r} for r in (runs["damaged"], runs["clean"]))
    assert [got[s] for s in (3, 4, 5)] == [want[s] for s in (3, 4, 5)]
