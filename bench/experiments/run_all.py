"""Run every paper experiment (``make results``): docs/results.md and docs/img/ regenerated.

    python bench/experiments/run_all.py [--only NAME ...] [--skip NAME ...] [--force]
    python bench/experiments/run_all.py --quick      # (make results-quick) no training

Each experiment runs in its own process with its default steps and seeds, one after
another (they measure wall time, so never two at once). A progress line before and after
each, then a summary: minutes, exit status and the verdicts it wrote into the contents
table. Resumable: an experiment whose raw numbers (docs/results/NAME.json) exist is
skipped unless ``--force``, and inside an experiment a run that finished is not trained
again. A failed experiment does not stop the others; the exit status is 1 if any failed.
Output of each experiment goes to runs/experiments/NAME.log. ``--quick`` rewrites every
section and plot from the committed raw numbers (``--render-only``) in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "docs" / "results.md"
LOGS = ROOT / "runs" / "experiments"
NOT_EXPERIMENTS = {"common", "evidence", "run_all"}
RAW = ROOT / "docs" / "results"


def experiments() -> list[str]:
    return sorted(p.stem for p in HERE.glob("[a-z]*.py") if p.stem not in NOT_EXPERIMENTS)


def estimate(name: str) -> str:
    """The running time the experiment's docstring states (``~N minutes``)."""
    found = re.search(r"~(\d+) minutes", (HERE / f"{name}.py").read_text())
    return f"~{found.group(1)} min" if found else "time unknown"


def verdicts(name: str) -> str:
    """The verdicts the experiment wrote into its section's contents entries."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    section = re.search(rf"<!-- {re.escape(name)} -->(.*?)<!-- /{re.escape(name)} -->", text,
                        re.S)
    found = re.findall(r"^<!-- toc (\{.*\}) -->$", section.group(1), re.M) if section else []
    return ", ".join(json.loads(entry)["verdict"] for entry in found) or "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these experiments")
    p.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="leave these out")
    p.add_argument("--force", action="store_true",
                   help="rerun experiments whose raw numbers exist (and retrain their runs)")
    p.add_argument("--quick", action="store_true",
                   help="no training: rewrite each section and its plots from docs/results/")
    a = p.parse_args(argv)
    names = [n for n in experiments() if (not a.only or n in a.only) and n not in a.skip]
    unknown = (set(a.only or []) | set(a.skip)) - set(experiments())
    if unknown:
        p.error(f"unknown experiment(s): {', '.join(sorted(unknown))} "
                f"(known: {', '.join(experiments())})")
    LOGS.mkdir(parents=True, exist_ok=True)
    summary, begin = [], time.time()
    for i, name in enumerate(names, 1):
        log = LOGS / f"{name}.log"
        if (RAW / f"{name}.json").exists() and not a.force and not a.quick:
            print(f"[{i}/{len(names)}] {name}: done before (docs/results/{name}.json; "
                  "--force reruns it)", flush=True)
            summary.append((name, 0.0, "ok", verdicts(name)))
            continue
        if a.quick and not (RAW / f"{name}.json").exists():
            print(f"[{i}/{len(names)}] {name}: no raw numbers yet, section left as it is",
                  flush=True)
            continue
        action = "rendering" if a.quick else f"running ({estimate(name)}"
        print(f"[{i}/{len(names)}] {name}: {action}; log {log.relative_to(ROOT)}"
              + ("" if a.quick else ")"), flush=True)
        tick = time.time()
        env = {**os.environ, **({"RESULTS_FORCE": "1"} if a.force else {})}
        with open(log, "w") as out:
            rc = subprocess.run([sys.executable, str(HERE / f"{name}.py"),
                                 *(["--render-only"] if a.quick else [])], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        minutes = (time.time() - tick) / 60
        status = "ok" if rc == 0 else f"FAILED (exit {rc}; see the log)"
        summary.append((name, minutes, status, verdicts(name) if rc == 0 else "-"))
        print(f"[{i}/{len(names)}] {name}: {status} in {minutes:.1f} min", flush=True)
    print(f"\nsummary ({(time.time() - begin) / 60:.0f} min; docs/results.md, docs/img/):")
    width = max((len(n) for n in names), default=4)
    for name, minutes, status, verdict in summary:
        print(f"  {name:{width}s}  {minutes:5.1f} min  {status:6s}  {verdict}")
    return 0 if all(s == "ok" for _, _, s, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
