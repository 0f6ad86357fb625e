"""The life of a run around the loop: interrupts, reruns, fine-tuning, schedule changes."""

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

from megatron_lite.checkpoint import load_file, read_meta
from megatron_lite.train import main as train_main
from megatron_lite.training.schedule import learning_rate
from tests.training.conftest import gpt_yaml, tiny_overrides
from tests.training.interrupts import freeze_mid_run, interrupt_rerun_and_reference, rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # three torchrun jobs of 2 processes
def test_ctrl_c_on_a_torchrun_job_saves_and_the_rerun_matches(gpt_shard, bpe_files, tmp_path):
    """Ctrl-C as a terminal sends it (to torchrun and both workers at once) during TP=2
    training: every rank finishes the step, one checkpoint, one line; rerunning the same
    command resumes and reproduces the uninterrupted run's losses exactly."""
    steps = 30
    run = tmp_path / "run"
    args = [str(gpt_yaml(tmp_path)), *tiny_overrides(
        gpt_shard, bpe_files, run, **{"parallel.tensor_parallel_size": 2,
                                      "train.max_steps": steps, "train.eval_interval": 0,
                                      "train.global_batch_size": 2, "model.hidden_dropout": 0.1})]
    out = interrupt_rerun_and_reference(args, run, tmp_path / "reference", signal.SIGINT, steps)
    assert "rerun the same command to resume" in out
    # the workers print no traceback (torchrun reports the signal it got itself, once)
    assert out.count("Traceback") <= 1 and "KeyboardInterrupt" not in out, out
    assert [r["loss"] for r in rows(run)] == [r["loss"] for r in rows(tmp_path / "reference")]


