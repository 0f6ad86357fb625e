"""Training-step throughput, bf16 memory per parameter and activation checkpointing.

    python bench/train_step.py            # all three tables (about 5 minutes on 2 cores)
    python bench/train_step.py --quick    # fewer timed steps
    python bench/train_step.py --table throughput|memory|loss|checkpoint|llama

Table 1: forward + backward + AdamW of a tiny GPT-2 (6 layers, hidden 256, 4 heads,
seq 256, batch 8, vocab 50257) for megatron-lite (TP=1) eager and with
``train.compile`` (its regions compiled), a plain single-file PyTorch GPT-2
(bench/plain_gpt.py) and transformers' GPT2LMHeadModel, in fp32 and bf16 autocast,
and in bf16 megatron-lite with ``train.params_dtype=bf16`` too. Implementations are
timed round-robin and the median step is reported, with the fraction of this CPU's
matmul peak (square matmuls, measured first). A CPU without native bf16 matmuls
(AVX2 only) has its bf16 rows skipped: they would time a fallback, not the model.
A profiled eager step then says how much of it compile could fuse at all (what is
neither a matmul nor a dropout draw).

Table 2: bf16 autocast against ``train.params_dtype=bf16``: bytes per parameter of the
training state, counted from the tensors after a step, and activation bytes autograd
saves in a forward (parameters excluded), in total and inside the transformer layers.

Table 3: the output layer + loss by ``model.loss_chunk_tokens`` (0: unchunked, the full
``[tokens, V]`` logits and fp32 exponentials kept for backward): bytes it saves for
backward, its forward + backward time, a step's time and peak memory (fresh processes).

Table 4: activation checkpointing none / selective / full on 12 layers at seq 512:
step time, bytes autograd saved for backward (the activation memory), and peak RSS
growth of a fresh process over a step.

Table 4: a Llama-family decoder (6 layers, hidden 256, 4 heads on 2 K/V heads, SwiGLU
688, rotary positions, RMSNorm, no biases, untied head, seq 256, batch 8, SmolLM2's
vocab 49152): megatron-lite (TP=1) eager and compiled against transformers'
LlamaForCausalLM of the same shape, fwd + bwd + AdamW, timed round-robin as table 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_gpt import PlainGPT  # noqa: E402

from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.models import GPTModel  # noqa: E402
from megatron_lite.parallel import ParallelContext  # noqa: E402
from megatron_lite.training.compile import compile_model  # noqa: E402
from megatron_lite.training.mixed import MainParams  # noqa: E402

VOCAB = 50257
# "unchunked": model.loss_chunk_tokens=0, the output layer + loss as before issue 44
IMPLS = ("megatron-lite", "megatron-lite unchunked", "megatron-lite+compile", "plain",
         "transformers")
# train.params_dtype=bf16 (Megatron's mixed precision), bf16 rows only
PARAMS_IMPLS = ("megatron-lite bf16-params", "megatron-lite bf16-params+compile")


def model_flops(b: int, s: int, layers: int, h: int, vocab: int) -> float:
    """Forward + backward FLOPs of one step (Narayanan et al. 2021, without recompute)."""
    return 72 * b * s * layers * h * h * (1 + s / (6 * h) + vocab / (12 * h * layers))


def build(impl: str, layers: int, h: int, heads: int, seq: int, ckpt: str = "none",
          chunk: int | None = None):
    torch.manual_seed(0)
    if impl.startswith("megatron-lite"):
        if chunk is None:
            chunk = 0 if "unchunked" in impl else ModelConfig.loss_chunk_tokens
        cfg = ModelConfig(num_layers=layers, hidden_size=h, num_attention_heads=heads,
                          seq_length=seq, max_position_embeddings=seq, vocab_size=VOCAB,
                          activation_checkpointing=ckpt, loss_chunk_tokens=chunk)
        ctx = ParallelContext()
        model = GPTModel(cfg, ctx)
        mixed = MainParams(model) if "bf16-params" in impl else None  # as the Trainer does
        if impl.endswith("compile"):  # what train.compile=true does
            compile_model(model, ctx)
        return model, lambda ids, labels: model(ids, labels), mixed
    if impl == "plain":
        model = PlainGPT(VOCAB + 47, seq, h, heads, layers)  # padded to 50304 like ours
        return model, lambda ids, labels: model(ids, labels), None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    cfg = transformers.GPT2Config(n_layer=layers, n_embd=h, n_head=heads, n_positions=seq,
                                  vocab_size=VOCAB)
    model = transformers.GPT2LMHeadModel(cfg)
    return model, lambda ids, labels: model(input_ids=ids, labels=ids).loss, None


LLAMA = dict(layers=6, h=256, heads=4, groups=2, ffn=688, seq=256, batch=8, vocab=49152)


def build_llama(impl: str):
    """Table 4's model: ours (eager or compiled) or transformers' LlamaForCausalLM."""
    L = LLAMA
    torch.manual_seed(0)
    if impl.startswith("megatron-lite"):
        cfg = ModelConfig(num_layers=L["layers"], hidden_size=L["h"],
                          num_attention_heads=L["heads"], num_query_groups=L["groups"],
                          ffn_hidden_size=L["ffn"], seq_length=L["seq"],
                          max_position_embeddings=L["seq"], vocab_size=L["vocab"],
                          normalization="rmsnorm", activation="swiglu",
                          position_embedding="rope", add_bias_linear=False,
                          untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                          attention_dropout=0.0)
        ctx = ParallelContext()
        model = GPTModel(cfg, ctx)
        if impl.endswith("compile"):
            compile_model(model, ctx)
        return model, lambda ids, labels: model(ids, labels)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=L["vocab"], hidden_size=L["h"], intermediate_size=L["ffn"],
        num_hidden_layers=L["layers"], num_attention_heads=L["heads"],
        num_key_value_heads=L["groups"], max_position_embeddings=L["seq"],
        tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    return model, lambda ids, labels: model(input_ids=ids, labels=ids).loss


def llama_table(timed_steps: int, precision: str = "fp32") -> list[dict]:
    """Table 4: steps of ours and transformers' Llama, round-robin, median."""
    L = LLAMA
    steps = {}
    for impl in ("megatron-lite", "megatron-lite+compile", "transformers"):
        model, loss_fn = build_llama(impl)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        ids = torch.randint(0, L["vocab"], (L["batch"], L["seq"]),
                            generator=torch.Generator().manual_seed(1))
        labels = torch.roll(ids, -1, 1)

        def step(model=model, loss_fn=loss_fn, opt=opt, ids=ids, labels=labels):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(ids, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        steps[impl] = step
    times = {impl: [] for impl in steps}
    for step in steps.values():  # warm-up (and compilation)
        step(), step(), step()
    for _ in range(timed_steps):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - t0)
    tokens = L["batch"] * L["seq"]
    return [{"precision": precision, "impl": impl, "step_s": statistics.median(ts),
             "tokens_per_s": tokens / statistics.median(ts)} for impl, ts in times.items()]


