"""Bad input and faults around a run, each built here (issue 41): a checkpoint without its
RNG states, a disk that fills up during a save."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from megatron_lite.train import main as train_main
from tests.training.conftest import gpt_yaml, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_a_checkpoint_without_rng_states_is_said_as_such(tiny_run, gpt_shard, bpe_files,
                                                         tmp_path, capsys):
    """Same layout, no rng/ folder: the warning names the missing folder, not a layout
    change, and the run goes on."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "checkpoints" / "step_00000002" / "rng")
    over = tiny_overrides(gpt_shard, bpe_files, run, **{"train.max_steps": 3,
                                                        "train.eval_interval": 0,
                                                        "optim.override_schedule": True})
    assert train_main([str(gpt_yaml(tmp_path)), *over]) == 0
    out = capsys.readouterr().out
    assert f"warning: {run / 'checkpoints' / 'step_00000002'} has no rng/ folder" in out, out
    assert "was saved at TP" not in out


DISK_FULL = """
import errno, sys
import torch.distributed.checkpoint.filesystem as fs

real = fs._write_item

def full(transforms, stream, data, *args, **kwargs):
    if "step_00000004" in str(getattr(stream, "name", "")):  # the second save
        stream.write(b"x" * 4096)  # a partial piece, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(transforms, stream, data, *args, **kwargs)

fs._write_item = full
from megatron_lite.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_during_a_save_removes_the_partial_folder_in_one_line(
        gpt_shard, bpe_files, tmp_path):
    """The CLI in a subprocess whose DCP piece writer fails with ENOSPC in the step-4 save:
    exit 2 with one line saying the partial folder was removed; none is left, ``latest``
    still names step 2, and the run resumes from it."""
    run = tmp_path / "run"
    args = [str(gpt_yaml(tmp_path)), *tiny_overrides(
        gpt_shard, bpe_files, run, **{"train.max_steps": 6, "train.save_interval": 2,
                                      "train.eval_interval": 0})]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", DISK_FULL, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    err = out.stderr.strip()
    ckpts = run / "checkpoints"
    assert err == (f"error: {ckpts / 'step_00000004'}: the checkpoint could not be written "
                   "([Errno 28] No space left on device); its partial temporary folder "
                   ".step_00000004.tmp was removed and the last complete checkpoint is kept; "
                   + err.split("is kept; ")[1]), err
    assert err.endswith(" GiB free there") and "Traceback" not in out.stdout + out.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002"]
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert not (run / ".lock").exists()
    assert train_main(args) == 0  # resumes from step 2 and finishes
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6


def _save_with_rank0_disk_full(ctx, run_dir, where):
    """Both ranks save; rank 0's ``where`` write (its folder, or its config file) fails
    with ENOSPC. Every rank must raise SaveFailed (rank 1 naming rank 0) instead of
    waiting for rank 0 in the save's next collective."""
    import errno

    import pytest

    from megatron_lite.checkpoint import format as fmt
    from megatron_lite.config import load_config
    from megatron_lite.models import build_model

    cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=16",
                             "model.num_attention_heads=2", "model.seq_length=8",
                             "model.max_position_embeddings=8", "model.vocab_size=64"])
    model = build_model(cfg.model, ctx)
    if ctx.rank == 0:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        if where == "config":
            fmt.save_config = full
        else:
            fmt.Path.mkdir = full
    with pytest.raises(fmt.SaveFailed) as err:
        fmt.save_checkpoint(run_dir, 1, model, ctx, cfg, {})
    if ctx.rank == 0:
        assert "No space left on device" in str(err.value), err.value
    else:
        assert "rank 0 failed" in str(err.value), err.value
    assert not (run_dir / "checkpoints" / "latest").exists()


def test_a_save_that_fails_on_one_rank_fails_on_every_rank(tmp_path):
    """Rank 0 alone cannot write (its folder, then its metadata): both ranks end with one
    SaveFailed line, no rank waits in a collective for the one that failed (before, rank 1
    hung until the process group's timeout), and no temporary folder is left."""
    from tests.distributed import run_distributed

    for where in ("folder", "config"):
        run_dir = tmp_path / where
        run_distributed(_save_with_rank0_disk_full, 2, run_dir, where, tp_size=1)
        left = list((run_dir / "checkpoints").iterdir()) if (run_dir / "checkpoints").exists() \
            else []
        assert left == [], left
