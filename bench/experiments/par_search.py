"""PAR (Mandava et al. 2020): a differentiable search over sublayer types, on CPU.

    python bench/experiments/par_search.py [--steps 1000 --seeds 2]   # ~10 minutes on 1 thread

The paper's claim: a search over sublayer types finds stacks with fewer attention blocks
(well above 2 layers per attention block, attention mostly in the lower two thirds) at
the perplexity of the ordinary interleaved stack. Here: a supernet of 8 mixed blocks
(self-attention / feed-forward / identity), hidden 64, seq 64, 2k BPE on the demo's data;
its weights train ``--steps`` steps with the architecture weights frozen (the paper: its
weights learn first), then the architecture weights are unfrozen for a quarter as many
more steps (the temperature annealed 1 -> 0.1). One search per seed. Then each seed's
found pattern and the ordinary (sf)^4 stack train ``--steps`` steps from scratch with
that seed (paired): validation perplexity, attention blocks, time per step.
"""

from __future__ import annotations

import json
import math
import statistics

import evidence
from common import (
    OUT,
    ROOT,
    demo_data,
    evaluate,
    run_experiment,
    save_figure,
    train,
    write_section,
)

from megatron_lite.config import load_config
from megatron_lite.experiments.search import search_trainer
from megatron_lite.parallel import ParallelContext

BLOCKS, SEQ, BATCH = 8, 64, 8
CONFIG = "configs/gpt2/tiny-cpu.yaml"
MODEL = {"model.hidden_size": 64, "model.num_attention_heads": 4, "model.seq_length": SEQ,
         "model.max_position_embeddings": SEQ, "train.micro_batch_size": BATCH,
         "train.global_batch_size": BATCH}
