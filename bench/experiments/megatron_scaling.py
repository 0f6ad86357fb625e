"""Scaling (Shoeybi et al. 2019, Megatron-LM): wider is better at the same data and steps;
tensor parallelism keeps per-rank work constant as the model grows (weak scaling).

    python bench/experiments/megatron_scaling.py [--steps 400]   # ~9 minutes on 2 CPU cores

Part 1, the paper's premise: the same data and steps for three widths at a constant
hidden size per attention head (the paper keeps 96; here 32), 4 layers, the demo's tiny
GPT-2 otherwise; validation perplexity against non-embedding parameters.

Part 2, the shape of the paper's weak-scaling table on this machine: the model at TP=1 in
one process, and a wider one at TP=2 in two processes (torchrun, gloo), chosen so that
each rank does about the same model FLOPs per step; one thread per process, so each
process has one core. Reported: tokens/s and model FLOP/s per process, and the TP=2
efficiency (per-process FLOP/s at TP=2 over TP=1).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

from common import (
    OUT,
    ROOT,
    arguments,
    demo_data,
    evaluate,
    load_config,
    machine,
    save_figure,
    train,
    write_section,
)

from megatron_lite.plan import count_parameters
from megatron_lite.training.metrics import model_flops_per_step

HEAD = 32
WIDTHS = (64, 128, 256)
WEAK_HIDDEN = 256  # the TP=1 model of part 2
WEAK_STEPS = 40
ITERS = 20


def main() -> None:
    a = arguments(__doc__, steps=400)
    start = time.time()
    data = demo_data()
    results = {}
    for width in WIDTHS:
        run_dir, records, seconds = train(f"megatron_scaling/h{width}", {
            **data, "train.max_steps": a.steps, "train.eval_interval": 0,
            "train.log_interval": 50, "model.hidden_size": width,
            "model.num_attention_heads": width // HEAD})
        params = count_parameters(load_config(run_dir / "config.yaml"), 1)
        ppl = math.exp(evaluate(run_dir, iters=ITERS)["loss"])
        results[width] = {"params": params["total"] - params["embedding"],
                          "total": params["total"], "ppl": ppl, "seconds": seconds}
        print(f"hidden {width}: {results[width]['params'] / 1e6:.2f} M non-embedding "
              f"parameters, validation perplexity {ppl:.1f} ({seconds:.0f} s)", flush=True)
    weak = weak_scaling(data)
    _plot(results)
    rows = ["| hidden | heads | parameters (non-embedding / total) | validation perplexity "
            "| training time |", "|---|---|---|---|---|"]
    for width, r in results.items():
        rows.append(f"| {width} | {width // HEAD} | {r['params'] / 1e6:.2f} M / "
                    f"{r['total'] / 1e6:.2f} M | {r['ppl']:.1f} | {r['seconds']:.0f} s |")
    ppls = [results[w]["ppl"] for w in WIDTHS]
    monotone = all(x > y for x, y in zip(ppls, ppls[1:], strict=False))
    one, two = weak["1"], weak["2"]
    efficiency = two["flops_per_proc"] / one["flops_per_proc"]
    weak_rows = ["| layout | hidden | processes | model GFLOP per rank per step | tokens/s per "
                 "process | model GFLOP/s per process |", "|---|---|---|---|---|---|"]
    for tp, r in weak.items():
        weak_rows.append(f"| TP={tp} | {r['hidden']} | {tp} | {r['rank_flops'] / 1e9:.2f} | "
                         f"{r['tokens_per_proc']:.0f} | {r['flops_per_proc'] / 1e9:.2f} |")
    verdict = "agrees" if monotone else "partly"
    measured = (f"perplexity {' > '.join(f'{p:.0f}' for p in ppls)} for hidden "
                f"{'/'.join(map(str, WIDTHS))}; TP=2 weak-scaling efficiency "
                f"{efficiency:.0%} on 2 cores")
    write_section("megatron_scaling", f"""
## Scaling with width, and tensor-parallel weak scaling (Shoeybi et al. 2019, Megatron-LM)

