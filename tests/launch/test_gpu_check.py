"""bench/gpu_check.sh's dry run (``--cpu --tiny``): the GPU check's code path, on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

from megatron_lite.config import load_config
from megatron_lite.devices import DEVICES
from megatron_lite.plan import count_parameters
from megatron_lite.training.metrics import model_flops_per_step

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_check import TINY  # noqa: E402

ROW = re.compile(r"^124m\s+(\S+)\s+([\d.]+)M\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+n/a\s+"
                 r"([\d.]+)\s+([\d.]+)$")


def test_dry_run_trains_every_variant_and_times_the_tp2_allreduce():
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--cpu", "--tiny",
                          "--configs", "124m", "--warmup", "1", "--steps", "2"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [m.groups() for m in map(ROW.match, out.stdout.splitlines()) if m]
    assert [r[0] for r in rows] == ["eager", "compile", "eager+ckpt", "compile+ckpt"], out.stdout
    cfg = load_config(ROOT / "configs/gpt2/124m.yaml", TINY)
    params = count_parameters(cfg, 1)["total"]  # the planner's count, not the model's
    for _, m_params, mb, step_s, tps, mfu, _, _ in rows:
        assert float(m_params) == round(params / 1e6, 1)
        assert int(mb) == 2
        # tokens/s is the micro-batch's 2 x 64 tokens over the step (printed rounded)
        assert abs(int(tps) - 128 / float(step_s)) <= 1 + 128 / float(step_s) * 0.02
        flops = model_flops_per_step(cfg.model, 2, 64)
        assert abs(float(mfu) - flops / float(step_s) / DEVICES["cpu"].bf16) <= 0.006
    share = re.search(r"\[2, 64, 64\]\s+0\.0 MiB:\s+([\d.]+) ms; x 8 per step", out.stdout)
    assert share and float(share.group(1)) > 0, out.stdout
    assert "gpu_check: 4 rows" in out.stdout


def test_without_cuda_it_says_how_to_dry_run():
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "gpu_check: no CUDA device; use --cpu --tiny for the dry run"