BASELINE = "sf" * (BLOCKS // 2)


def run_search(seed: int, freeze: int) -> dict:
    """One search (resumed from its summary when it finished with the same settings)."""
    run_dir = OUT / "par_search" / f"search-s{seed}"
    over = {**demo_data(2048), **MODEL, "parallel.tensor_parallel_size": 1,
            "train.run_dir": str(run_dir), "train.max_steps": freeze + freeze // 4,
            "train.eval_interval": 0, "train.log_interval": 10, "train.save_interval": 0,
            "train.seed": seed, "log.tensorboard": False, "model.num_layers": BLOCKS // 2,
            "search.blocks": BLOCKS, "search.freeze_steps": freeze,
            "search.window": max(5, freeze // 20)}
    over = {k: str(v) for k, v in over.items()}
    done = run_dir / "experiment.json"
    if done.exists() and json.loads(done.read_text()).get("overrides") == over:
        return json.loads((run_dir / "search.json").read_text())
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cfg = load_config(ROOT / CONFIG, [f"{k}={v}" for k, v in over.items()])
    search_trainer(cfg, ParallelContext()).fit()
    done.write_text(json.dumps({"overrides": over}))
    return json.loads((run_dir / "search.json").read_text())


def measure(a) -> dict:
    searches = []
    for seed in range(1, a.seeds + 1):
        found = run_search(seed, a.steps)
        last = found["history"][-1]
        searches.append({"pattern": found["pattern"], "steps": found["steps"],
                         "unfrozen_steps": found["unfrozen_steps"],
                         "converged": found["converged"], "probs": last["probs"]})
        print(f"search seed {seed}: {found['pattern']!r} after {found['steps']} steps "
              f"({'converged' if found['converged'] else 'not converged'})", flush=True)
    common = {**demo_data(2048), **MODEL, "train.max_steps": a.steps,
              "train.eval_interval": 0, "train.log_interval": 25}
    arms = {"found": {"ppl": [], "seconds": [], "pattern": []},
            "baseline": {"ppl": [], "seconds": [], "pattern": []}}
    for seed in range(1, a.seeds + 1):
        pattern = searches[seed - 1]["pattern"] or "f"
        for key, pat in (("found", pattern), ("baseline", BASELINE)):
            over = {"model.sublayer_pattern": pat, "model.num_layers": -(-len(pat) // 2)}
            name = f"par_search/{key}"
            run_dir, records, secs = train(name, {**common, **over}, CONFIG, seed=seed)
            ppl = evaluate(run_dir)["perplexity"]
            arms[key]["ppl"].append(ppl)
            arms[key]["seconds"].append(secs / a.steps)
            arms[key]["pattern"].append(pat)
            print(key, seed, pat, f"ppl {ppl:.1f}", f"{secs / a.steps:.3f} s/step", flush=True)
    return {"searches": searches, "arms": arms, "blocks": BLOCKS, "baseline": BASELINE}


def render(raw: dict) -> None:
    searches, arms, seeds, steps = raw["searches"], raw["arms"], raw["seeds"], raw["steps"]
    _plot(raw)
    rows = ["| seed | found pattern (bottom to top) | sublayers | attention | layers : attention "
            "| attention in the lower 2/3 | search steps (unfrozen) |",
            "|---|---|---|---|---|---|---|"]
    attention = []
    for seed, f in enumerate(searches, start=1):
        p = f["pattern"]
        att = p.count("s")
        attention.append(att)
        lower = p[:round(len(p) * 2 / 3)].count("s")
        ratio = f"{len(p) / att:.1f} : 1" if att else "no attention"
        rows.append(f"| {seed} | `{p or '(empty)'}` | {len(p)} | {att} | {ratio} | "
                    f"{lower} of {att} | {f['steps']} ({f['unfrozen_steps']})"
                    f"{', converged' if f['converged'] else ', not converged'} |")
    found, base = arms["found"], arms["baseline"]
    trained = ["| seed | found pattern | its perplexity | (sf)^4 perplexity | paired difference "
               "| s/step found / (sf)^4 |", "|---|---|---|---|---|---|"]
    for i, d in enumerate(evidence.paired(found["ppl"], base["ppl"])):
        trained.append(f"| {i + 1} | `{found['pattern'][i]}` | {found['ppl'][i]:.1f} | "
                       f"{base['ppl'][i]:.1f} | {d:+.1f} | {found['seconds'][i]:.3f} / "
                       f"{base['seconds'][i]:.3f} |")
    trained.append(f"| mean (min-max) | | {evidence.show(found['ppl'])} | "
                   f"{evidence.show(base['ppl'])} | | |")
    base_att = raw["baseline"].count("s")
    v_fewer = evidence.within(attention, base_att)
    v_ppl = evidence.compare(found["ppl"], base["ppl"])
    verdict = evidence.combine([v_fewer, v_ppl])
    top = max(p for f in searches for row in f["probs"] for p in row)
    small = ": the choices rest on small margins of alpha" if top < 0.5 else ""
    caveat = (f"The largest branch probability of any block at the end is {top:.2f} "
              f"(uniform: 0.33){small}; converged means that {math.ceil(0.9 * BLOCKS)} of "
              f"the {BLOCKS} blocks kept "
              f"their argmax for {max(5, steps // 20)} steps.")
    if min(attention) == 0 and v_ppl != "disagrees":
        caveat += (" A found stack has no attention at all, so it cannot read its context "
                   "beyond the current token, and the found stacks still match or beat the "
                   "ordinary one: at this length of training the ordinary stack gains "
                   "nothing measurable from reading its context (the regime where attention "
                   "is not yet worth its cost), so agreement here says that this regime "
                   "lets attention go, not that a well-trained model can do without most "
                   "of it.")
    elif min(attention) == 0:
        worth = statistics.fmean(found["ppl"]) / statistics.fmean(base["ppl"]) - 1
        caveat += (" A found stack has no attention at all (it cannot read its context "
                   "beyond the current token), and the found stacks are measurably worse "
                   f"than the ordinary one ({worth:+.0%} perplexity): the search dropped "
                   "attention where attention was worth that much.")
    cond = (f"at 0.3 M parameters ({BLOCKS} blocks, hidden 64), {steps} frozen + "
            f"{steps // 4} search steps, {steps} training steps")
    md = f"""
## PAR: differentiable search over sublayer types (Mandava et al. 2020)

Regenerate: `{raw['command']}` ({raw['minutes']} min; {raw['machine']}).
**Design**: a supernet of {BLOCKS} mixed blocks (self-attention, feed-forward, identity;
a Gumbel-softmax over each block's branches), hidden 64, 4 heads, seq {SEQ}, batch
{BATCH}, 2k BPE on the standard library's docstrings. The weights train {steps} steps
with the architecture weights frozen, so that the branches are worth comparing when the
choice starts (the earlier page unfroze them after 150 steps, while removing all
attention cost only 5 %: the search then had nothing to choose by); then alpha trains
for {steps // 4} more steps (its own AdamW group, lr 1e-2, weight decay 5e-4, the
paper's; temperature 1 -> 0.1), or until 90 % of the blocks keep their choice for
{max(5, steps // 20)} steps. One search per seed (seeds 1..{seeds}). Each seed's found
pattern (identity blocks removed) and the ordinary (sf)^{BLOCKS // 2} stack then train
{steps} steps from scratch with that seed, and are compared seed by seed on validation
perplexity. Shrunk from 12 blocks, hidden 128, seq 128 (and without the PAR-rule arm)
to fit the CPU budget at {seeds} seeds (the supernet computes every branch of every
block: a step costs about twice the ordinary stack's); figures are the mean with the
{evidence.SPREAD} in brackets; s/step is wall time on a shared machine (rough).

{chr(10).join(rows)}

The found patterns and the ordinary stack, {steps} steps each (paired by seed; negative =
the found pattern is better):

{chr(10).join(trained)}

**Verdict** (the rule at the top of the page): fewer attention blocks than the ordinary
stack's {base_att} in every seed: **{v_fewer}**; perplexity against the ordinary stack:
found better **{v_ppl}** (equal perplexity is the claim's second part); together, by
the rule for a claim with several parts: **{verdict}**.

{caveat}

![branch probabilities at the end of each search](img/par_search.png)

**What this can and cannot show.** Whether, once the weights have learned something,
the gradient of the supernet's training loss prefers feed-forward over attention
blocks at this scale, and what the found stacks are worth when trained alone. It
cannot show the paper's WikiText-103 result: its supernet trains 10k steps before alpha
moves, at a scale where attention's contribution differs; with {seeds} searches a
pattern's details (where its attention sits) are anecdotes, not a distribution.
"""
    write_section("par_search", md, toc={
        "paper": "par", "claim": "the search finds a stack with fewer attention blocks at "
                                 "equal perplexity",
        "measured": f"attention blocks found {', '.join(map(str, attention))} of "
                    f"{BLOCKS}; perplexity {evidence.show(found['ppl'])} vs "
                    f"{evidence.show(base['ppl'])} for (sf)^{BLOCKS // 2}",
        "verdict": verdict, "condition": cond, "seeds": seeds, "spread": evidence.SPREAD})


def _plot(raw: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    searches = raw["searches"]
    fig, axes = plt.subplots(1, len(searches), figsize=(4 * len(searches), 3.6), dpi=110,
                             sharey=True, squeeze=False)
    for ax, (seed, f) in zip(axes[0], enumerate(searches, start=1), strict=True):
        probs = f["probs"]  # per block: P(s), P(f), P(i)
        blocks = range(len(probs))
        bottom = [0.0] * len(probs)
        for j, (branch, color) in enumerate((("attention", "C0"), ("feed-forward", "C1"),
                                             ("identity", "C7"))):
            vals = [row[j] for row in probs]
            ax.bar(blocks, vals, bottom=bottom, color=color, label=branch)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_xticks(list(blocks))
        ax.set_xlabel("block (bottom to top)")
        ax.set_title(f"seed {seed}: found `{f['pattern']}`", fontsize=9)
    axes[0][0].set_ylabel("branch probability at the end")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("PAR search: each block's choice", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, "par_search.png")


if __name__ == "__main__":
    run_experiment("par_search", __doc__, measure, render, steps=1000, seeds=2)