Claim (the paper's premise): larger models, trained on the same data, reach lower
perplexity, and tensor parallelism lets the model grow with the number of processors at
nearly constant per-processor throughput (77 % weak-scaling efficiency at 8-way TP in the
paper's table). Command: `python bench/experiments/megatron_scaling.py --steps {a.steps}`
({(time.time() - start) / 60:.0f} min). Machine: {machine()}. One seed.

Width at a constant {HEAD} per head (the paper keeps 96): tiny GPT-2, 4 layers, seq 128,
batch 16, {a.steps} steps, lr 1e-3 cosine, the demo's 8k BPE data, TP=1; validation
perplexity on the same {ITERS} batches.

{chr(10).join(rows)}

{"Perplexity falls with every step up in width, as the paper's premise says." if monotone
 else "Perplexity does not fall with every step up in width here."} At this step count the
wider models are also further from converged per parameter, so the gap measures the
early part of training, not the end point the paper reports.

Weak scaling, {WEAK_STEPS} steps, the median of the logged throughputs after the first:
the TP=2 model's hidden size is chosen so that each rank's model FLOPs per step match the
TP=1 model's as closely as the head count allows (vocabulary-parallel embedding and
logits included), one thread per process.

{chr(10).join(weak_rows)}

TP=2 efficiency (model FLOP/s per process, TP=2 over TP=1): {efficiency:.0%}. What a
2-core CPU can show: the cost of the two all-reduces per layer in forward and two in
backward over gloo (shared memory) relative to the compute between them, with each
process on its own core. What it cannot: the paper's 8- and 512-GPU numbers, NVLink or
InfiniBand bandwidth, or overlap with a GPU's compute; two processes also share this
machine's memory bandwidth, which a GPU pair does not.

![validation perplexity vs parameters](img/megatron_scaling.png)
""", toc={"paper": "megatron", "claim": "larger models reach lower perplexity; TP scales "
                                       "with constant per-rank work", "measured": measured,
          "verdict": verdict})


def weak_scaling(data: dict) -> dict[str, dict]:
    """Per-process throughput of the TP=1 model and of a wider TP=2 model with about the
    same model FLOPs per rank, each process on one thread."""
    cfg = load_config(ROOT / "configs/gpt2/tiny-cpu.yaml", [f"{k}={v}" for k, v in data.items()])
    cfg.model.vocab_size = 8192
    gb, seq = cfg.train.global_batch_size, cfg.model.seq_length

    def rank_flops(hidden: int, tp: int) -> float:
        cfg.model.hidden_size = hidden  # ffn_size follows (4h)
        return model_flops_per_step(cfg.model, gb, seq) / tp

    target = rank_flops(WEAK_HIDDEN, 1)
    hidden2 = min(range(2 * HEAD, 4 * WEAK_HIDDEN, 2 * HEAD),
                  key=lambda h: abs(rank_flops(h, 2) - target))
    out = {}
    for tp, hidden in ((1, WEAK_HIDDEN), (2, hidden2)):
        run_dir = OUT / "megatron_scaling" / f"weak-tp{tp}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
        over = {**data, "parallel.tensor_parallel_size": tp, "train.run_dir": run_dir,
                "train.max_steps": WEAK_STEPS, "train.log_interval": 5,
                "train.eval_interval": 0, "train.save_interval": 0,
                "log.tensorboard": False, "model.hidden_size": hidden,
                "model.num_attention_heads": hidden // HEAD}
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2"] if tp == 2 else []
        log = run_dir.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out_file:
            done = subprocess.run([sys.executable, *launcher, "-m", "megatron_lite.train",
                                   "configs/gpt2/tiny-cpu.yaml",
                                   *(f"{k}={v}" for k, v in over.items())],
                                  cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                  stdout=out_file, stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"the TP={tp} weak-scaling run failed (exit {done.returncode}): see {log}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        tokens = statistics.median(r["tokens_per_sec"] for r in records[1:])
        flops = rank_flops(hidden, tp)
        out[str(tp)] = {"hidden": hidden, "rank_flops": flops, "tokens_per_proc": tokens / tp,
                        "flops_per_proc": flops * tokens / (gb * seq)}
        print(f"TP={tp} hidden {hidden}: {tokens / tp:.0f} tokens/s per process, "
              f"{out[str(tp)]['flops_per_proc'] / 1e9:.2f} GFLOP/s per process", flush=True)
    return out


def _plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["params"] / 1e6 for r in results.values()]
    y = [r["ppl"] for r in results.values()]
    ax.plot(x, y, "o-")
    for width, xi, yi in zip(results, x, y, strict=False):
        ax.annotate(f"h {width}", (xi, yi), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters (M)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Same data and steps, wider models")
    fig.tight_layout()
    save_figure(fig, "megatron_scaling.png")


if __name__ == "__main__":
    main()