def make_step(impl, precision, layers, h, heads, seq, batch, ckpt="none", parts=None,
              chunk=None):
    """A function running one training step; ``parts`` (a dict) receives the model,
    optimizer, inputs and MainParams, for the memory table."""
    model, loss_fn, mixed = build(impl, layers, h, heads, seq, ckpt, chunk)
    model.train()
    # every implementation steps the AdamW megatron-lite's trainer builds on a CPU (fused:
    # one pass over each tensor, build_optimizer), so the table compares the models
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = torch.roll(ids, -1, 1)  # megatron-lite and plain take shifted labels
    autocast = precision == "bf16" and mixed is None
    masters = (lambda: mixed.fp32(grads=True)) if mixed is not None else contextlib.nullcontext

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(ids, labels)
        loss.backward()
        with masters():
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    if parts is not None:
        parts.update(model=model, opt=opt, ids=ids, labels=labels, mixed=mixed,
                     loss_fn=loss_fn, autocast=autocast)
    return step


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the best of ``reps`` square ``n x n`` matmuls: this CPU's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm")
RNG_OPS = ("aten::bernoulli_", "aten::uniform_", "aten::rand")


def step_profile(layers=6, h=256, heads=4, seq=256, batch=8) -> dict:
    """Where an eager fp32 step of the throughput model spends its CPU time (self time of
    one profiled step): matmuls, dropout's random draws, and everything else, the part
    that ``torch.compile`` can fuse."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step("megatron-lite", "fp32", layers, h, heads, seq, batch)
    step(), step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    share = {name: sum(e.self_cpu_time_total for e in events if e.key in ops) / total
             for name, ops in (("matmul", MATMUL_OPS), ("rng", RNG_OPS))}
    share["other"] = 1 - share["matmul"] - share["rng"]
    rest = sorted((e for e in events if e.key not in MATMUL_OPS + RNG_OPS),
                  key=lambda e: -e.self_cpu_time_total)
    share["top"] = [(e.key, e.self_cpu_time_total / total) for e in rest[:8]]
    return share


def bf16_native(peaks: dict) -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX): an AVX2-only CPU runs
    bf16 matmuls through a slow fallback, hundreds of times below fp32, and its bf16 rows
    would time that fallback, not megatron-lite."""
    return peaks["bf16"] >= 0.5 * peaks["fp32"]


