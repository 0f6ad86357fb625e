"""BIG vs BASE (Popel & Bojar 2018, "Training Tips for the Transformer Model", section 4.7).

    python bench/experiments/tips_big_base.py [--steps 1600]   # ~14 minutes on 2 CPU cores

The paper's tip: "prefer the BIG over the BASE model if you plan to train longer" — BASE
is ahead early (each step is cheaper), BIG overtakes it after a while and ends better.
Here: two sizes of the demo's tiny GPT-2, BASE (4 layers, hidden 128) and BIG (6
layers, hidden 256), each trained for the same wall-clock budget: ``--steps`` steps of
BASE, and as many steps of BIG as fit in that time (seconds per step measured by a short
calibration run of each). The same learning rate and cosine schedule over each run's own
steps, validation perplexity every tenth of the run on the same 160 sequences, against
training time (evaluation excluded). Where do the curves cross?
"""

from __future__ import annotations

import time

from common import (
    arguments,
    demo_data,
    load_config,
    machine,
    perplexity_curve,
    plot_curves,
    train,
    write_section,
)

from megatron_lite.plan import count_parameters

MODELS = {"BASE": {"model.num_layers": 4, "model.hidden_size": 128,
                   "model.num_attention_heads": 4},
          "BIG": {"model.num_layers": 6, "model.hidden_size": 256,
                  "model.num_attention_heads": 8}}
CALIBRATION = 20
EVALS = 10
EVAL_ITERS = 10  # x 16 sequences


def main() -> None:
    a = arguments(__doc__, steps=1600)
    start = time.time()
    data = demo_data()
    pace = {}
    for name, over in MODELS.items():  # seconds per step, steady state
        _, records, _ = train(f"tips_big_base/calibrate-{name}", {
            **data, **over, "train.max_steps": CALIBRATION, "train.eval_interval": 0,
            "train.log_interval": CALIBRATION // 2})
        pace[name] = 16 * 128 / records[-1]["tokens_per_sec"]
    steps = {"BASE": a.steps, "BIG": max(round(a.steps * pace["BASE"] / pace["BIG"]), EVALS)}
    results = {}
    for name, over in MODELS.items():
        n = steps[name]
        run_dir, records, _ = train(f"tips_big_base/{name}", {
            **data, **over, "train.max_steps": n, "train.eval_interval": n // EVALS,
            "train.log_interval": n // EVALS, "train.eval_iters": EVAL_ITERS})
        curve, seconds = perplexity_curve(records, 16, 128)
        params = count_parameters(load_config(run_dir / "config.yaml"), 1)
        results[name] = {"curve": curve, "steps": n, "seconds": seconds,
                         "params": params["total"] - params["embedding"]}
        print(f"{name}: {n} steps, {seconds:.0f} s, validation perplexity "
              + " ".join(f"{p:.0f}" for _, p in curve), flush=True)
    base, big = results["BASE"]["curve"], results["BIG"]["curve"]
    cross = crossing(base, big)
    plot_curves({f"{name} ({r['params'] / 1e6:.2f} M, {r['steps']} steps)": r["curve"]
                 for name, r in results.items()}, "Same wall-clock budget: BIG vs BASE",
                "tips_big_base.png", (cross, f"crossing ~{cross:.0f} s") if cross else None)
    rows = ["| model | non-embedding parameters | steps | training time | validation perplexity "
            "at 1/4 of the time | at the end |", "|---|---|---|---|---|---|"]
    quarter = min(results["BASE"]["seconds"], results["BIG"]["seconds"]) / 4
    for name, r in results.items():
        rows.append(f"| {name} ({MODELS[name]['model.num_layers']} layers, hidden "
                    f"{MODELS[name]['model.hidden_size']}) | {r['params'] / 1e6:.2f} M | "
                    f"{r['steps']} | {r['seconds']:.0f} s | "
                    f"{interpolate(r['curve'], quarter):.1f} | {r['curve'][-1][1]:.1f} |")
    end_base, end_big = base[-1][1], big[-1][1]
    early_base = interpolate(base, quarter) < interpolate(big, quarter)
    if end_big < end_base and early_base:
        when = f"after about {cross:.0f} s of training" if cross else "later"
        verdict, line = "agrees", f"BASE is ahead early; BIG overtakes it {when} and ends better"
    elif end_big < end_base:
        verdict, line = "partly", ("BIG is ahead from the start of the curves and ends better: "
                                   "no crossing to see at this scale")
    else:
        verdict, line = "disagrees", ("BIG does not overtake BASE within the budget"
                                      + (f" (the curves meet at {cross:.0f} s but BIG ends "
                                         "behind)" if cross else ""))
    extra = results["BIG"]["seconds"] / results["BASE"]["seconds"]
    off = (f" (BIG trained {extra:.2f}x BASE's time: the calibration's seconds per step were "
           "off by that much)") if abs(extra - 1) > 0.05 else ""
    measured = (f"{line}: {end_big:.0f} vs {end_base:.0f} perplexity after "
                f"{results['BASE']['seconds'] / 60:.0f} min")
    write_section("tips_big_base", f"""
## BIG vs BASE if you train longer (Popel & Bojar 2018, training tips)

Claim: "prefer the BIG over the BASE model if you plan to train longer": BASE is better
early, BIG overtakes it with enough time. Here: two tiny GPT-2s on the demo's data (seq
128, batch 16, 8k BPE), lr 1e-3 with a cosine schedule over each run's steps, the same
wall-clock budget (BIG's steps scaled by the seconds per step measured in a
{CALIBRATION}-step calibration of each), validation perplexity every tenth of the run on
the same {EVAL_ITERS * 16} sequences, TP=1. Command: `python bench/experiments/tips_big_base.py
--steps {a.steps}` ({(time.time() - start) / 60:.0f} min). Machine: {machine()}. One seed.

{chr(10).join(rows)}

{line}{off}{'.' if verdict != 'agrees' else f' ({end_big:.1f} vs {end_base:.1f}).'} Each model
follows its own cosine schedule, so a point in the middle of a curve is at a higher
learning rate than its end: the curves say which model to pick for a given budget less
exactly than separate runs per budget would.

![validation perplexity vs training time](img/tips_big_base.png)
""", toc={"paper": "tips", "claim": "prefer BIG over BASE if you train longer",
          "measured": measured, "verdict": verdict})


def interpolate(curve: list[tuple[float, float]], t: float) -> float:
    """Perplexity at time ``t`` on a (time, perplexity) curve, linearly, clamped."""
    if t <= curve[0][0]:
        return curve[0][1]
    for (t0, p0), (t1, p1) in zip(curve, curve[1:], strict=False):
        if t <= t1:
            return p0 + (p1 - p0) * (t - t0) / (t1 - t0)
    return curve[-1][1]


def crossing(base: list, big: list) -> float | None:
    """The last time at which BIG's curve goes from above BASE's to below it (both
    interpolated on BASE's times within the shorter run), or None if it never does."""
    end = min(base[-1][0], big[-1][0])
    times = [t for t, _ in base if big[0][0] <= t <= end]
    last = None
    for t0, t1 in zip(times, times[1:], strict=False):
        d0 = interpolate(big, t0) - interpolate(base, t0)
        d1 = interpolate(big, t1) - interpolate(base, t1)
        if d0 > 0 >= d1:
            last = t0 + (t1 - t0) * d0 / (d0 - d1)
    return last


if __name__ == "__main__":
    main()
