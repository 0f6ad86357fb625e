"""``python -m preprocessing``: raw text to Megatron-compatible indexed shards.

Flags follow Megatron-LM's ``tools/preprocess_data.py`` so a Megatron user's habits
carry over; see ``--help``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from megatron_lite.data.indexed import IndexedDataError
from megatron_lite.data.tokenizer import TOKENIZER_TYPES, TokenizerError
from megatron_lite.files import FolderInUse
from preprocessing.executors import run
from preprocessing.plan import Options
from preprocessing.readers import TXT_DOCS, InputError
from preprocessing.stages import summary_line


def parse_args(argv=None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m preprocessing",
        description="Filter, near-dedup and tokenize documents into Megatron .bin/.idx shards.")
    p.add_argument("--input", nargs="+", required=True,
                   help="files (.jsonl .jsonl.gz .json .parquet .txt) or folders of them")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX_{key}_document.bin/.idx and PREFIX.stats.json "
                        "(PREFIX_{key}.stats.json per key when --json-keys names several)")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--tokenizer-model")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="field(s) holding the text (parquet: column names)")
    p.add_argument("--txt-docs", choices=TXT_DOCS, default="file",
                   help=".txt input: one document per file (default) or per blank-line block")
    p.add_argument("--append-eod", action="store_true", help="end each document with EOD")
    p.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (for BERT): PREFIX_{key}_sentence")
    p.add_argument("--min-tokens", type=int, default=128,
                   help="drop documents with fewer tokens (default 128, as Megatron)")
    p.add_argument("--dedup-threshold", type=float, default=0.7,
                   help="Jaccard similarity of word 5-grams at which documents are duplicates")
    p.add_argument("--no-dedup", action="store_true", help="skip near-duplicate removal")
    p.add_argument("--write-duplicates", action="store_true",
                   help="also write PREFIX_{key}_document.duplicates.jsonl (kept -> removed)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes on this machine: tokenizers (no --executor) or tasks at "
                        "once (--executor local)")
    p.add_argument("--max-bucket", type=int, default=5000,
                   help="most different documents one LSH bucket may hold (default 5000)")
    g = p.add_argument_group(
        "sharded stages (datatrove executors)",
        "prepare, candidates, verify, components, write, finalize as tasks; same output "
        "bytes as without --executor; a rerun continues from the completed tasks")
    g.add_argument("--executor", choices=["local", "slurm"],
                   help="run the stages as datatrove tasks on this machine or as SLURM job "
                        "arrays (default: one task per stage in this process)")
    g.add_argument("--tasks", type=int,
                   help="shards, and tasks per stage (default: one per input file, <= 512)")
    g.add_argument("--work-dir",
                   help="intermediate files, logs and completion marks (default: "
                        "PREFIX.work; without --executor a hidden folder deleted at the end)")
    g.add_argument("--slurm-partition")
    g.add_argument("--slurm-time", help="time limit of each task (default 24:00:00)")
    g.add_argument("--slurm-cpus-per-task", type=int)
    g.add_argument("--slurm-mem-per-cpu-gb", type=int, help="default 2")
    g.add_argument("--slurm-qos")
    p.add_argument("--strict", action="store_true", help="malformed input is an error")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if not 0.0 < a.dedup_threshold <= 1.0:
        p.error(f"--dedup-threshold {a.dedup_threshold} must be in (0, 1]")
    if a.workers < 1 or a.min_tokens < 0 or a.max_bucket < 2:
        p.error("--workers must be >= 1, --min-tokens >= 0 and --max-bucket >= 2")
    if a.tasks is not None and a.tasks < 1:
        p.error("--tasks must be >= 1")
    if a.tasks is not None and a.executor is None:
        p.error("--tasks needs --executor local or slurm")
    if a.executor == "slurm" and not a.slurm_partition:
        p.error("--executor slurm needs --slurm-partition")
    return Options(
        inputs=a.input, output_prefix=a.output_prefix, tokenizer_type=a.tokenizer_type,
        vocab_file=a.vocab_file, merge_file=a.merge_file, tokenizer_model=a.tokenizer_model,
        json_keys=a.json_keys, txt_docs=a.txt_docs, append_eod=a.append_eod,
        split_sentences=a.split_sentences,
        min_tokens=a.min_tokens, dedup_threshold=a.dedup_threshold, dedup=not a.no_dedup,
        workers=a.workers, strict=a.strict, write_duplicates=a.write_duplicates,
        progress=not a.quiet, max_bucket=a.max_bucket, executor=a.executor, tasks=a.tasks,
        work_dir=a.work_dir,
        slurm={"partition": a.slurm_partition, "time": a.slurm_time,
               "cpus_per_task": a.slurm_cpus_per_task, "mem_per_cpu_gb": a.slurm_mem_per_cpu_gb,
               "qos": a.slurm_qos})


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    opts = parse_args(argv)
    # SIGTERM (kill, a scheduler) stops the run as Ctrl-C does: its helper processes are
    # stopped and one line says so (a SIGKILL cannot be answered: they die with it,
    # preprocessing.lifeline)
    previous = signal.signal(signal.SIGTERM, _stop) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        for s in run(opts):
            print(summary_line(s))
            if s["first_errors"]:
                print(f"warning: skipped input, first at {s['first_errors'][0]}", file=sys.stderr)
    except (InputError, TokenizerError, IndexedDataError, FolderInUse) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk while writing (the partial output is removed)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"interrupted: no output written{f'; {err}' if str(err) else ''}",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
