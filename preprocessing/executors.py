"""Run the stages of :mod:`preprocessing.stages` on HF datatrove's executors: :func:`run`
is what ``python -m preprocessing`` does with its options.

Only datatrove's executors are used (not its MinHash steps): each stage is a pipeline of
one callable, run as ``tasks`` tasks by ``LocalPipelineExecutor`` (processes on this
machine) or ``SlurmPipelineExecutor`` (one job array per stage, each ``afterok`` the
previous one). Both skip tasks that completed in an earlier run, so rerunning the same
command after a kill continues; our tasks are idempotent, so a task killed after writing
its folder but before datatrove marked it done is simply redone.

The work folder (claimed by :func:`preprocessing.plan.make_plan`) holds the stages' data
(``KEY/STAGE/TASK/``), datatrove's logs and completion marks (``logs/KEY/STAGE/``) and
``options.json``: a rerun with other inputs or options on the same folder is refused (it
would mix two runs). After a successful finalize the stages' data and completion marks
are deleted (:func:`preprocessing.plan.cleanup`); the logs stay.

Tested with datatrove 0.10.1 (pinned in pyproject.toml): :func:`_quiet_datatrove`
replaces its per-task console logger, the one internal it touches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from multiprocess.forkserver import set_forkserver_preload

from preprocessing import lifeline, stages
from preprocessing.plan import (
    Options,
    Plan,
    cleanup,
    lock_work,
    logs_dir,
    make_plan,
    stage_list,
)
from preprocessing.readers import InputError

SLURM_DEFAULTS = {"partition": None, "time": "24:00:00", "cpus_per_task": 1,
                  "mem_per_cpu_gb": 2, "qos": None, "sbatch_args": {}}


def _quiet_datatrove() -> None:
    """datatrove logs every task's progress to the console; keep that in its task log
    files (``logs/.../logs/task_N.log``) and show only warnings on the console."""
    import datatrove.executor.base as base
    import datatrove.utils.logging as dlog
    from loguru import logger

    if getattr(base, "_megatron_lite_quiet", False):
        return

    def add_task_logger(logging_dir, rank, local_rank=0, node_rank=-1):
        logger.remove()
        logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
        logger.add(logfile, level="DEBUG",
                   format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {message}")
        logger.add(sys.stderr, level="CRITICAL")  # errors reach the user through the driver
        return logfile

    def setup_default_logger():
        logger.remove()
        logger.add(sys.stderr, level="WARNING")

    base.add_task_logger = add_task_logger
    dlog.setup_default_logger = setup_default_logger
    base._megatron_lite_quiet = True
    setup_default_logger()


class _Step:
    """One stage as a datatrove pipeline step: ``step(data, rank, world_size)``."""

    def __init__(self, plan: Plan, key: str | None, stage: str):
        self.plan, self.key, self.stage = plan, key, stage

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        stages.run_task(self.plan, self.key, self.stage, rank, world_size)
        return data

    def __repr__(self) -> str:
        return f"megatron-lite preprocessing: {self.stage}" + (f" ({self.key})" if self.key else "")


class _QuietLocal(LocalPipelineExecutor):
    """datatrove's local executor, with task logs kept out of the console in its worker
    processes too."""

    def _run_for_rank(self, rank, local_rank=0, node_rank=-1):
        _quiet_datatrove()
        return super()._run_for_rank(rank, local_rank, node_rank)


# --------------------------------------------------------------------------- running

def run(opts: Options) -> list[dict]:
    """Run the pipeline for every JSON key; returns the stats of each (none when the
    stages were submitted to SLURM and run later). The work folder is locked for the
    while (:func:`preprocessing.plan.lock_work`): one run per folder."""
    lock = lock_work(opts)
    try:
        return _run(opts)
    finally:
        lock.release()


def _run(opts: Options) -> list[dict]:
    plan, continued, ours = make_plan(opts)
    if opts.executor == "slurm":
        submit_slurm(plan, opts)
        return []
    say = print if opts.executor and opts.progress else (lambda *a, **k: None)
    if continued and opts.progress:
        print(f"continuing the work in {plan.work}", file=sys.stderr)
    try:
        run_stages(plan, say)
        results = stages.finalize(plan)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"rerun the same command to continue from {plan.work}") \
            from None
    except InputError:  # the input itself: a rerun would fail the same way
        if ours:
            shutil.rmtree(plan.work, ignore_errors=True)
        raise
    cleanup(plan)
    if ours:
        shutil.rmtree(plan.work, ignore_errors=True)
    return results


def run_stages(plan: Plan, say=print) -> None:
    """Every stage but finalize on this machine, each as one LocalPipelineExecutor run
    (``plan.opts.workers`` tasks at once with --executor local, else one). Its helper
    processes (task processes, datatrove's Manager) die with this one
    (:mod:`preprocessing.lifeline`)."""
    _quiet_datatrove()
    lifeline.install()  # datatrove's Manager is forked from this process
    set_forkserver_preload(["__main__", "preprocessing.forkserver_preload"])
    before = {k: os.environ.get(k) for k in (lifeline.ENV, "PYTHONWARNINGS")}
    os.environ[lifeline.ENV] = str(os.getpid())
    # after a kill -9 the resource tracker would report the dead run's semaphores
    os.environ["PYTHONWARNINGS"] = ",".join(
        w for w in (before["PYTHONWARNINGS"], "ignore:resource_tracker:UserWarning") if w)
    try:
        _run_stages(plan, say)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_stages(plan: Plan, say) -> None:
    workers = plan.opts.workers if plan.opts.executor else 1
    for key, stage, tasks in stage_list(plan)[:-1]:
        t0 = time.monotonic()
        executor = _QuietLocal(pipeline=[_Step(plan, key, stage)], tasks=tasks,
                         workers=max(1, min(workers, tasks)),
                         logging_dir=logs_dir(plan, key, stage), skip_completed=True)
        before = tasks - len(executor.get_incomplete_ranks())
        executor.run()
        say(progress_line(plan, key, stage, tasks, before, time.monotonic() - t0))


def progress_line(plan: Plan, key: str, stage: str, tasks: int, before: int,
                  seconds: float) -> str:
    st = stages.task_stats(plan, key, stage)
    head = f"{key}: {stage} {len(st) if stage != 'components' else 1}/{tasks} tasks" + \
        (f" ({before} done earlier)" if before else "")
    if stage == "prepare":
        mb = sum(s["bytes_read"] for s in st) / 2**20
        # a rate only when every task ran now: tasks done earlier add bytes, not seconds
        rate = f" at {mb / max(seconds, 1e-9):.1f} MB/s" if not before else ""
        what = (f"{sum(s['documents_read'] for s in st)} documents, "
                f"{sum(s['stored'] for s in st)} kept by length, {mb:.1f} MB{rate}")
    elif stage == "candidates":
        what = (f"{sum(s['pairs'] for s in st)} candidate pairs, "
                f"{sum(s['identical'] for s in st)} identical-set links, largest bucket "
                f"{max((s['largest_bucket'] for s in st), default=0)}")
    elif stage == "verify":
        what = (f"{sum(s['checked'] for s in st)} pairs checked, "
                f"{sum(s['confirmed'] for s in st)} at Jaccard >= {plan.opts.dedup_threshold}")
    elif stage == "components":
        c = json.loads((plan.dir(key, "components") / "stats.json").read_text())
        what = (f"{c['duplicates_removed']} near-duplicates in {c['duplicate_clusters']} "
                f"clusters of {c['documents']} documents")
    else:
        what = f"{sum(s['documents'] for s in st)} documents kept"
    return f"{head}, {what} ({seconds:.1f}s)"


def submit_slurm(plan: Plan, opts: Options) -> None:
    """One job array per stage, each depending on the previous (afterok); prints the job
    ids. The outputs appear when the finalize job ends."""
    cfg = {**SLURM_DEFAULTS, **{k: v for k, v in opts.slurm.items() if v is not None}}
    if not cfg["partition"]:
        raise InputError("--executor slurm needs --slurm-partition")
    bin_dir = Path(sys.executable).parent
    _quiet_datatrove()
    chain, prev = [], None
    for key, stage, tasks in stage_list(plan):
        prev = SlurmPipelineExecutor(
            pipeline=[_Step(plan, key, stage)], tasks=tasks, time=cfg["time"],
            partition=cfg["partition"], cpus_per_task=cfg["cpus_per_task"],
            mem_per_cpu_gb=cfg["mem_per_cpu_gb"], qos=cfg["qos"] or "",
            job_name=f"preprocess-{stage}", logging_dir=logs_dir(plan, key, stage),
            depends=prev, skip_completed=stage != "finalize", mail_type="NONE",
            env_command=f'export PATH="{bin_dir}:$PATH"', sbatch_args=cfg["sbatch_args"])
        chain.append((key, stage, tasks, prev))
    try:
        chain[-1][3].run()  # launches the whole chain, dependencies first
    except FileNotFoundError:
        raise InputError("--executor slurm: sbatch is not on PATH (run this on a SLURM "
                         "submit host)") from None
    except subprocess.CalledProcessError as err:
        submitted = [f"{s} job {ex.job_id}" for _, s, _, ex in chain if ex.job_id not in (None, -1)]
        raise InputError(f"sbatch failed (exit {err.returncode}; its message is above)"
                         + (f" after submitting {', '.join(submitted)}" if submitted else "")
                         ) from None
    ids = []
    for key, stage, tasks, ex in chain:
        name = f"{key}: {stage}" if key else stage
        if ex.job_id in (None, -1):
            print(f"{name}: {tasks} tasks already done")
        else:
            ids.append(str(ex.job_id))
            print(f"{name}: job {ex.job_id} ({tasks} task{'s' if tasks > 1 else ''})")
    outputs = ", ".join(f"{plan.final_prefix(k)}.bin/.idx" for k in opts.json_keys)
    print(f"submitted; follow with: squeue -j {','.join(ids)}; logs under {plan.work}/logs; "
          f"{outputs} appear when job {chain[-1][3].job_id} (finalize) ends")
