"""The project's sbatch script on a real one-node SLURM cluster started here.

SLURM is installed (Debian's slurm-wlm + munge) only under CI (CI=true) or through
`make slurm-test` (MEGATRON_LITE_SLURM_TEST=1); a user's `make test` never installs
system packages: it skips with the reason. The daemons run with a minimal config in a
temporary folder on 127.0.0.1 and are stopped by their PIDs at the end.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.training.conftest import gpt_shard, tiny_overrides  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = os.environ.get("CI") == "true" or os.environ.get("MEGATRON_LITE_SLURM_TEST") == "1"


def _ensure_slurm() -> None:
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return
    if not ALLOWED:
        pytest.skip("SLURM is not installed; `make slurm-test` (or CI=true) installs "
                    "slurm-wlm and munge and runs this test")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("installing SLURM needs root and apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True,
                   env=env, capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid(path: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().strip())
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not appear")


@pytest.fixture
def slurm_cluster(tmp_path):
    _ensure_slurm()
    host = socket.gethostname()
    state, spool = tmp_path / "state", tmp_path / "spool"
    state.mkdir()
    spool.mkdir()
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"""ClusterName=mltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={tmp_path}/slurmctld.pid
SlurmdPidFile={tmp_path}/slurmd.pid
SlurmctldLogFile={tmp_path}/slurmctld.log
SlurmdLogFile={tmp_path}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    pids = []
    try:
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        munge_pid = run_dir / "munged.pid"
        if not (munge_pid.exists() and Path(f"/proc/{munge_pid.read_text().strip()}").exists()):
            munge_pid.unlink(missing_ok=True)
            subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
            pids.append(_pid(munge_pid))
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
        pids.append(_pid(tmp_path / "slurmctld.pid"))
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
        pids.append(_pid(tmp_path / "slurmd.pid"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                 text=True).stdout.strip()
            if out in ("idle", "mixed"):
                break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"node never became idle:\n{(tmp_path / 'slurmd.log').read_text()}")
        yield env
    finally:
        for pid in reversed(pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_sbatch_script_trains_tiny_gpt(slurm_cluster, gpt_shard, bpe_files, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(gpt_shard, bpe_files, run_dir,
                               **{"parallel.tensor_parallel_size": 2, "train.max_steps": 6,
                                  "train.eval_interval": 3})
    overrides = [o for o in overrides if not o.startswith("train.run_dir")]
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  arch: gpt\n")
    log = tmp_path / "slurm.out"
    export = ",".join(["ALL", f"CONFIG={config}", f"RUN_DIR={run_dir}",
                       f"PYTHON={ROOT / '.venv/bin/python'}"])
    env = dict(slurm_cluster, OVERRIDES=" ".join(overrides))
    start = time.monotonic()
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
         "--cpus-per-task=1", f"--output={log}", f"--export={export}",
         str(ROOT / "launch/slurm/train.sbatch")],
        check=True, env=env, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                                text=True).stdout.strip()
        if not queued:
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job], env=env)
        pytest.fail(f"job {job} did not finish in 300 s:\n{log.read_text()}")
    output = log.read_text() if log.exists() else "(no output file)"
    metrics = run_dir / "metrics.jsonl"
    assert metrics.exists(), output
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], output
    assert "2 tasks" in output and "done:" in output
    assert (run_dir / "checkpoints" / "latest").exists()
    print(f"SLURM job {job}: 2 tasks, 6 steps, {time.monotonic() - start:.1f}s from sbatch")
