"""MiniLM / MiniLMv2 (Wang et al. 2020, 2021): does a distilled student beat one trained alone?

    python bench/experiments/minilm.py [--steps 300] [--seeds 2]   # ~5 minutes of 1 CPU thread

The papers' claim: a small student that learns the teacher's last-layer self-attention
relations (task-agnostic distillation, then training on the task) is a better model than
the same student trained alone; and MiniLM's trade-off: a student of half the layers and
half the width runs several times faster while keeping most of the teacher's quality.

Here, on a causal GPT (language modelling on the demo's data, a 2k BPE): a teacher of 4
layers and hidden 128 trained TEACHER_X times the student's steps (so that it is clearly
better than any student here: something to distil); students of 2 layers, hidden 64 (half
the layers and half the width), several seeds: from scratch for ``steps`` steps; MiniLMv2
students, ``steps / 2`` steps of relation distillation (Q-Q, K-K, V-V of the teacher's last
layer, plus half the student's own loss) then ``steps / 2`` steps of their own loss from
those weights (``train.finetune``): equal student steps; and from scratch for the
distilled students' cost (the per-step cost of a distillation step, which runs a teacher
forward, and of an ordinary step measured back to back in this process): equal time.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from common import (
    OUT,
    demo_data,
    evaluate,
    load_config,
    run_experiment,
    save_figure,
    step_costs,
    train,
    with_seeds,
    write_section,
)
from evidence import SPREAD, combine, compare, paired, show, within

from megatron_lite.checkpoint import load_checkpoint
from megatron_lite.experiments.distill import distiller
from megatron_lite.parallel import ParallelContext
from megatron_lite.plan import count_parameters
from megatron_lite.run import build_run
from megatron_lite.training import evaluation

NAME = "minilm"
GPT = "configs/gpt2/tiny-cpu.yaml"
TEACHER = {"model.num_layers": 4, "model.hidden_size": 128, "model.num_attention_heads": 4}
STUDENT = {"model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4}
TEACHER_X = 4  # the teacher trains this many times the student's steps
SEQ, BATCH = 64, 8
ITERS = 40  # validation batches
CALIBRATION_STEPS = 12
TIMING_REPEATS = 3
QUALITY = 0.02  # "keeps the teacher's quality": the student's loss within 2 % of the teacher's


def _common(steps: int) -> dict:
    return {**demo_data(2048), "train.max_steps": steps, "train.eval_interval": 0,
            "train.log_interval": 50, "model.seq_length": SEQ,
            "model.max_position_embeddings": SEQ, "train.micro_batch_size": BATCH,
            "train.global_batch_size": BATCH}


def train_distilled(name: str, overrides: dict, seed: int):
    """``common.train`` for a distillation run (the Trainer with MiniLM's hook)."""
    return train(name, overrides, GPT, seed=seed, make_trainer=distiller)


def calibrate(common: dict, teacher) -> dict:
    """CPU seconds per step of the student's ordinary training and of its distillation
    (a teacher forward more), by ``common.step_costs``, stored so that a rerun reuses them."""
    plain = {**common, **STUDENT}
    return step_costs({"plain": plain, "distil": {**plain, "distill.teacher": str(teacher),
                                                  "distill.method": "minilmv2"}},
                      GPT, CALIBRATION_STEPS, make_trainer={"distil": distiller},
                      cache=OUT / NAME / "calibration.json")


def timed_pair(teacher_dir, student_dir) -> tuple[float, float]:
    """CPU seconds of a validation pass (ITERS batches) of the teacher and of the student,
    alternated TIMING_REPEATS times; the fastest pass of each."""
    runs = {}
    for key, run_dir in (("teacher", teacher_dir), ("student", student_dir)):
        cfg = load_config(run_dir / "config.yaml")
        ctx = ParallelContext()
        runs[key] = build_run(cfg, ctx, training=False)
        load_checkpoint(run_dir, runs[key].model, ctx)
    best = {"teacher": math.inf, "student": math.inf}
    for _ in range(TIMING_REPEATS):
        for key, run in runs.items():
            tick = time.process_time()
            evaluation.evaluate(run, "valid", ITERS)
            best[key] = min(best[key], time.process_time() - tick)
    return best["teacher"], best["student"]


def measure(a) -> dict:
    n, half = a.steps, a.steps // 2
    common = _common(n)
    teacher, t_records, t_seconds = train(f"{NAME}/teacher", {
        **common, **TEACHER, "train.max_steps": TEACHER_X * n}, GPT, seed=1)
    t_val = evaluate(teacher, iters=ITERS)
    print(f"teacher: val loss {t_val['loss']:.3f} ({t_seconds:.0f} s)", flush=True)
    cost = calibrate(common, teacher)
    equal_steps = round(half * cost["distil"] / cost["plain"]) + (n - half)
    raw = {"teacher": {"loss": t_val["loss"], "seconds": t_seconds, "steps": TEACHER_X * n},
           "cost": cost, "equal_steps": equal_steps, "seq": SEQ, "batch": BATCH,
           "iters": ITERS, "params_non_embedding": {}, "arms": {}}
    for key, run_dir in (("teacher", teacher),):
        p = count_parameters(load_config(run_dir / "config.yaml"), 1)
        raw["params_non_embedding"][key] = p["total"] - p["embedding"]

    def scratch(steps):
        def one(seed):
            run_dir, _, seconds = train(f"{NAME}/scratch-{steps}", {
                **common, **STUDENT, "train.max_steps": steps}, GPT, seed=seed)
            loss = evaluate(run_dir, iters=ITERS)["loss"]
            p = count_parameters(load_config(run_dir / "config.yaml"), 1)
            raw["params_non_embedding"]["student"] = p["total"] - p["embedding"]
            print(f"scratch {steps} steps seed {seed}: val loss {loss:.3f}", flush=True)
            return {"loss": loss, "seconds": seconds, "run": str(run_dir)}
        return one

    def distilled(seed):
        first, _, s1 = train_distilled(f"{NAME}/minilmv2-distil", {
            **common, **STUDENT, "train.max_steps": half, "distill.teacher": str(teacher),
            "distill.method": "minilmv2"}, seed)
        run_dir, _, s2 = train(f"{NAME}/minilmv2", {
            **common, **STUDENT, "train.max_steps": n - half, "train.load": str(first),
            "train.finetune": True}, GPT, seed=seed)
        loss = evaluate(run_dir, iters=ITERS)["loss"]
        print(f"MiniLMv2 seed {seed}: val loss {loss:.3f}", flush=True)
        return {"loss": loss, "seconds": s1 + s2, "run": str(run_dir)}

    for arm, fn in (("scratch", scratch(n)), ("distilled", distilled),
                    ("scratch_equal_time", scratch(equal_steps)),
                    ("scratch_teacher_steps", scratch(TEACHER_X * n))):
        runs = with_seeds(a.seeds, fn)
        raw["arms"][arm] = {k: [r[k] for r in runs] for k in ("loss", "seconds")}
        if arm == "distilled":
            timings = [timed_pair(teacher, Path(r["run"])) for r in runs]
            raw["speed"] = {"teacher": [t for t, _ in timings],
                            "student": [s for _, s in timings]}
    return raw


def render(raw: dict) -> None:
    steps, seeds, arms = raw["steps"], raw["seeds"], raw["arms"]
    half = steps // 2
    t_loss = raw["teacher"]["loss"]
    scratch, dist, eq = arms["scratch"]["loss"], arms["distilled"]["loss"], \
        arms["scratch_equal_time"]["loss"]
    v_steps = compare(dist, scratch)
    v_time = compare(dist, eq)
    verdict_distil = combine([v_steps, v_time])
    speed = [t / s for t, s in zip(raw["speed"]["teacher"], raw["speed"]["student"],
                                   strict=True)]
    # the size's cost: a student trained as long as the teacher (else the distilled one,
    # whose gap also holds its TEACHER_X-times shorter training)
    same_steps = "scratch_teacher_steps" in arms
    sized = arms["scratch_teacher_steps"]["loss"] if same_steps else dist
    sized_text = (f"a half-size student trained the teacher's {raw['teacher']['steps']} steps "
                  "from scratch" if same_steps else
                  f"the distilled student (trained {TEACHER_X}x fewer steps than the teacher: "
                  "the gap also holds that)")
    retained = [x / t_loss - 1 for x in sized]  # the student's loss above the teacher's
    v_fast = compare(raw["speed"]["student"], raw["speed"]["teacher"])
    v_quality = within(retained, QUALITY)
    verdict_trade = combine([v_fast, v_quality])
    cost = raw["cost"]
    teacher_steps_text = (f"; and {raw['teacher']['steps']} steps, the teacher's, for the "
                          "size's cost alone (claim 2)" if same_steps else "")
    total = raw["teacher"]["seconds"] + sum(sum(arm["seconds"]) for arm in arms.values())
    rows = ["| model | steps | training s | val loss | val perplexity |", "|---|---|---|---|---|",
            f"| teacher (4 layers, h 128; one seed) | {raw['teacher']['steps']} | "
            f"{raw['teacher']['seconds']:.0f} | {t_loss:.3f} | {math.exp(t_loss):.1f} |"]
    for arm, label, n in (
            ("scratch", "student from scratch", str(steps)),
            ("distilled", "MiniLMv2 student", f"{half} distil + {steps - half} own"),
            ("scratch_equal_time", "student from scratch, the distilled student's cost",
             str(raw["equal_steps"])),
            ("scratch_teacher_steps", "student from scratch, the teacher's steps",
             str(raw["teacher"]["steps"]))):
        if arm not in arms:
            continue
        r = arms[arm]
        rows.append(f"| {label} | {n} | {show(r['seconds'], 0)} | {show(r['loss'], 3)} | "
                    f"{show([math.exp(x) for x in r['loss']], 1)} |")
    pairs = ["| comparison (same seeds) | per-seed difference in val loss | verdict |",
             "|---|---|---|",
             f"| distilled minus scratch, equal student steps | "
             f"{', '.join(f'{d:+.3f}' for d in paired(dist, scratch))} | {v_steps} |",
             f"| distilled minus scratch, equal cost | "
             f"{', '.join(f'{d:+.3f}' for d in paired(dist, eq))} | {v_time} |"]
    pne = raw["params_non_embedding"]
    condition = (f"at a 4-layer h128 teacher, 2-layer h64 students, {steps} student steps of "
                 f"{raw['batch']} x {raw['seq']} tokens")
    trade_condition = (f"at a 4-layer h128 teacher and 2-layer h64 students, both "
                       f"{raw['teacher']['steps']} steps" if same_steps else condition)
    measured_d = (f"val loss: distilled {show(dist, 3)} vs scratch {show(scratch, 3)} (equal "
                  f"steps), {show(eq, 3)} (equal cost); teacher {t_loss:.3f}")
    measured_t = (f"student {show(speed, 1)}x faster than the teacher; its loss "
                  f"{show([100 * r for r in retained], 0)} % above the teacher's")
    _plot(raw)
    write_section(NAME, f"""
## MiniLM: self-attention distillation and the small student (Wang et al. 2020, 2021)

Claims: (1) a student that learns the teacher's last-layer self-attention relations, then
its task, is better than the same student trained alone; (2) a student with half the
layers and half the width runs several times faster and keeps most of the teacher's
quality.

**Design.** A causal GPT (language modelling on the standard library's docstrings, a 2k
BPE, {raw['batch']} sequences of {raw['seq']} tokens per step), TP=1. The teacher (4 layers,
hidden 128, {pne['teacher'] / 1e6:.2f} M parameters without embeddings) is trained
{raw['teacher']['steps']} steps, {TEACHER_X}x the students', so that
it is clearly better than any student here (the old page's teacher was barely trained:
nothing to distil); it is one run (seed 1), the students have {seeds} seeds. Students: 2
layers, hidden 64 ({pne['student'] / 1e6:.2f} M without embeddings), the papers' "half the
layers and half the width". MiniLMv2 students: {half}
steps of relation distillation (Q-Q, K-K, V-V relations of the teacher's last layer, plus
half the student's own loss, as a GPT student's output layer needs), then {steps - half}
steps of their own loss from those weights (`train.finetune`). From scratch: {steps} steps
(equal student steps) and {raw['equal_steps']} steps (equal cost: a distillation step costs
{cost['distil'] * 1000:.0f} ms of CPU against {cost['plain'] * 1000:.0f} ms for an ordinary
one, measured back to back in the same process over {CALIBRATION_STEPS} alternated steps, not
wall time on the shared machine){teacher_steps_text}. Validation: the same {raw['iters']}
batches. Speed: CPU
time of that validation pass, teacher and student alternated {TIMING_REPEATS} times (the
fastest of each), per student seed. **Seeds**: {seeds} per student arm, {SPREAD} in
brackets. Command: `{raw['command']}` ({raw['minutes']} min for its last invocation, runs
finished before read back; the training loops of all runs, wall time: {total / 60:.1f} min).
Machine: {raw['machine']}.

{chr(10).join(rows)}

Paired by seed (negative: the distilled student has the lower loss):

{chr(10).join(pairs)}

The half-size student evaluates {show(speed, 1)}x faster than the teacher (CPU time); the
quality it gives up: the loss of {sized_text} is {show([100 * r for r in retained], 1)} %
above the teacher's ("keeps most of the quality" read as: within {QUALITY:.0%} of the
teacher's loss; the papers' figure is downstream accuracy, not loss). Equal cost counts
the students' training only: the teacher's own training ({raw['teacher']['seconds']:.0f} s)
is given, as in the papers.

**Verdicts** (by the rule), {condition}: distillation beats training alone: **{verdict_distil}**
(equal steps {v_steps}, equal cost {v_time}); half the layers and width, faster and close in
quality: **{verdict_trade}** (faster: {v_fast}; within {QUALITY:.0%} of the teacher's loss:
{v_quality}).
**What this can and cannot show.** It tests the mechanism (attention relations carry
something a student can use) on a causal language model the students can learn in
minutes; it is not the papers' setting (a BERT teacher trained for days, students
fine-tuned on GLUE and SQuAD, where "quality" is downstream accuracy, not language-model
loss), and the teacher is one run, so its own seed-to-seed spread is not measured.

![validation loss per arm, seeds as dots](img/minilm.png)
""", toc=[
        {"paper": "minilm", "claim": "a student distilled from the teacher's self-attention "
                                     "relations beats the same student trained alone",
         "measured": measured_d, "verdict": verdict_distil, "condition": condition,
         "seeds": seeds, "spread": SPREAD},
        {"paper": "minilm", "claim": "half the layers and half the width: several times "
                                     "faster, most of the teacher's quality",
         "measured": measured_t, "verdict": verdict_trade, "condition": trade_condition,
         "seeds": seeds, "spread": SPREAD}])


def _plot(raw: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"scratch": "scratch,\nequal steps", "distilled": "MiniLMv2\ndistilled",
              "scratch_equal_time": "scratch,\nequal cost"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, arm in enumerate(labels):
        values = raw["arms"][arm]["loss"]
        ax.bar(i, sum(values) / len(values), 0.6, color="tab:blue" if i != 1 else "tab:orange")
        ax.plot([i] * len(values), values, "k.", markersize=8)
    ax.axhline(raw["teacher"]["loss"], color="grey", linestyle=":", label="teacher")
    ax.set_xticks(range(len(labels)), list(labels.values()))
    low = min(min(raw["arms"][a]["loss"]) for a in labels)
    ax.set_ylim(min(low, raw["teacher"]["loss"]) - 0.2,
                max(max(raw["arms"][a]["loss"]) for a in labels) + 0.1)
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(f"2-layer h64 students, {raw['steps']} steps ({raw['seeds']} seeds, dots)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, "minilm.png")


if __name__ == "__main__":
    run_experiment(NAME, __doc__, measure, render, steps=300, seeds=2)
