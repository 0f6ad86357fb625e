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

from megatron_lite.data.tokenizer import build_tokenizer
from tests.training.conftest import gpt_shard, tiny_overrides  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
# NOTE: a SLURM cluster per test and jobs through its queue: `make test-slow` (and `make
# slurm-test`) run these, `make test` does not
pytestmark = pytest.mark.slow
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


def _memory_mb() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)


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
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_memory_mb()} State=UNKNOWN
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
        deadline = time.monotonic() + 20  # gone before the next test starts its own
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def _wait(job: str, env: dict, log: Path, timeout: float = 300) -> str:
    """Wait until ``job`` has left the queue; returns its output file's text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                                text=True).stdout.strip()
        if not queued:
            return log.read_text() if log.exists() else "(no output file)"
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} did not finish in {timeout} s:\n"
                f"{log.read_text() if log.exists() else ''}")


def _steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    return [json.loads(x)["step"] for x in metrics.read_text().splitlines()] \
        if metrics.exists() else []


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
    output = _wait(job, env, log)
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6], output
    assert "2 tasks" in output and "done:" in output
    assert (run_dir / "checkpoints" / "latest").exists()
    print(f"SLURM job {job}: 2 tasks, 6 steps, {time.monotonic() - start:.1f}s from sbatch")


TINY = {"model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4,
        "model.max_position_embeddings": 64, "model.make_vocab_size_divisible_by": 8,
        "model.activation_checkpointing": "none", "train.micro_batch_size": 2,
        "train.global_batch_size": 4, "train.log_interval": 1, "train.eval_interval": 0,
        "train.save_interval": 0, "train.precision": "fp32", "optim.warmup_steps": 1,
        "log.tensorboard": False, "parallel.tensor_parallel_size": 2}


@pytest.mark.parametrize("script", ["bert-large", "gpt2-1.5b", "gpt2-8.3b-pp"])
def test_example_scripts_run_as_written_from_another_directory(
        slurm_cluster, gpt_shard, bpe_files, sentence_shard, wordpiece_file,  # noqa: F811
        tmp_path, script):
    """The example scripts as a user runs them: from their own directory (not the
    project's), with relative data paths, on CPU tasks instead of GPUs; the shipped config
    is shrunk by OVERRIDES only."""
    elsewhere = tmp_path / "work"
    (elsewhere / "data").mkdir(parents=True)
    if script == "bert-large":
        shard, files = sentence_shard, {"VOCAB": wordpiece_file}
        tiny = {**TINY, "model.seq_length": 32, "train.phase2_seq_length": 64,
                "train.max_steps": 4, "train.phase2_start": 0.5}
    else:
        shard, files = gpt_shard, {"VOCAB": bpe_files[0], "MERGES": bpe_files[1]}
        tiny = {**TINY, "model.seq_length": 32, "train.max_steps": 4}
        if script == "gpt2-8.3b-pp":  # its 2 tasks as 2 pipeline stages (TP=8 needs GPUs)
            tiny.update({"parallel.tensor_parallel_size": 1,
                         "parallel.pipeline_parallel_size": 2})
    tokenizer = build_tokenizer("BertWordPieceLowerCase" if script == "bert-large"
                                else "GPT2BPETokenizer", *map(str, files.values()))
    tiny["model.vocab_size"] = tokenizer.vocab_size  # the shipped configs name the real one
    for suffix in (".bin", ".idx"):
        (elsewhere / "data" / f"c{suffix}").symlink_to(f"{shard}{suffix}")
    env = dict(slurm_cluster, DATA="data/c", NODES="1", GPUS_PER_NODE="0", TASKS_PER_NODE="2",
               PYTHON=str(ROOT / ".venv/bin/python"), RUN_DIR="runs/example",
               OVERRIDES=" ".join(f"{k}={v}" for k, v in tiny.items()),
               **{k: str(v) for k, v in files.items()})
    env.pop("MEGATRON_LITE_ROOT", None)
    out = subprocess.run(["bash", str(ROOT / "launch/slurm" / f"{script}.sh"),
                          "--parsable", "--cpus-per-task=1", "--output=slurm.out"],
                         env=env, capture_output=True, text=True, cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    output = _wait(out.stdout.strip(), slurm_cluster, elsewhere / "slurm.out")
    run_dir = elsewhere / "runs" / "example"
    assert _steps(run_dir) == [1, 2, 3, 4], output
    saved = (run_dir / "config.yaml").read_text()
    assert f"data_path: {elsewhere}/data/c" in saved  # absolute: later commands work anywhere
    if script == "bert-large":
        assert "BERT phase 2 from step 2" in output


def test_sigusr1_before_the_time_limit_saves_requeues_and_resumes(
        slurm_cluster, gpt_shard, bpe_files, tmp_path):  # noqa: F811
    """SLURM's --signal=B:USR1@120 warning, sent by hand: every rank saves and exits, the
    script requeues the job, and the requeued job resumes to the end; no step repeats."""
    run_dir = tmp_path / "run"
    steps = 400
    overrides = [o for o in tiny_overrides(gpt_shard, bpe_files, run_dir, **{
        "parallel.tensor_parallel_size": 2, "train.max_steps": steps, "train.eval_interval": 0,
        "train.log_interval": 1, "train.global_batch_size": 2}) if "run_dir" not in o]
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  arch: gpt\n")
    log = tmp_path / "slurm.out"
    env = dict(slurm_cluster, OVERRIDES=" ".join(overrides))
    export = ",".join(["ALL", f"CONFIG={config}", f"RUN_DIR={run_dir}"])
    job = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
         f"--output={log}",
         f"--export={export}", str(ROOT / "launch/slurm/train.sbatch")],
        env=env, capture_output=True, text=True, cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    job = job.stdout.strip()
    deadline = time.monotonic() + 120
    while len(_steps(run_dir)) < 3:
        assert time.monotonic() < deadline, log.read_text() if log.exists() else ""
        time.sleep(0.05)
    # what --signal=B:USR1@120 does: the batch script gets it, and forwards it
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    output = _wait(job, env, log, timeout=600)
    assert "requeueing job" in output and "interrupted at step" in output, output
    stopped = int(output.split("interrupted at step ")[1].split()[0])
    assert f"resumed from {run_dir} at step {stopped}" in output, output
    assert _steps(run_dir) == list(range(1, steps + 1)), output


def test_sharded_preprocessing_as_slurm_job_arrays(slurm_cluster, bpe_files, stdlib_docs,
                                                   tmp_path, monkeypatch, capsys):
    """`python -m preprocessing --executor slurm`: one job array per stage (2 tasks each)
    chained by afterok; the finalize job's outputs are byte-identical to the local path's."""
    from preprocessing.__main__ import main
    from tests.conftest import mutate
    from tests.preprocessing.test_pipeline import _args

    files = []
    for i in range(2):  # near-duplicates that span the two shards
        files.append(tmp_path / f"part{i}.jsonl")
        texts = stdlib_docs[i * 20:(i + 1) * 20] + [mutate(stdlib_docs[k], 0.01, k)
                                                   for k in range(i * 5, i * 5 + 5)]
        files[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for k, v in slurm_cluster.items():
        monkeypatch.setenv(k, v)
    argv = _args(tmp_path, files, bpe_files, "--executor", "slurm", "--tasks", "2",
                 "--slurm-partition", "debug", "--slurm-time", "10:00",
                 "--slurm-mem-per-cpu-gb", "1", "--write-duplicates", prefix="slurm")
    start = time.monotonic()
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    with capsys.disabled():
        print(f"\n{out}{captured.err}")
    final = out.split("appear when job ")[1].split()[0]
    assert "prepare: job" in out and "(2 tasks)" in out, out
    logs = tmp_path / "slurm.work" / "logs" / "all" / "finalize" / "slurm_logs"
    deadline = time.monotonic() + 300
    while subprocess.run(["squeue", "-h"], env=slurm_cluster, capture_output=True,
                         text=True).stdout.strip():
        assert time.monotonic() < deadline, subprocess.run(
            ["squeue"], env=slurm_cluster, capture_output=True, text=True).stdout
        time.sleep(1)
    output = "\n".join(p.read_text() for p in logs.glob("*.out")) if logs.exists() else ""
    assert (tmp_path / "slurm_text_document.idx").exists(), (final, output, sorted(
        str(p) for p in (tmp_path / "slurm.work").rglob("*.out")))
    assert main(_args(tmp_path, files, bpe_files, "--write-duplicates", prefix="local")) == 0
    for ext in ("bin", "idx", "duplicates.jsonl"):
        assert (tmp_path / f"slurm_text_document.{ext}").read_bytes() == \
            (tmp_path / f"local_text_document.{ext}").read_bytes().replace(b"local", b"slurm")
    stats = [json.loads((tmp_path / f"{p}.stats.json").read_text()) for p in ("slurm", "local")]
    assert stats[0]["duplicates_removed"] == stats[1]["duplicates_removed"] == 10
    assert "slurm_text_document: " in output
    print(f"SLURM preprocessing: 6 stages x 2 tasks, {time.monotonic() - start:.1f}s")
