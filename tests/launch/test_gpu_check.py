"""bench/gpu_check.sh's dry run (``--cpu --tiny``): the GPU check's code path, on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite.config import load_config
from megatron_lite.devices import DEVICES
from megatron_lite.plan import count_parameters
from megatron_lite.training.metrics import model_flops_per_step

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_check import TINY, format_row  # noqa: E402

ROW = re.compile(r"^124m\s+(\S+)\s+([\d.]+)M\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+n/a\s+"
                 r"([\d.]+)\s+([\d.]+)$")


def check_row_arithmetic(step_s: float, tps: int, mfu: float, flops: float) -> None:
    """tokens/s and MFU recompute from the printed step time (4 significant digits, so at
    most 0.05 % off) within their own printed rounding."""
    expected_tps = 128 / step_s  # the micro-batch's 2 x 64 tokens over the step
    assert abs(tps - expected_tps) <= 1 + expected_tps * 1e-3
    expected_mfu = flops / step_s / DEVICES["cpu"].bf16
    assert abs(mfu - expected_mfu) <= 0.005 + expected_mfu * 1e-3


@pytest.mark.parametrize("step_s", [3e-5, 9.1234e-4, 0.0091234, 0.0094999, 0.5, 12.3456])
def test_printed_row_recomputes_at_any_step_time(step_s):
    """A fake step of any speed: the printed figures agree with each other (a step time
    rounded to 0.001 s had made a 9 ms step's tokens/s look 5 % off)."""
    flops = 1.7e9
    r = {"params": 124.4e6, "step_s": step_s, "tokens_per_s": 128 / step_s,
         "mfu": flops / step_s / DEVICES["cpu"].bf16, "peak_gib": None, "planned_gib": 1.0,
         "warmup_s": 3.0}
    m = ROW.match(format_row("124m", "eager", 2, r))
    assert m, format_row("124m", "eager", 2, r)
    _, _, _, printed_ms, tps, mfu, _, _ = m.groups()
    assert abs(float(printed_ms) / 1e3 - step_s) <= step_s * 5e-4
    check_row_arithmetic(float(printed_ms) / 1e3, int(tps), float(mfu), flops)


@pytest.mark.slow  # a subprocess that trains 5 variants, 2 of them compiled, and a TP=2 pair
def test_dry_run_trains_every_variant_and_times_the_tp2_allreduce():
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--cpu", "--tiny",
                          "--configs", "124m", "--warmup", "1", "--steps", "2"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [m.groups() for m in map(ROW.match, out.stdout.splitlines()) if m]
    assert [r[0] for r in rows] == ["eager", "compile", "eager+ckpt", "compile+ckpt",
                                    "eager+distopt"], out.stdout
    cfg = load_config(ROOT / "configs/gpt2/124m.yaml", TINY)
    params = count_parameters(cfg, 1)["total"]  # the planner's count, not the model's
    for _, m_params, mb, step_s, tps, mfu, _, _ in rows:
        assert float(m_params) == round(params / 1e6, 1)
        assert int(mb) == 2
        check_row_arithmetic(float(step_s) / 1e3, int(tps), float(mfu),
                             model_flops_per_step(cfg.model, 2, 64))
    share = re.search(r"\[2, 64, 64\]\s+0\.0 MiB:\s+([\d.]+) ms; x 8 per step", out.stdout)
    assert share and float(share.group(1)) > 0, out.stdout
    assert "gpu_check: 5 rows" in out.stdout


def test_without_cuda_it_says_how_to_dry_run():
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "gpu_check: no CUDA device; use --cpu --tiny for the dry run"