def test_second_signal_after_the_grace_period_exits_at_once():
    # the handler's clock is a fake one advanced by hand: the outcome does not depend on
    # how long the process waits between signals on a loaded machine
    code = ("import os, signal, time, types\n"
            "import megatron_lite.training.interrupt as m\n"
            "now = [1000.0]\n"
            "m.time = types.SimpleNamespace(monotonic=lambda: now[0])\n"
            "with m.Interrupt(grace_s=0.2) as i:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    now[0] += 0.15\n"
            "    os.kill(os.getpid(), signal.SIGTERM)  # a repeat inside the grace period\n"
            "    assert i.received == signal.SIGTERM and i.agreed('cpu') == signal.SIGTERM\n"
            "    print('still here', flush=True)\n"
            "    now[0] += 0.1\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(5)\n"
            "print('not reached')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 128 + signal.SIGINT, out.stderr
    assert out.stdout == "still here\n"
    assert "exiting without a checkpoint" in out.stderr


def _train(tmp_path, gpt_shard, bpe_files, run_dir, **kw):
    kw = {"train.eval_interval": 0, **kw}
    return train_main([str(gpt_yaml(tmp_path)),
                       *tiny_overrides(gpt_shard, bpe_files, run_dir, **kw)])


def test_metrics_of_reruns_never_repeat_a_step(gpt_shard, bpe_files, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tmp_path, gpt_shard, bpe_files, run, **{"train.max_steps": 6,
                                                          "train.save_interval": 2}) == 0
    # killed after logging steps 5 and 6 but before their checkpoint: resume at step 4
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step_00000006")
    (ckpts / "latest").write_text("step_00000004\n")
    assert _train(tmp_path, gpt_shard, bpe_files, run, **{"train.max_steps": 8,
                                                          "optim.override_schedule": True}) == 0
    assert [r["step"] for r in rows(run)] == list(range(1, 9))
    # an earlier start that never saved: its metrics move aside, the new run starts afresh
    shutil.rmtree(ckpts)
    capsys.readouterr()
    assert _train(tmp_path, gpt_shard, bpe_files, run, **{"train.max_steps": 3}) == 0
    assert "moved to metrics.1.jsonl" in capsys.readouterr().out
    assert [r["step"] for r in rows(run)] == [1, 2, 3]
    old = [json.loads(x)["step"] for x in (run / "metrics.1.jsonl").read_text().splitlines()]
    assert old == list(range(1, 9))


def test_load_past_max_steps_is_an_error_and_finetune_starts_over(gpt_shard, bpe_files,
                                                                  tmp_path, capsys):
    base = tmp_path / "base"
    assert _train(tmp_path, gpt_shard, bpe_files, base, **{"train.max_steps": 6}) == 0
    capsys.readouterr()
    new = tmp_path / "new"
    assert _train(tmp_path, gpt_shard, bpe_files, new, **{"train.max_steps": 4,
                                                          "train.load": str(base)}) == 2
    err = capsys.readouterr().err
    assert "at step 6, not before train.max_steps=4: nothing to train" in err
    assert "train.finetune=true" in err and not (new / "metrics.jsonl").exists()
    # a finished run rerun: nothing to do, said so
    assert _train(tmp_path, gpt_shard, bpe_files, base, **{"train.max_steps": 6}) == 2
    assert "nothing to train" in capsys.readouterr().err

    assert _train(tmp_path, gpt_shard, bpe_files, new, **{
        "train.max_steps": 4, "train.load": str(base), "train.finetune": True,
        "optim.warmup_steps": 3, "optim.lr": 2e-3}) == 0
    out = capsys.readouterr().out
    assert "fine-tuning from" in out and "weights only" in out
    assert f"done: {new} at step 4 (metrics.jsonl, loss.png, checkpoints/step_00000004)" in out
    logged = rows(new)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert logged[0]["lr"] == pytest.approx(2e-3 / 3)  # its own warmup, from step 0
    meta = read_meta(new / "checkpoints" / "step_00000004")
    assert meta["step"] == 4 and meta["schedule"]["train.max_steps"] == 4
    # it starts from base's weights: at lr 0 they come out unchanged
    zero = tmp_path / "zero"
    assert _train(tmp_path, gpt_shard, bpe_files, zero, **{
        "train.max_steps": 1, "train.load": str(base), "train.finetune": True,
        "optim.lr": 0.0, "optim.min_lr": 0.0}) == 0
    want = load_file(base / "checkpoints" / "step_00000006" / "model.pt")
    got = load_file(zero / "checkpoints" / "step_00000001" / "model.pt")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("override", [False, True])
def test_a_resume_with_another_max_steps_keeps_or_overrides_the_schedule(
        gpt_shard, bpe_files, tmp_path, capsys, override):
    from megatron_lite.config import OptimConfig

    run = tmp_path / "run"
    kw = {"optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.warmup_steps": 2,
          "optim.decay_style": "cosine"}
    assert _train(tmp_path, gpt_shard, bpe_files, run, **kw, **{"train.max_steps": 10,
                                                                "train.exit_after": 4}) == 0
    capsys.readouterr()
    assert _train(tmp_path, gpt_shard, bpe_files, run, **kw, **{
        "train.max_steps": 20, "optim.override_schedule": override}) == 0
    out = capsys.readouterr().out
    assert "train.max_steps 10 -> 20" in out
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, decay_style="cosine")
    followed = 20 if override else 10
    lrs = {r["step"]: r["lr"] for r in rows(run)}
    assert lrs[5] == pytest.approx(learning_rate(4, optim, followed))
    assert lrs[20] == pytest.approx(learning_rate(19, optim, followed))
    assert read_meta(run / "checkpoints" / "step_00000020")["schedule"]["train.max_steps"] \
        == followed


def test_an_explicit_vocab_size_must_match_the_tokenizer(gpt_shard, bpe_files, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tmp_path, gpt_shard, bpe_files, run, **{"model.vocab_size": 8192}) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: override 'model.vocab_size=8192': model.vocab_size=8192 but "
                          "the tokenizer") and "has 2000 tokens" in err and "\n" not in err
    assert not run.exists()