def throughput_table(timed_steps: int, precisions=("fp32", "bf16")) -> list[dict]:
    layers, h, heads, seq, batch = 6, 256, 4, 256, 8
    flops = model_flops(batch, seq, layers, h, VOCAB)
    rows = []
    for precision in precisions:
        impls = IMPLS + (PARAMS_IMPLS if precision == "bf16" else ())
        steps = {impl: make_step(impl, precision, layers, h, heads, seq, batch)
                 for impl in impls}
        times = {impl: [] for impl in steps}
        for step in steps.values():  # warm-up (and compilation)
            step(), step(), step()
        for _ in range(timed_steps):  # round-robin: machine noise hits all alike
            for impl, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[impl].append(time.perf_counter() - t0)
        for impl, ts in times.items():
            med = statistics.median(ts)
            rows.append({"precision": precision, "impl": impl, "step_s": med,
                         "tokens_per_s": batch * seq / med, "gflops": flops / med / 1e9})
    return rows


@contextlib.contextmanager
def saved_bytes(model: nn.Module | None = None):
    """Count the bytes autograd keeps for backward (each storage once); with ``model``,
    not its parameters (saved, but no extra memory) and also those saved inside
    ``model.transformer``'s forward (``total["layers"]``)."""
    seen, total, inside = set(), {"all": 0, "layers": 0}, [False]
    if model is not None:
        seen.update(p.untyped_storage().data_ptr() for p in model.parameters())

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total["all"] += storage.nbytes()
            total["layers"] += storage.nbytes() if inside[0] else 0
        return t

    hooks = [] if model is None else [
        model.transformer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
        model.transformer.register_forward_hook(lambda *_: inside.__setitem__(0, False))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield total
    finally:
        for h in hooks:
            h.remove()


def memory_table(batch: int) -> list[dict]:
    """bf16 autocast vs train.params_dtype=bf16 on the throughput model: the bytes per
    parameter of the training state (weights, gradients, masters, Adam moments, counted
    from the tensors after a step) and of the activations autograd saves in a forward."""
    layers, h, heads, seq = 6, 256, 4, 256
    rows = []
    for impl in ("megatron-lite", "megatron-lite bf16-params"):
        parts: dict = {}
        step = make_step(impl, "bf16", layers, h, heads, seq, batch, parts=parts)
        step()
        model, mixed = parts["model"], parts["mixed"]
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        state = sum(p.numel() * p.element_size() for p in params)
        if mixed is None:  # fp32 gradients, alive from backward to the step
            state += sum(p.numel() * 4 for p in params)
        else:  # fp32 main grads and masters
            state += sum(p.main_grad.numel() * 4 for p in params) + \
                sum(m.numel() * 4 for m in mixed.masters)
        state += sum(v.numel() * v.element_size() for st in parts["opt"].state.values()
                     for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
        with saved_bytes(model) as saved:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=parts["autocast"]):
                loss = parts["loss_fn"](parts["ids"], parts["labels"])
        del loss
        rows.append({"impl": impl, "params": n, "state_b": state / n,
                     "act_mib": saved["all"] / 2**20, "layers_mib": saved["layers"] / 2**20,
                     "total_b": (state + saved["all"]) / n})
    return rows


def checkpoint_child(mode: str, timed_steps: int) -> dict:
    """One checkpointing mode in this (fresh) process: time, saved bytes, peak RSS growth."""
    layers, h, heads, seq, batch = 12, 256, 4, 512, 8
    step = make_step("megatron-lite", "fp32", layers, h, heads, seq, batch, mode)
    step()  # allocates AdamW state and warms up
    with open("/proc/self/statm") as f:
        rss0 = int(f.read().split()[1]) * resource.getpagesize()
    times = []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    model, loss_fn, _ = build("megatron-lite", layers, h, heads, seq, mode)
    ids = torch.randint(0, VOCAB, (batch, seq))
    with saved_bytes() as total:
        loss = loss_fn(ids, ids)
    del loss
    return {"mode": mode, "step_s": statistics.median(times), "saved_mib": total["all"] / 2**20,
            "peak_growth_mib": peak / 2**20}


def loss_child(chunk: int, timed_steps: int) -> dict:
    """One ``model.loss_chunk_tokens`` setting in this (fresh) process, the throughput
    model in fp32: the bytes the output layer + loss saves for backward, the time of its
    forward + backward alone and of a whole step, the process's peak RSS and how far a
    step's peak rises over the steady state (RSS after a first step)."""
    layers, h, heads, seq, batch = 6, 256, 4, 256, 8
    parts: dict = {}
    step = make_step("megatron-lite", "fp32", layers, h, heads, seq, batch, parts=parts,
                     chunk=chunk)
    step()  # allocates AdamW state and warms up
    with open("/proc/self/statm") as f:
        rss0 = int(f.read().split()[1]) * resource.getpagesize()
    times = []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model, labels = parts["model"], parts["labels"]
    x = torch.randn(batch, seq, h, requires_grad=True)  # the final hidden states
    with saved_bytes(model) as saved:
        loss = model.loss(x, labels)
    del loss
    head = []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        model.loss(x, labels).backward()
        head.append(time.perf_counter() - t0)
    return {"chunk": chunk, "saved_mib": saved["all"] / 2**20,
            "head_s": statistics.median(head), "step_s": statistics.median(times),
            "peak_mib": peak / 2**20, "peak_growth_mib": (peak - rss0) / 2**20}


def loss_table(timed_steps: int, chunks) -> list[dict]:
    rows = []
    for chunk in chunks:
        out = subprocess.run([sys.executable, __file__, "--loss-child", str(chunk),
                              "--steps", str(timed_steps)], check=True, capture_output=True,
                             text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def print_loss(steps: int, chunks=(0, 256, 1024, 2048)) -> None:
    default = ModelConfig.loss_chunk_tokens
    print("\nOutput layer + cross-entropy by model.loss_chunk_tokens (0 = unchunked, as before "
          f"issue 44; default {default}), GPT-2 6L h256, seq 256, batch 8, vocab 50257, fp32")
    print(f"{'chunk':>6}{'head+loss saved MiB':>21}{'x before':>10}{'head+loss s':>13}"
          f"{'step s':>8}{'peak RSS MiB':>14}{'step peak over steady MiB':>27}")
    rows = loss_table(steps, chunks)
    base = rows[0]
    for r in rows:
        print(f"{r['chunk']:>6}{r['saved_mib']:>21.1f}{r['saved_mib'] / base['saved_mib']:>9.3f}x"
              f"{r['head_s']:>13.3f}{r['step_s']:>8.3f}{r['peak_mib']:>14.0f}"
              f"{r['peak_growth_mib']:>27.0f}")


def checkpoint_table(timed_steps: int) -> list[dict]:
    rows = []
    for mode in ("none", "selective", "full"):
        out = subprocess.run([sys.executable, __file__, "--ckpt-child", mode,
                              "--steps", str(timed_steps)], check=True, capture_output=True,
                             text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps instead of 7")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--table", choices=("all", "throughput", "memory", "checkpoint",
                                            "loss", "llama"), default="all")
    parser.add_argument("--ckpt-child", help=argparse.SUPPRESS)
    parser.add_argument("--loss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunks", default="0,256,1024,2048",
                        help="model.loss_chunk_tokens settings of the loss table (0 first)")
    parser.add_argument("--fp32-only", action="store_true", help="no bf16 rows")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 7)
    if args.ckpt_child:
        print(json.dumps(checkpoint_child(args.ckpt_child, steps)))
        return
    if args.loss_child is not None:
        print(json.dumps(loss_child(args.loss_child, steps)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; median of {steps} steps\n")
    measured = peaks()
    if args.table in ("all", "throughput"):
        print_throughput(steps, measured, args.fp32_only)
    if args.table in ("all", "memory"):
        print_memory(measured)
    if args.table in ("all", "loss"):
        print_loss(steps, [int(c) for c in args.chunks.split(",")])
    if args.table in ("all", "checkpoint"):
        print_checkpointing(steps)
    if args.table in ("all", "llama"):
        print_llama(steps, measured)


def peaks() -> dict:
    out = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16, n=512)}
    if bf16_native(out):  # NOTE: a slow fallback at 2048^3 would take minutes
        out["bf16"] = matmul_peak(torch.bfloat16)
    return out


def print_throughput(steps: int, peaks: dict, fp32_only: bool = False) -> None:
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    precisions = ("fp32", "bf16") if bf16_native(peaks) and not fp32_only else ("fp32",)
    if len(precisions) == 1 and not fp32_only:
        print("bf16 rows skipped: this CPU has no native bf16 matmul (AVX2 only; bf16 runs "
              f"at {peaks['bf16'] / peaks['fp32']:.3f} of fp32)")
    print("GPT-2 6L h256 4 heads, seq 256, batch 8, vocab 50257: fwd + bwd + AdamW")
    print(f"{'precision':<10}{'implementation':<35}{'step s':>8}{'tokens/s':>10}"
          f"{'GFLOP/s':>9}{'of peak':>8}{'vs eager':>10}{'vs plain':>10}{'vs HF':>7}")
    rows = throughput_table(steps, precisions)
    for r in rows:
        peers = {x["impl"]: x["tokens_per_s"] for x in rows if x["precision"] == r["precision"]}
        tps = r["tokens_per_s"]
        print(f"{r['precision']:<10}{r['impl']:<35}{r['step_s']:>8.3f}{tps:>10.0f}"
              f"{r['gflops']:>9.1f}{r['gflops'] * 1e9 / peaks[r['precision']]:>8.2f}"
              f"{tps / peers['megatron-lite']:>9.2f}x"
              f"{tps / peers['plain']:>9.2f}x{tps / peers['transformers']:>6.2f}x")
    share = step_profile()
    print(f"eager fp32 step, self CPU time: {share['matmul']:.0%} matmuls, {share['rng']:.0%} "
          f"dropout draws (kept eager under compile), {share['other']:.0%} the rest: compile "
          f"can gain at most {1 / (1 - share['other']):.2f}x by fusing all of the rest away")
    print("  the rest's largest ops: " + ", ".join(f"{k} {v:.1%}" for k, v in share["top"]))
    fp32 = {r["impl"]: r["tokens_per_s"] for r in rows if r["precision"] == "fp32"}
    gain = fp32["megatron-lite+compile"] / fp32["megatron-lite"]
    verdict = "a win" if gain >= 1.1 else (
        "not a win, so train.compile stays off by default: the matmuls (the bulk above) run "
        "the same compiled or not, dropout's draws stay eager for eager-identical masks, "
        f"and fusing all of the rest could give at most {1 / (1 - share['other']):.2f}x")
    print(f"compile: {gain:.2f}x eager in fp32 here, {verdict}")


def print_memory(peaks: dict) -> None:
    # NOTE: bytes do not depend on speed; without native bf16 a batch of 1 keeps this short
    batch = 8 if bf16_native(peaks) else 1
    print(f"\nbf16 memory per parameter, the throughput model at batch {batch} (weights + "
          "grads + masters + Adam; activations saved in a forward)")
    print(f"{'implementation':<35}{'state B/param':>14}{'activations MiB':>17}"
          f"{'of which layers':>17}{'total B/param':>15}")
    for r in memory_table(batch):
        print(f"{r['impl']:<35}{r['state_b']:>14.1f}{r['act_mib']:>17.0f}"
              f"{r['layers_mib']:>17.0f}{r['total_b']:>15.1f}")
    print("(parameters not counted; autocast's bf16 weight copies are; the rest of the "
          "activations: the embedding and the output layer's logits and fp32 softmax)")


def print_checkpointing(steps: int) -> None:
    print("\nActivation checkpointing, megatron-lite 12L h256, seq 512, batch 8, fp32")
    print(f"{'mode':<11}{'step s':>8}{'x none':>8}{'saved MiB':>11}{'x none':>8}"
          f"{'peak growth MiB':>17}")
    rows = checkpoint_table(max(2, steps // 2))
    base = rows[0]
    for r in rows:
        print(f"{r['mode']:<11}{r['step_s']:>8.3f}{r['step_s'] / base['step_s']:>7.2f}x"
              f"{r['saved_mib']:>11.0f}{r['saved_mib'] / base['saved_mib']:>7.2f}x"
              f"{r['peak_growth_mib']:>17.0f}")


def print_llama(steps: int, peaks: dict) -> None:
    L = LLAMA
    print(f"\nLlama {L['layers']}L h{L['h']}, {L['heads']} heads on {L['groups']} K/V heads, "
          f"SwiGLU {L['ffn']}, seq {L['seq']}, batch {L['batch']}, vocab {L['vocab']}: "
          "fwd + bwd + AdamW")
    print(f"{'precision':<10}{'implementation':<26}{'step s':>8}{'tokens/s':>10}{'vs HF':>8}")
    for precision in ("fp32", "bf16") if bf16_native(peaks) else ("fp32",):
        rows = llama_table(steps, precision)
        hf = next(r for r in rows if r["impl"] == "transformers")["tokens_per_s"]
        for r in rows:
            print(f"{r['precision']:<10}{r['impl']:<26}{r['step_s']:>8.3f}"
                  f"{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / hf:>7.2f}x")


if __name__ == "__main__":
    main()
