"""What a preprocessing run does and where: its :class:`Options` (the command's flags),
its :class:`Plan` (the input files, the shards, the work folder: what every task is
given) and the work folder's lifecycle.

:func:`make_plan` claims the work folder: it writes ``options.json``, the fingerprint of
the inputs and options, and refuses a folder that holds another run's work (a rerun of the
same command continues it). :func:`cleanup` empties it after a successful finalize.
:func:`stage_list` is the order the stages run in.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.files import FolderLock, atomic_write
from preprocessing.readers import InputError, expand_inputs

MAX_DEFAULT_TASKS = 512


@dataclass
class Options:
    """What ``python -m preprocessing`` was asked to do (its flags)."""

    inputs: list[str]
    output_prefix: str
    tokenizer_type: str
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    txt_docs: str = "file"  # a .txt file is one document, or one per blank-line block
    append_eod: bool = False
    split_sentences: bool = False
    min_tokens: int = 128
    dedup_threshold: float = 0.7
    dedup: bool = True
    workers: int = 1
    strict: bool = False
    write_duplicates: bool = False
    progress: bool = True
    max_bucket: int = 5000  # most different documents one LSH bucket may hold
    executor: str | None = None  # None (this process), "local" or "slurm"
    tasks: int | None = None  # shards (default: one per input file, at most 512)
    work_dir: str | None = None
    slurm: dict = field(default_factory=dict)  # partition, time, cpus_per_task, ...


@dataclass
class Plan:
    """Everything a task needs, picklable (an executor ships it to its workers/jobs)."""

    opts: Options
    files: list[str]
    work: str
    shards: int  # prepare/write tasks, and the tasks of candidates and verify
    pool_workers: int = 1  # tokenizer processes inside one prepare task
    progress: bool = False  # a tqdm bar in the prepare task (single-task runs)
    started: float = 0.0  # time.time() when the run was planned (for stats' seconds)

    @property
    def tasks(self) -> int:
        """Candidates and verify tasks: one per shard."""
        return self.shards

    @property
    def key_ranges(self) -> int:
        """Per band, the candidates' split of the 32-bit key space: one per shard, so a
        candidates item holds about one shard's rows of one band."""
        return self.shards

    def dir(self, key: str, stage: str, task: int | None = None) -> Path:
        path = Path(self.work) / key / stage
        return path if task is None else path / f"{task:05d}"

    def shard_files(self, shard: int) -> list[str]:
        n = len(self.files)
        return self.files[shard * n // self.shards:(shard + 1) * n // self.shards]

    def level(self) -> str:
        return "sentence" if self.opts.split_sentences else "document"

    def final_prefix(self, key: str) -> Path:
        return Path(f"{self.opts.output_prefix}_{key}_{self.level()}")

    def stats_name(self, key: str) -> str:
        base = Path(self.opts.output_prefix).name
        return f"{base}.stats.json" if len(self.opts.json_keys) == 1 else f"{base}_{key}.stats.json"


def _file_id(path) -> list:
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def _fingerprint(opts: Options, files: list[Path], recipe: dict, shards: int) -> dict:
    tokenizer = {k: _file_id(v) if isinstance(v, str) and os.path.isfile(v) else v
                 for k, v in sorted(recipe.items())}
    return {"files": [_file_id(f) for f in files], "tokenizer": tokenizer, "shards": shards,
            **{k: getattr(opts, k) for k in (
                "output_prefix", "json_keys", "txt_docs", "append_eod", "split_sentences",
                "min_tokens", "dedup_threshold", "dedup", "write_duplicates", "strict",
                "max_bucket")}}


def _work_dir(opts: Options) -> tuple[Path, bool]:
    """The work folder and whether it is the hidden default one (ours to delete)."""
    if opts.work_dir:
        return Path(opts.work_dir).resolve(), False
    prefix = Path(opts.output_prefix).resolve()
    if opts.executor is None:
        return prefix.with_name(f".{prefix.name}.work"), True
    return prefix.with_name(f"{prefix.name}.work"), False


def _claim(work: Path, fingerprint: dict, ours: bool) -> bool:
    """Create or reuse ``work`` (its lock already held); returns whether earlier work is
    continued."""
    marker = work / "options.json"
    if marker.exists():
        if json.loads(marker.read_text()) == fingerprint:
            return any((work / k).exists() for k in fingerprint["json_keys"])
        if not ours:
            raise InputError(f"--work-dir {work} holds a run with other inputs or options "
                             f"({marker}); use another --work-dir or delete it")
        for p in work.iterdir():  # all but the lock this run holds
            if p.name != ".lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif work.is_dir() and any(p.name not in ("logs", ".lock") for p in work.iterdir()):
        # not a folder of ours (ours hold options.json, or only logs after a finished run)
        raise InputError(f"--work-dir {work} is not empty and was not made by "
                         "python -m preprocessing; give an empty or new folder")
    work.mkdir(parents=True, exist_ok=True)
    with atomic_write(marker) as f:
        f.write(json.dumps(fingerprint, indent=1) + "\n")
    return False


def lock_work(opts: Options) -> FolderLock:
    """One run per work folder: ``WORK/.lock`` (:class:`megatron_lite.files.FolderLock`),
    taken before anything is written there; a second run with the same
    ``--output-prefix`` (or ``--work-dir``) while the first lives is one error naming it."""
    work, _ = _work_dir(opts)
    what = "--work-dir" if opts.work_dir else "the work folder of --output-prefix"
    lock = FolderLock(work, what)
    lock.acquire(warn=lambda line: print(line, file=sys.stderr, flush=True))
    return lock


def make_plan(opts: Options) -> tuple[Plan, bool, bool]:
    """The plan of a run, its work folder claimed (its lock held: :func:`lock_work`);
    (plan, continued, default work dir)."""
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


def logs_dir(plan: Plan, key: str | None, stage: str) -> str:
    """Where datatrove keeps a stage's logs and completion marks."""
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