def test_a_run_dir_works_from_any_directory(gpt_shard, bpe_files, tmp_path, monkeypatch,
                                            capsys):
    """Trained with relative paths; evaluated and sampled from another directory."""
    from megatron_lite.config import load_config
    from megatron_lite.evaluate import main as evaluate_main
    from megatron_lite.generate import main as generate_main

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    for suffix in (".bin", ".idx"):
        (work / "data" / f"c{suffix}").symlink_to(f"{gpt_shard}{suffix}")
    for f in bpe_files:
        (work / "data" / f.name).symlink_to(f)
    monkeypatch.chdir(work)
    over = tiny_overrides("data/c", ("data/vocab.json", "data/merges.txt"), "runs/r",
                          **{"train.max_steps": 2, "train.eval_interval": 0})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 0
    saved = load_config(work / "runs/r/config.yaml")
    assert saved.data.data_path == str(work / "data/c")
    assert saved.data.vocab_file == str(work / "data/vocab.json")
    assert saved.train.run_dir == str(work / "runs/r")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert evaluate_main(["work/runs/r", "--iters", "1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 2
    assert generate_main(["work/runs/r", "--prompt", "Return the", "--greedy",
                          "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Return the")
    # generate takes overrides; its errors name what it has
    assert generate_main(["work/runs/r", "--prompt", "x", "data.tokenizer_type=null"]) == 2
    err = capsys.readouterr().err
    assert "names no tokenizer: add the overrides data.tokenizer_type=" in err
    assert generate_main(["--prompt", "x", "model.hidden_dropout=0", "work/runs/r",
                          "--greedy", "--max-new-tokens", "2"]) == 0


def test_train_help_lists_every_config_key_with_default_and_meaning():
    import dataclasses

    from megatron_lite.config import Config

    out = subprocess.run([sys.executable, "-m", "megatron_lite.train", "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            key = f"{section.name}.{f.name}="
            row = next((x for x in lines if x.strip().startswith(key)), None)
            assert row is not None, key
            assert len(row.split(None, 1)) == 2, f"{key} has no meaning"  # default + text
    assert "    train.max_steps=100 " in out.stdout
    assert "optimizer steps of the run" in out.stdout


def test_sigterm_to_a_single_process_run_saves_and_says_only_that(gpt_shard, bpe_files,
                                                                  tmp_path):
    run = tmp_path / "run"
    args = [str(gpt_yaml(tmp_path)), *tiny_overrides(
        gpt_shard, bpe_files, run, **{"train.max_steps": 2000, "train.eval_interval": 0,
                                      "train.global_batch_size": 2})]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_lite.train", *args], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    freeze_mid_run(proc, lambda: [proc.pid], run / "metrics.jsonl", 2000)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    lines = [x for x in out.splitlines() if not x.startswith("step")]
    assert len(lines) == 2 and lines[0].startswith("SIGTERM received"), lines
    assert lines[1].startswith("interrupted at step") and "done:" not in out


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_lives(gpt_shard, bpe_files,
                                                                          tmp_path, capsys):
    """Two real processes, one train.run_dir: the second is one line naming the first's
    PID and writes nothing; the first's metrics hold its own steps once."""
    run = tmp_path / "run"
    args = [str(gpt_yaml(tmp_path)), *tiny_overrides(
        gpt_shard, bpe_files, run, **{"train.max_steps": 2000, "train.eval_interval": 0,
                                      "train.global_batch_size": 2})]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    first = subprocess.Popen([sys.executable, "-m", "megatron_lite.train", *args], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.01)
    second = subprocess.run([sys.executable, "-m", "megatron_lite.train", *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    err = second.stderr.strip()
    assert err.startswith(f"error: train.run_dir={run} is in use by process {first.pid} on ")
    assert "\n" not in err and "Traceback" not in second.stdout
    steps = [r["step"] for r in rows(run) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's steps, once each
    assert not (run / ".lock").exists()  # released when the first one ended


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_run, gpt_shard, bpe_files,
                                                    tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run / ".lock").write_text(f"{os.uname().nodename} {gone.pid} 2026-01-01T00:00:00\n")
    over = tiny_overrides(gpt_shard, bpe_files, run, **{"train.max_steps": 3,
                                                        "train.eval_interval": 0})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 0
    out = capsys.readouterr().out
    assert f"warning: {run} was held by process {gone.pid} (since 2026-01-01T00:00:00), " \
           "which is gone; taking it over" in out
    assert not (run / ".lock").exists()
