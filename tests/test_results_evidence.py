"""The claims page's evidence rule (bench/experiments/evidence.py) and its contents table
(bench/experiments/common.py), checked against hand-worked cases."""

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "experiments"))

import common  # noqa: E402
import evidence  # noqa: E402


def test_summary_matches_the_statistics_module():
    values = [282.4, 284.9, 281.0]
    s = evidence.summary(values)
    assert s["mean"] == pytest.approx(statistics.mean(values))
    assert s["sd"] == pytest.approx(statistics.stdev(values))
    assert (s["min"], s["max"], s["n"]) == (281.0, 284.9, 3)
    assert evidence.show(values) == "282.8 (281.0-284.9)"
    assert evidence.show([5.0]) == "5.0"


def test_overlapping_ranges_are_inconclusive():
    # the page's old sandwich entry: 284.9 vs 282.4, a 0.9 % gap inside a seed's spread
    assert evidence.compare([284.9, 281.0], [282.4, 285.5]) == "inconclusive"


def test_apart_but_within_twice_the_spread_is_inconclusive():
    # ranges [1, 2] and [2.1, 3] do not overlap, but the means differ by 1.05 < 2 x 0.707
    assert not evidence.separated([1.0, 2.0], [2.1, 3.0])
    assert evidence.compare([1.0, 2.0], [2.1, 3.0]) == "inconclusive"


def test_a_clear_difference_agrees_or_disagrees_by_its_direction():
    low, high = [10.0, 10.2, 10.1], [12.0, 12.3, 11.9]
    assert evidence.compare(low, high) == "agrees"
    assert evidence.compare(high, low) == "disagrees"
    # accuracies: higher is better
    assert evidence.compare(high, low, lower_is_better=False) == "agrees"
    assert evidence.paired(high, low) == pytest.approx([2.0, 2.1, 1.8])


def test_within_and_combine():
    assert evidence.within([1.02, 1.05], 1.1) == "agrees"
    assert evidence.within([1.2, 1.3], 1.1) == "disagrees"
    assert evidence.within([1.05, 1.2], 1.1) == "inconclusive"
    assert evidence.combine(["agrees", "agrees"]) == "agrees"
    assert evidence.combine(["agrees", "inconclusive"]) == "partly"
    assert evidence.combine(["disagrees", "inconclusive"]) == "disagrees"
    assert evidence.combine(["inconclusive"]) == "inconclusive"
    with pytest.raises(ValueError):
        evidence.combine(["maybe"])


def test_raw_numbers_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(evidence, "RAW", tmp_path)
    raw = {"ppl": {"k=0": [1.5, 2.5]}}
    path = evidence.write_raw("demo", raw)
    assert json.loads(path.read_text()) == raw == evidence.read_raw("demo")
    assert evidence.read_raw("absent") is None
    with pytest.raises(ValueError):  # a NaN would not be valid JSON for a reader
        evidence.write_raw("bad", {"x": float("nan")})


def test_contents_table_shows_seeds_verdict_and_condition(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results.md")
    toc = {"paper": "sandwich", "claim": "sandwich beats interleaved",
           "measured": "283.1 (282.0-285.0) vs 282.9 (281.0-284.0)", "verdict": "inconclusive",
           "condition": "at 0.4 M parameters, 1200 steps", "seeds": 3, "spread": evidence.SPREAD}
    common.write_section("sandwich", "## Sandwich\n\ntext", toc=toc)
    text = (tmp_path / "results.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Sandwich"))
    assert "| 3 |" in row and "**inconclusive** at 0.4 M parameters, 1200 steps" in row
    assert "[sandwich beats interleaved](#sandwich)" in row
    assert "What a CPU-scale check can show" in text and evidence.RULE in text
    # rerunning the section replaces it (one copy, one row)
    common.write_section("sandwich", "## Sandwich\n\nnew text", toc={**toc, "verdict": "agrees"})
    text = (tmp_path / "results.md").read_text()
    assert text.count("<!-- sandwich -->") == 1 and "new text" in text
    assert "**agrees** at 0.4 M" in text and "**inconclusive**" not in text
    with pytest.raises(AssertionError):  # a claim without its seeds is refused
        common.write_section("sandwich", "## S", toc={k: v for k, v in toc.items()
                                                      if k != "seeds"})
