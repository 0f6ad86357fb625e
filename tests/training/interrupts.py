"""A signal to a running 2-process torchrun job, as a terminal (Ctrl-C) or a batch system
(SIGTERM) sends it: to torchrun and its workers at once, mid-run however fast the machine
trains; then the rerun of the same command and an uninterrupted reference run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rows(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per logged step."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def torchrun(args: list[str], **kw) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node 2 -m megatron_lite.train ARGS``, output piped."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "megatron_lite.train", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, **kw)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's workers)."""
    kids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:  # gone meanwhile
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def freeze_mid_run(proc: subprocess.Popen, workers, metrics: Path, steps: int) -> list[int]:
    """Wait for 3 metric lines, then SIGSTOP ``workers()`` (the training processes) and
    return their pids. A signal sent while they are stopped is handled when they continue,
    so it lands mid-run however fast the machine trains."""
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.002)
    pids = workers()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    logged = len(metrics.read_text().splitlines())
    # the step under way may still finish; the one after it checks for the signal
    assert logged <= steps - 2, f"{logged} of {steps} steps before the processes stopped"
    return pids


def interrupt_rerun_and_reference(args: list[str], run: Path, reference: Path, sig: int,
                                  steps: int) -> str:
    """Run the 2-process job ``args`` (training ``steps`` steps into ``run``) in its own
    process group and send ``sig`` to the group mid-run; check that it stopped in one line
    (``interrupted at step N``) with step N's checkpoint and the metrics of steps 1..N;
    rerun ``args`` (it must resume at N and finish) and run ``args`` into ``reference``
    without a signal. Returns the interrupted job's output; compare ``rows(run)`` with
    ``rows(reference)``."""
    proc = torchrun(args, start_new_session=True)  # its own process group, like a terminal's
    workers = freeze_mid_run(proc, lambda: children(proc.pid), run / "metrics.jsonl", steps)
    assert len(workers) == 2
    os.killpg(proc.pid, sig)  # torchrun forwards it too, to workers still stopped
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    out = proc.communicate(timeout=120)[0]
    lines = [x for x in out.splitlines() if x.startswith("interrupted at step")]
    assert len(lines) == 1, out
    stopped = int(lines[0].split()[3])
    assert 3 <= stopped < steps
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    assert [r["step"] for r in rows(run)] == list(range(1, stopped + 1))

    resumed = torchrun(args)
    again = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, again
    assert f"resumed from {run} at step {stopped}" in again
    straight = torchrun([a.replace(str(run), str(reference)) for a in args])
    ref = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, ref
    assert [r["step"] for r in rows(run)] == list(range(1, steps + 1))
    return out
