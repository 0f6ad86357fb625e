"""What every claim on docs/results.md stands on: seeds, their spread, a verdict rule that
can say "inconclusive", and the raw numbers committed beside the page.

Pure Python (no torch), so that the page can be re-rendered and the rule tested quickly.

The rule (stated on the page): each compared configuration runs several seeds; a
difference between two arms counts only when their ranges over seeds (min to max) do not
overlap *and* the difference of their means exceeds twice the larger of their standard
deviations. Then the claim "A beats B" *agrees* (A better) or *disagrees* (B better);
otherwise it is *inconclusive*. A claim with several parts is *partly* when some parts
agree and others do not.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RAW = ROOT / "docs" / "results"
SPREAD = "min-max over seeds"
VERDICTS = ("agrees", "partly", "disagrees", "inconclusive")
RULE = ("A difference counts only when the two arms' ranges over seeds (min to max) do not "
        "overlap and their means differ by more than twice the larger standard deviation; "
        "otherwise the verdict is *inconclusive*. *Partly*: a claim with several parts, "
        "some of which agree.")


def summary(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarise")
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def show(values: list[float], digits: int = 1) -> str:
    """``mean (min-max)`` of the per-seed values, e.g. ``283.1 (282.0-285.0)``; a single
    value alone."""
    s = summary(values)
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def paired(a: list[float], b: list[float]) -> list[float]:
    """Per-seed differences ``a_i - b_i`` of two arms that share their seeds."""
    if len(a) != len(b):
        raise ValueError(f"paired arms need the same seeds ({len(a)} vs {len(b)} values)")
    return [x - y for x, y in zip(a, b, strict=True)]


def separated(a: list[float], b: list[float]) -> bool:
    """Whether two arms differ by more than their spread (the rule in the docstring)."""
    sa, sb = summary(a), summary(b)
    apart = sa["max"] < sb["min"] or sb["max"] < sa["min"]
    return apart and abs(sa["mean"] - sb["mean"]) > 2 * max(sa["sd"], sb["sd"])


def compare(claimed_better: list[float], other: list[float], lower_is_better: bool = True
            ) -> str:
    """The verdict on "``claimed_better`` beats ``other``" from per-seed values."""
    if not separated(claimed_better, other):
        return "inconclusive"
    better = statistics.fmean(claimed_better) < statistics.fmean(other)
    return "agrees" if better == lower_is_better else "disagrees"


def within(values: list[float], limit: float) -> str:
    """The verdict on "``values`` stay below ``limit``" (e.g. a ratio close to 1): agrees
    when every seed is below, disagrees when every seed is above, else inconclusive."""
    if all(v < limit for v in values):
        return "agrees"
    if all(v > limit for v in values):
        return "disagrees"
    return "inconclusive"


def combine(verdicts: list[str]) -> str:
    """One verdict for a claim with several parts."""
    unknown = set(verdicts) - set(VERDICTS)
    if unknown or not verdicts:
        raise ValueError(f"not verdicts: {sorted(unknown) or verdicts}")
    if len(set(verdicts)) == 1:
        return verdicts[0]
    if "agrees" in verdicts or "partly" in verdicts:
        return "partly"
    return "disagrees" if "disagrees" in verdicts else "inconclusive"


def write_raw(name: str, raw: dict) -> Path:
    """Write an experiment's raw numbers (every figure its section quotes, per seed) to
    docs/results/NAME.json, its keys in the order the experiment made them (JSON keys are
    strings: a render that orders arms by a number must convert them back)."""
    RAW.mkdir(parents=True, exist_ok=True)
    path = RAW / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(raw, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def read_raw(name: str) -> dict | None:
    """docs/results/NAME.json, or None when the experiment has not run."""
    path = RAW / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def ppl(losses: list[float]) -> list[float]:
    """Perplexities of per-seed losses."""
    return [math.exp(x) for x in losses]
