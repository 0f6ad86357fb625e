"""LayerDrop and depth on demand (Fan et al. 2019).

    python bench/experiments/layerdrop.py [--steps 1500] [--seeds 2]  # ~20 minutes of 1 CPU thread

The paper's claims: a model trained with LayerDrop (each layer skipped with probability p
in training) can be pruned at inference time (every other layer) with little loss, while
a model trained without it degrades; pruned, it is as good as or better than a model of
that depth trained from scratch; at full depth LayerDrop costs little (it regularises).
Here: the 8-layer GPT-2 of the sandwich section (hidden 64, 2k BPE; its p = 0 runs are
the same runs) trained with p in {0, 0.2, 0.5}, with p = 0.5 on single sublayers instead of
layers (``model.layerdrop_granularity=sublayer``), and a 4-layer model from scratch, for
the same steps and seeds. Every 8-layer model is evaluated at full depth and pruned to
4 layers two ways: every other layer (0, 2, 4, 6; the paper's strategy) and keeping the
ends (0, 2, 5, 7).
"""

from __future__ import annotations

import math

from common import evaluate, run_experiment, save_figure, train, with_seeds, write_section
from evidence import SPREAD, combine, compare, paired, show, summary
from sandwich import EVAL_ITERS, base_run, curve, small

PRUNINGS = {"every_other": "0,2,4,6", "keep_ends": "0,2,5,7"}
ARMS = {  # name: overrides of the 8-layer model (None: the shared plain runs), in the
    # order they train (the cheapest claims first)
    "p=0": None,
    "p=0.5": {"model__layerdrop": 0.5},
    "p=0.5 sublayer": {"model__layerdrop": 0.5, "model__layerdrop_granularity": "sublayer"},
    "p=0.2": {"model__layerdrop": 0.2},
    "p=0.5 ends": {"model__layerdrop": 0.5, "model__layerdrop_keep_ends": "true"},
}
LABELS = {"p=0": "p = 0", "p=0.2": "p = 0.2", "p=0.5": "p = 0.5",
          "p=0.5 sublayer": "p = 0.5, sublayers", "p=0.5 ends": "p = 0.5, ends never dropped"}


def measure(a) -> dict:
    raw: dict = {"arms": {}}
    _scratch(a, raw)
    for name, over in ARMS.items():
        def one(seed: int, name=name, over=over) -> dict:
            if over is None:
                run_dir, records, seconds = base_run(a.steps, seed)
            else:
                slug = name.replace("=", "").replace(".", "").replace(" ", "-")
                run_dir, records, seconds = train(f"small/8L-ld-{slug}",
                                                  small(a.steps, **over), seed=seed)
            out = {"full": evaluate(run_dir, iters=EVAL_ITERS)["loss"], "seconds": seconds,
                   "curve": curve(records)}
            for key, keep in PRUNINGS.items():
                out[key] = evaluate(run_dir, [f"model.layers_to_keep={keep}"],
                                    iters=EVAL_ITERS)["loss"]
            print(f"{name} seed {seed}: val ppl full {math.exp(out['full']):.2f}, pruned "
                  f"every other {math.exp(out['every_other']):.2f}, keeping the ends "
                  f"{math.exp(out['keep_ends']):.2f} ({seconds:.0f} s)", flush=True)
            return out
        runs = with_seeds(a.seeds, one)
        raw["arms"][name] = {key: [r[key] for r in runs] for key in runs[0]}
    return raw


def _scratch(a, raw: dict) -> None:
    """The 4-layer model from scratch."""
    def scratch(seed: int) -> dict:
        run_dir, records, seconds = train("small/4L-scratch", small(a.steps, model__num_layers=4),
                                          seed=seed)
        loss = evaluate(run_dir, iters=EVAL_ITERS)["loss"]
        print(f"4L seed {seed}: val ppl {math.exp(loss):.2f} ({seconds:.0f} s)", flush=True)
        return {"full": loss, "seconds": seconds, "curve": curve(records)}
    runs = with_seeds(a.seeds, scratch)
    raw["arms"]["4L scratch"] = {key: [r[key] for r in runs] for key in runs[0]}


