"""Run the stages of :mod:`preprocessing.stages` on HF datatrove's executors.

Only datatrove's executors are used (not its MinHash steps): each stage is a pipeline of
one callable, run as ``tasks`` tasks by ``LocalPipelineExecutor`` (processes on this
machine) or ``SlurmPipelineExecutor`` (one job array per stage, each ``afterok`` the
previous one). Both skip tasks that completed in an earlier run, so rerunning the same
command after a kill continues; our tasks are idempotent, so a task killed after writing
its folder but before datatrove marked it done is simply redone.

The work folder holds the stages' data (``KEY/STAGE/TASK/``), datatrove's logs and
completion marks (``logs/KEY/STAGE/``) and ``options.json``: a rerun with other inputs or
options on the same folder is refused (it would mix two runs). After a successful
finalize the stages' data and completion marks are deleted; the logs stay.

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

from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.files import atomic_write
from preprocessing import stages
from preprocessing.readers import InputError, expand_inputs
from preprocessing.stages import Plan

MAX_DEFAULT_TASKS = 512
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


# --------------------------------------------------------------------------- the plan

def _file_id(path) -> list:
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def _fingerprint(opts, files: list[Path], recipe: dict, shards: int) -> dict:
    tokenizer = {k: _file_id(v) if isinstance(v, str) and os.path.isfile(v) else v
                 for k, v in sorted(recipe.items())}
    return {"files": [_file_id(f) for f in files], "tokenizer": tokenizer, "shards": shards,
            **{k: getattr(opts, k) for k in (
                "output_prefix", "json_keys", "txt_docs", "append_eod", "split_sentences",
                "min_tokens", "dedup_threshold", "dedup", "write_duplicates", "strict",
                "max_bucket")}}


def _work_dir(opts) -> tuple[Path, bool]:
    """The work folder and whether it is the hidden default one (ours to delete)."""
    if opts.work_dir:
        return Path(opts.work_dir).resolve(), False
    prefix = Path(opts.output_prefix).resolve()
    if opts.executor is None:
        return prefix.with_name(f".{prefix.name}.work"), True
    return prefix.with_name(f"{prefix.name}.work"), False


def _claim(work: Path, fingerprint: dict, ours: bool) -> bool:
    """Create or reuse ``work``; returns whether earlier work is continued."""
    marker = work / "options.json"
    if marker.exists():
        if json.loads(marker.read_text()) == fingerprint:
            return any((work / k).exists() for k in fingerprint["json_keys"])
        if not ours:
            raise InputError(f"--work-dir {work} holds a run with other inputs or options "
                             f"({marker}); use another --work-dir or delete it")
        shutil.rmtree(work)
    elif work.is_dir() and any(p.name != "logs" for p in work.iterdir()):
        # not a folder of ours (ours hold options.json, or only logs after a finished run)
        raise InputError(f"--work-dir {work} is not empty and was not made by "
                         "python -m preprocessing; give an empty or new folder")
    work.mkdir(parents=True, exist_ok=True)
    with atomic_write(marker) as f:
        f.write(json.dumps(fingerprint, indent=1) + "\n")
    return False


def make_plan(opts) -> tuple[Plan, bool, bool]:
    """The plan of a run, its work folder claimed; (plan, continued, default work dir)."""
    files = expand_inputs(opts.inputs)
    tok = build_tokenizer(opts.tokenizer_type, opts.vocab_file, opts.merge_file,
                          opts.tokenizer_model)
    if opts.append_eod and tok.eod is None:
        raise InputError(f"--append-eod: {opts.tokenizer_type} has no end-of-document token")
    if opts.executor is None:
        shards = 1
    else:
        shards = opts.tasks or min(len(files), MAX_DEFAULT_TASKS)
    work, ours = _work_dir(opts)
    continued = _claim(work, _fingerprint(opts, files, tok.recipe, shards), ours)
    plan = Plan(opts=opts, files=[str(f.resolve()) for f in files], work=str(work),
                shards=shards, pool_workers=opts.workers if opts.executor is None else 1,
                progress=opts.progress and opts.executor is None, started=time.time())
    return plan, continued, ours


def stage_list(plan: Plan) -> list[tuple[str | None, str, int]]:
    """(key, stage, tasks) in the order they run."""
    out = []
    for key in plan.opts.json_keys:
        out.append((key, "prepare", plan.shards))
        if plan.opts.dedup:
            out += [(key, "candidates", plan.tasks), (key, "verify", plan.tasks),
                    (key, "components", 1), (key, "write", plan.shards)]
    return out + [(None, "finalize", 1)]


def _logs(plan: Plan, key: str | None, stage: str) -> str:
    return str(Path(plan.work) / "logs" / (key or "all") / stage)


def cleanup(plan: Plan) -> None:
    """After a successful finalize: drop the completion marks, the options and then the
    stages' data (in that order, so a kill half-way leaves a folder a rerun redoes, never
    marks without their data); keep the logs."""
    work = Path(plan.work)
    for key in plan.opts.json_keys:
        for marks in (work / "logs" / key).glob("*/completions"):
            shutil.rmtree(marks, ignore_errors=True)
    (work / "options.json").unlink(missing_ok=True)
    for key in plan.opts.json_keys:
        shutil.rmtree(work / key, ignore_errors=True)


# --------------------------------------------------------------------------- running

def run(opts) -> list[dict]:
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
    (``plan.opts.workers`` tasks at once with --executor local, else one)."""
    _quiet_datatrove()
    workers = plan.opts.workers if plan.opts.executor else 1
    for key, stage, tasks in stage_list(plan)[:-1]:
        t0 = time.monotonic()
        executor = _QuietLocal(pipeline=[_Step(plan, key, stage)], tasks=tasks,
                         workers=max(1, min(workers, tasks)),
                         logging_dir=_logs(plan, key, stage), skip_completed=True)
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
        what = (f"{sum(s['documents_read'] for s in st)} documents, "
                f"{sum(s['stored'] for s in st)} kept by length, {mb:.1f} MB at "
                f"{mb / max(seconds, 1e-9):.1f} MB/s")
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


def submit_slurm(plan: Plan, opts) -> None:
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
            job_name=f"preprocess-{stage}", logging_dir=_logs(plan, key, stage),
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


def finalize_and_report(plan: Plan) -> list[dict]:
    """The finalize stage as a SLURM job runs it: outputs, cleanup, a summary line."""
    results = stages.finalize(plan)
    cleanup(plan)
    for s in results:
        print(summary_line(s))
    return results


def summary_line(s: dict) -> str:
    return (f"{s['output_prefix']}: {s['documents_written']} documents, "
            f"{s['tokens_written']} tokens ({s['documents_read']} read, "
            f"{sum(s['skipped'].values())} skipped, {s['too_short']} too short, "
            f"{s['duplicates_removed']} near-duplicates removed) in {s['seconds']:.1f}s")