def _ppl(losses: list[float]) -> list[float]:
    return [math.exp(x) for x in losses]


def render(raw: dict) -> None:
    arms, steps = raw["arms"], raw["steps"]
    n = len(arms["p=0"]["full"])
    present = [k for k in ARMS if k in arms]  # an arm cut for time is left out
    full = {k: _ppl(v["full"]) for k, v in arms.items()}
    eo = {k: _ppl(arms[k]["every_other"]) for k in present}
    ends = {k: _ppl(arms[k]["keep_ends"]) for k in present}
    ratio = {k: [p / f for p, f in zip(eo[k], full[k], strict=True)] for k in present}
    scratch = full["4L scratch"]
    condition = f"at 8 layers of hidden 64 (0.4 M non-embedding parameters), {steps} steps"

    rows = ["| model | full depth (8 layers) | pruned every other (0,2,4,6) | pruned, "
            "ends kept (0,2,5,7) | pruned / full (every other) | training time per run |",
            "|---|---|---|---|---|---|"]
    for k in present:
        rows.append(f"| {LABELS[k]} | {show(full[k], 1)} | {show(eo[k], 1)} | "
                    f"{show(ends[k], 1)} | {show(ratio[k], 2)} | "
                    f"{summary(arms[k]['seconds'])['mean']:.0f} s |")
    rows.append(f"| 4 layers from scratch | {show(scratch, 1)} (4 layers) | | | | "
                f"{summary(arms['4L scratch']['seconds'])['mean']:.0f} s |")

    def pct(a: list[float], b: list[float]) -> list[float]:
        return [100 * d / y for d, y in zip(paired(a, b), b, strict=True)]

    def seeds(values: list[float], unit: str = " %") -> str:
        return ", ".join(f"{v:+.1f}{unit}" for v in values)
    prow = ["| comparison (per seed, same seed in both arms) | mean (min-max) | per seed |",
            "|---|---|---|"]
    pairs = [
        ("full depth: p = 0.2 vs p = 0", "p=0.2", lambda: pct(full["p=0.2"], full["p=0"])),
        ("full depth: p = 0.5 vs p = 0", "p=0.5", lambda: pct(full["p=0.5"], full["p=0"])),
        ("pruned every other: p = 0.2 vs p = 0", "p=0.2", lambda: pct(eo["p=0.2"], eo["p=0"])),
        ("pruned every other: p = 0.5 vs p = 0", "p=0.5", lambda: pct(eo["p=0.5"], eo["p=0"])),
        ("pruned every other, p = 0.5 vs 4 layers from scratch", "p=0.5",
         lambda: pct(eo["p=0.5"], scratch)),
        ("pruned every other: sublayers vs layers (p = 0.5)", "p=0.5 sublayer",
         lambda: pct(eo["p=0.5 sublayer"], eo["p=0.5"])),
        ("p = 0.5 pruned: ends kept vs every other", "p=0.5",
         lambda: pct(ends["p=0.5"], eo["p=0.5"])),
        ("p = 0 pruned: ends kept vs every other", "p=0", lambda: pct(ends["p=0"], eo["p=0"])),
        ("pruned: ends never dropped, ends kept vs p = 0.5 every other", "p=0.5 ends",
         lambda: pct(ends["p=0.5 ends"], eo["p=0.5"])),
    ]
    for label, needs, values in pairs:
        if needs in present:
            v = values()
            prow.append(f"| {label} | {show(v, 1)} % | {seeds(v)} |")

    # the verdicts, by the rule (evidence.compare) on the per-seed values
    dropped = [p for p in ("p=0.2", "p=0.5") if p in present]
    costed = "p=0.2" if "p=0.2" in present else "p=0.5"
    toc = [
        {"paper": "layerdrop", "claim": "trained with LayerDrop, a model loses less when pruned "
         "to half depth (pruned / full perplexity falls with p)",
         "measured": "pruned / full: " + ", ".join(f"{show(ratio[p], 2)} at {LABELS[p]}"
                                                   for p in ("p=0", *dropped)),
         "verdict": combine([compare(ratio[p], ratio["p=0"]) for p in dropped])},
        {"paper": "layerdrop", "claim": "pruned to half depth, a LayerDrop model (p = 0.5) is "
         "as good as that depth trained from scratch",
         "measured": f"perplexity {show(eo['p=0.5'], 1)} pruned vs {show(scratch, 1)} from "
                     "scratch", "verdict": compare(eo["p=0.5"], scratch)},
        {"paper": "layerdrop", "claim": f"LayerDrop ({LABELS[costed]}) costs nothing at full "
         "depth (it regularises)", "measured": f"perplexity {show(full[costed], 1)} vs "
         f"{show(full['p=0'], 1)} without", "verdict": compare(full[costed], full["p=0"])},
    ]
    if "p=0.5 sublayer" in present:
        toc.append(
            {"paper": "layerdrop", "claim": "dropping whole layers beats dropping single "
             "sublayers (for pruning whole layers)", "measured": "pruned perplexity "
             f"{show(eo['p=0.5'], 1)} (layers) vs {show(eo['p=0.5 sublayer'], 1)} "
             "(sublayers), p = 0.5", "verdict": compare(eo["p=0.5"], eo["p=0.5 sublayer"])})
    if "p=0.5 ends" in present:
        toc.append(
            {"paper": "layerdrop", "claim": "never dropping the first and last layer in training "
             "(and keeping them when pruning) beats plain LayerDrop pruned every other",
             "measured": f"pruned perplexity {show(ends['p=0.5 ends'], 1)} (ends never dropped, "
             f"0,2,5,7 kept) vs {show(eo['p=0.5'], 1)} (p = 0.5, every other); it drops 3 of 8 "
             "layers per step on average, not 4",
             "verdict": compare(ends["p=0.5 ends"], eo["p=0.5"])})
    toc.append(
        {"paper": "layerdrop", "claim": "when pruning, keeping the first and last layer beats "
         "every other layer", "measured": f"p = 0.5 pruned: {show(ends['p=0.5'], 1)} ends kept "
         f"vs {show(eo['p=0.5'], 1)} every other", "verdict": compare(ends["p=0.5"], eo["p=0.5"])})
    for e in toc:
        e.update({"seeds": n, "spread": SPREAD, "condition": condition})
    _plot(full, eo, scratch, [k for k in ("p=0", "p=0.2", "p=0.5", "p=0.5 sublayer",
                                          "p=0.5 ends") if k in present])
    cost = show(pct(full[costed], full["p=0"]), 1)
    missing = [LABELS[k] for k in ARMS if k not in present]
    cut = (f" Not run (cut to fit the deadline and the CPU budget): {', '.join(missing)}."
           if missing else "")
    trained = "; ".join(LABELS[k] for k in present)
    budget, absolute = "", ""
    worse = pct(eo["p=0.5"], eo["p=0"])
    if all(v > 0 for v in worse):
        absolute = (" Robust to pruning is not better when pruned here: the pruned p = 0.5 "
                    f"model is {show(worse, 1)} % worse (paired) than the plain model pruned "
                    "the same way, because its full-depth cost at this budget is larger than "
                    "what it saves when pruned.")
    if summary(scratch)["mean"] < summary(full["p=0"])["mean"]:
        budget = (f" At this budget the 4-layer model from scratch ({show(scratch, 1)}) is "
                  f"better than the plain 8-layer one at full depth ({show(full['p=0'], 1)}): "
                  f"{steps} steps favour the smaller model, which makes the comparison "
                  "against it harsher than in the paper's long-trained regime.")
    verdicts = "\n".join(f"- **{e['verdict']}**: {e['claim']} ({e['measured']})." for e in toc)
    write_section("layerdrop", f"""
## LayerDrop and depth on demand (Fan et al. 2019)

Regenerate: `{raw['command']}` ({raw['minutes']} min; {raw['machine']}); seeds 1-{n} per
arm; brackets are the {SPREAD}.

**Design.** Fan et al. skip each layer with probability p in training so that the trained
model can be pruned at inference (every other layer) without fine-tuning; they recommend
p = 0.2 in general and about 0.5 to prune half the layers. Here: the 8-layer GPT-2 of the
sandwich section (hidden 64, 4 heads, pre-LN, dropout 0.1, seq 64, batch 8, a 2k BPE on the
standard library's docstrings, lr 1e-3 cosine, {steps} steps; the p = 0 runs are the
sandwich section's k = 0 runs) trained with {trained} ("sublayers": p drawn per sublayer
instead of per layer, `model.layerdrop_granularity=sublayer`, attention and MLP dropped
independently), and a 4-layer model from scratch with the same steps and seeds.{cut}
Each 8-layer model is evaluated at full depth and pruned to 4 layers
(`model.layers_to_keep`) every other (0,2,4,6) and keeping the ends (0,2,5,7), on
{EVAL_ITERS} held-out batches. A pruned model that was never trained without half its
layers is the mechanism's test case at any scale, so this design can show the effect.
Arms are compared at equal steps, not equal time: a LayerDrop step skips layers and is
cheaper (the training-time column, measured on a shared machine, so only indicative).
{'' if steps >= 1500 else f"Shrunk from the issue's 1500 steps to {steps}. "}"Ends never
dropped": `model.layerdrop_keep_ends=true`, the first
and last layer always run in training, so at p = 0.5 it drops 3 of 8 layers per step on
average instead of 4 (a milder LayerDrop, not only a different one).

Validation perplexity:

{chr(10).join(rows)}

Paired per-seed differences (perplexity, relative to the second arm):

{chr(10).join(prow)}

**Verdicts** (the rule above, {condition}):

{verdicts}

At full depth LayerDrop {LABELS[costed]} changes perplexity by {cost} % (paired).{absolute}

**What this can and cannot show.** It shows whether LayerDrop makes this small model
robust to removing layers and what it costs at this budget; it cannot show the paper's
regularisation gains, which come from large, long-trained models that overfit (here no
model overfits in {steps} steps, so any regulariser can only cost), and it compares one
pruning choice of the ends, not a search over subsets.{budget}

![LayerDrop: perplexity at full depth and pruned to 4 layers](img/layerdrop.png)
""", toc=toc)


def _plot(full: dict, eo: dict, scratch: list[float], keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for offset, (label, values, marker) in enumerate(
            (("full depth (8 layers)", full, "o"), ("pruned every other (4 layers)", eo, "s"))):
        xs = [i + (offset - 0.5) * 0.25 for i in range(len(keys))]
        s = [summary(values[k]) for k in keys]
        ax.errorbar(xs, [x["mean"] for x in s],
                    yerr=[[x["mean"] - x["min"] for x in s], [x["max"] - x["mean"] for x in s]],
                    fmt=marker, capsize=4, label=label)
    lo, hi = min(scratch), max(scratch)
    ax.axhspan(lo, hi if hi > lo else lo * 1.001, color="grey", alpha=0.3,
               label="4 layers from scratch (seeds' range)")
    ax.set_xticks(range(len(keys)), [LABELS[k].replace(", ", "\n") for k in keys])
    ax.set_ylabel("validation perplexity (mean, bars: min-max over seeds)")
    ax.set_title("LayerDrop: what pruning to half depth costs, per training p", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure(fig, "layerdrop.png")


if __name__ == "__main__":
    run_experiment("layerdrop", __doc__, measure, render, steps=1500, seeds=2)
