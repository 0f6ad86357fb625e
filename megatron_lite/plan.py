"""Will it fit, and how fast? A plan of a run before it starts, without allocating it.

    python -m megatron_lite.plan configs/gpt2/8.3b.yaml --tp 8 --dp 64 --device a100-80g
    python -m megatron_lite.plan CONFIG [key=value ...] [--tp N] [--dp M] [--pp P] [--device h100|
        a100-80g|h200|a10|l40|v100|cpu|MEMORY] [--json]

Parameters come from the model built on the meta device (exact, padding included);
per TP rank each sharded tensor counts ``1/tp`` (the vocab padded for that TP size).

Memory per rank, in bytes:

- weights, gradients, optimizer: fp32 weights and gradients (``train.precision`` bf16
  and fp16 are autocast over fp32 weights) and Adam's two fp32 moments; DDP adds its
  gradient buckets (a second fp32 copy) when DP > 1. Under ``parallel.engine=deepspeed``
  (ZeRO, Rajbhandari et al. 2020): 16-bit weights and gradients with fp32 masters and
  moments (12 bytes/param) partitioned over DP (stage 1), gradients too (stage 2).
  With ``parallel.distributed_optimizer=true`` (Megatron's distributed optimizer) the
  masters and moments are split over DP and the gradients stay whole in fp32: 6 + 12/DP
  bytes/param with ``train.params_dtype=bf16``, 8 + 8/DP with fp32 weights (which
  serve as the masters), and no DDP bucket copy.
- activations per micro-batch (Korthikanti et al. 2022, "Reducing Activation
  Recomputation", adapted to our layout): per layer and token,
  ``R + P / tp`` h-sized tensors plus ``S a s / (h tp)`` for the attention scores, where
  P covers what lives inside TP regions (Q, K, V, the attention context, the FFN's
  4h-wide input and GeLU output), R what every TP rank keeps (LayerNorm inputs, residual
  stream, dropout masks) and S the softmax, its dropout mask and output. The paper's
  16-bit numbers are ``R = 10, P = 24, S = 5`` (1-byte dropout masks); ours, counted by
  saved-tensor accounting of this implementation at TP 1 and 2 (``bench/plan_check.py``
  re-measures them), are in :data:`ACTIVATION_TERMS`: fp32 ``R = 16 (+8 with dropout),
  P = 48, S = 12``, bf16 autocast ``R = 12 (+8), P = 30, S = 13.5`` (the residual stream
  and LayerNorms stay fp32 under autocast, and the attention kernel's inputs are kept
  in bf16 as well). Attention without dropout runs a fused kernel that keeps no
  scores (S = 0), as does ``selective`` recomputation. ``full`` keeps each sublayer's
  input (``FULL_TERM``) and, in backward, one layer's activations at a time. Outside the
  layers: the embedding output, the final LayerNorm and what the output layer + loss
  keeps: chunked (``model.loss_chunk_tokens``, :func:`loss_bytes`), the gradients it
  computed in forward (fp32 ``[tokens, h]`` and ``[V/tp, h]``); unchunked, the
  cross-entropy's fp32 ``[tokens, V/tp]`` exponentials (``LOGITS_TERM``). With sequence
  parallelism (``parallel.sequence_parallel``, TP > 1) R divides by TP as well (the
  paper's ``s b h (34/t + 5 a s/(h t))``: every term over t; the cores' inputs are kept
  as the sequence shard and gathered again in backward), and so do ``FULL_TERM`` and 8 h
  of the 12 h outside the layers (the final LayerNorm on the shard; the head's gathered
  input stays whole); ``bench/sequence_parallel.py`` measures it.
- temporary: chunked, one chunk's logits and their gradient (``CHUNK_TERM``, fp32
  ``[chunk, V/tp]`` each); unchunked, the gradient of the logits in backward (fp32
  ``[tokens, V/tp]``).

Compute: FLOPs per step as in :func:`megatron_lite.training.metrics.model_flops_per_step`
(forward + backward), plus a forward of each layer again under ``full`` recomputation
(and of attention's core under ``selective``); the step time assumes ``MFU`` of the
device's peak and adds the TP and DP all-reduces at link bandwidth with no overlap.

Pipeline parallelism (``--pp P``, ``parallel.pipeline_parallel_size``; Narayanan et al.
2021): memory is the largest stage's. A stage holds its layers' weights (the first
stage also the embeddings, the last the tied head's copy) and, under 1F1B, the first
stage keeps ``P`` micro-batches of its layers' activations in flight (GPipe: all ``m``;
interleaved with ``V`` chunks: ``P (1 + (P - 1) / (P V))``, Korthikanti et al. 2022),
the last stage one micro-batch plus the logits. The bubble is the share of a step a
stage idles, ``(P - 1) / (m + P - 1)`` for ``m`` micro-batches, ``(P - 1) / (V m + P -
1)`` interleaved (the bubble divided by V); the step time divides the compute by it.
Point-to-point bytes: each rank sends each micro-batch's fp32 ``[b, s, h]`` forward and
its gradient back, once per chunk boundary (bf16 under ``train.params_dtype=bf16``); with
sequence parallelism each TP rank sends its ``[b, s/TP, h]`` shard, so the bytes divide by
TP (Megatron's scatter/gather of the stage boundary).

Checkpoints (sharded, :mod:`megatron_lite.checkpoint`): the weights and Adam's two
moments at 4 bytes each, vocab unpadded (12 bytes/param, under either engine: ZeRO
saves its fp32 masters), and each of the TP x DP ranks writes an equal share; the save
time assumes ``DISK_BYTES_PER_S`` of write bandwidth per node, shared by its ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import torch

from megatron_lite.cli import parse_args, run_cli
from megatron_lite.config import Config, ConfigError, load_config
from megatron_lite.devices import DEVICES, host_memory
from megatron_lite.memory import parse_memory as memory_size
from megatron_lite.memory import saved_tensor_bytes
from megatron_lite.models import build_model, model_problems
from megatron_lite.parallel import ParallelContext
from megatron_lite.parallel.pipeline import largest_stage_share, pipeline_problems
from megatron_lite.resolve import resolve_global_batch
from megatron_lite.training.metrics import model_flops_per_step
from megatron_lite.training.precision import autocast

GiB = 2**30
MFU = 0.4  # assumed model FLOPs utilization of the step-time estimate
MARGIN = 0.1  # of device memory kept free (allocator fragmentation, CUDA context)
GPUS_PER_NODE = 8
DISK_BYTES_PER_S = 2e9  # checkpoint write bandwidth per node (a local NVMe or a fair share
# of a parallel filesystem): the stated assumption of the save-time estimate

# bytes per token per layer, in units of h (see the module docstring); key: precision
# kind (4 = fp32, 2 = bf16/fp16 autocast), value: R without dropout, R's dropout masks,
# P, S with attention dropout. Counted on this implementation by bench/plan_check.py.
ACTIVATION_TERMS = {4: {"R": 16.0, "R_dropout": 8.0, "P": 48.0, "S": 12.0},
                    2: {"R": 12.0, "R_dropout": 8.0, "P": 30.0, "S": 13.5}}
FULL_TERM = 8.0  # full recomputation: each of the 2 sublayers' fp32 input, per layer
LOGITS_TERM = 4.0  # fp32 bytes per vocab entry and token (the cross-entropy's exponentials)
CHUNK_TERM = 8.0  # bytes per vocab entry and token of a loss chunk (logits + their gradient)


def loss_bytes(m, tokens: int, vocab_tp: float) -> tuple[float, float]:
    """``(saved, temporary)`` bytes of the output layer + loss of ``tokens`` tokens on one
    TP rank (see the module docstring)."""
    if m.loss_chunk_tokens:
        return 4 * (tokens + vocab_tp) * m.hidden_size, \
            CHUNK_TERM * min(m.loss_chunk_tokens, tokens) * vocab_tp
    return LOGITS_TERM * tokens * vocab_tp, 4 * tokens * vocab_tp


class PlanError(ValueError):
    """A device, memory size or layout the planner cannot use (one line)."""


def parse_memory(text: str) -> int:
    """``--device`` as a memory size (:func:`megatron_lite.memory.parse_memory`)."""
    try:
        return memory_size(text)
    except ValueError:
        raise PlanError(f"--device {text!r}: not a device ({', '.join(DEVICES)}) or a memory "
                        "size like 80GiB, 80G, 80GB, 81920M") from None


def device_spec(name: str) -> dict:
    """``{"name", "memory", "peak_flops" (bf16, fp32), "tp_link", "dp_link"}``."""
    key = name.lower()
    if key in DEVICES:
        d = DEVICES[key]
        return {"name": key, "memory": d.memory if d.memory is not None else host_memory(),
                "peak_flops": {"bf16": d.bf16, "fp32": d.fp32}, "tp_link": d.tp_link,
                "dp_link": d.dp_link}
    return {"name": "custom", "memory": parse_memory(name), "peak_flops": None,
            "tp_link": None, "dp_link": None}


def _padded(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


def count_parameters(cfg: Config, tp: int) -> dict:
    """Total parameters at TP ``tp`` (vocab padded for it), per TP rank (and of that, in
    the layers: what pipeline stages split), and the word embedding's share, from the
    model built on the meta device."""
    m = cfg.model
    model = build_model(m, ParallelContext(), device="meta")
    vocab_tp = _padded(m.vocab_size, m.make_vocab_size_divisible_by * tp)
    total = per_rank = embedding = stored = in_layers = 0
    for name, p in model.named_parameters():
        shape = list(p.shape)
        if getattr(p, "vocab_dim", None) is not None:
            shape[p.vocab_dim] = m.vocab_size
            stored += math.prod(shape)  # checkpoints keep the vocab unpadded
            shape[p.vocab_dim] = vocab_tp
        else:
            stored += math.prod(shape)
        full = math.prod(shape)
        total += full
        here = full // tp if getattr(p, "tp_dim", None) is not None else full
        per_rank += here
        in_layers += here if name.startswith("transformer.layers.") else 0
        if getattr(p, "vocab_dim", None) is not None and p.dim() == 2:
            embedding += full
    return {"total": total, "per_rank": per_rank, "embedding": embedding,
            "padded_vocab": vocab_tp, "stored": stored, "per_rank_layers": in_layers}


def pipeline_terms(cfg: Config, pp: int, accum: int) -> dict:
    """The pipeline's shape (see the module docstring): micro-batches of activations the
    first stage holds, the share of the layers on the largest stage, and the bubble."""
    par = cfg.parallel
    v = par.virtual_pipeline_size if pp > 1 else 1
    share = largest_stage_share(cfg, pp)
    if pp == 1:
        in_flight = 1.0
    elif par.pipeline_schedule == "gpipe":
        in_flight = float(accum)
    elif v > 1:
        in_flight = pp * (1 + (pp - 1) / (pp * v))
    else:
        in_flight = float(min(pp, accum))
    bubble = (pp - 1) / (v * accum + pp - 1) if pp > 1 else 0.0
    return {"in_flight": in_flight, "share": share, "bubble": bubble, "virtual": v}


def activation_bytes(cfg: Config, tp: int, micro_batch: int) -> dict:
    """Activations of one micro-batch on one TP rank (see the module docstring): ``saved``
    after the forward, ``total`` at the backward's peak (``full`` recomputes one layer)."""
    m, t = cfg.model, cfg.train
    e = 4 if t.precision == "fp32" else 2
    terms = ACTIVATION_TERMS[e]
    s, h, a = m.seq_length + m.mem_len, m.hidden_size, m.num_attention_heads
    tokens = micro_batch * m.seq_length
    dropout = m.hidden_dropout > 0 or m.attention_dropout > 0
    scores = terms["S"] if m.attention_dropout > 0 and m.activation_checkpointing == "none" \
        else 0.0
    sp = tp if cfg.parallel.sequence_parallel and tp > 1 else 1  # what R is split over
    per_layer = tokens * h * ((terms["R"] + terms["R_dropout"] * dropout) / sp
                              + terms["P"] / tp + scores * a * s / (h * tp))
    layers = len(m.pattern) / 2  # sublayer pairs
    vocab = _padded(m.vocab_size, m.make_vocab_size_divisible_by * tp) / tp
    # + embeddings, final LayerNorm (the head's input is whole under sequence parallelism)
    outside = loss_bytes(m, tokens, vocab)[0] + tokens * (4 + 8 / sp) * h
    with_scores = terms["S"] * a * s / (h * tp) * tokens * h if m.attention_dropout > 0 else 0.0
    if m.activation_checkpointing == "full":  # backward recomputes one layer at a time
        stored, recompute = tokens * h * FULL_TERM / sp * layers, per_layer + with_scores
    elif m.activation_checkpointing == "selective":  # ... or one attention core
        stored, recompute = per_layer * layers, with_scores
    else:
        stored, recompute = per_layer * layers, 0.0
    return {"layers": int(stored), "outside_layers": int(outside),
            "saved": int(stored + outside), "total": int(stored + outside + recompute)}


def plan(cfg: Config, tp: int, dp: int, device: str, micro_batch: int | None = None,
         pp: int | None = None) -> dict:
    """The plan as one dict (the ``--json`` output; see :func:`main`); ``pp``: pipeline
    stages (default ``parallel.pipeline_parallel_size``)."""
    m, t, par = cfg.model, cfg.train, cfg.parallel
    pp = pp or par.pipeline_parallel_size
    if m.num_attention_heads % tp or m.hidden_size % tp or m.ffn_size % tp:
        raise PlanError(f"TP={tp} does not divide the heads ({m.num_attention_heads}), hidden "
                        f"({m.hidden_size}) and FFN ({m.ffn_size}) sizes")
    if m.query_groups % tp and tp % m.query_groups:
        raise PlanError(f"TP={tp} and the {m.query_groups} K/V heads (model.num_query_groups): "
                        "one must divide the other")
    dev = device_spec(device)
    params = count_parameters(cfg, tp)
    mb = micro_batch or t.micro_batch_size
    accum = max(t.global_batch_size // (mb * dp), 1)
    pipe = pipeline_terms(cfg, pp, accum)
    # the largest stage's weights: its layers, plus the embeddings (first and last stage)
    p = params["per_rank"] if pp == 1 else int(
        params["per_rank_layers"] * pipe["share"] + params["per_rank"]
        - params["per_rank_layers"])
    zero = par.engine == "deepspeed"
    if zero:  # DeepSpeed keeps fp32 master partitions in every precision
        w = 2 if t.precision != "fp32" else 4
        states = {"weights": w * p, "gradients": w * p if par.zero_stage == 1 else w * p / dp,
                  "optimizer": 12 * p / dp}
    elif par.distributed_optimizer:  # Megatron's: masters (bf16 only) and Adam over DP
        if t.params_dtype == "bf16":
            states = {"weights": 2 * p, "gradients": 4 * p, "masters": 4 * p / dp,
                      "optimizer": 8 * p / dp}
        else:
            states = {"weights": 4 * p, "gradients": 4 * p, "optimizer": 8 * p / dp}
    elif t.params_dtype == "bf16":  # bf16 weights, fp32 main grads and masters, no DDP
        states = {"weights": 2 * p, "gradients": 4 * p, "masters": 4 * p, "optimizer": 8 * p}
    else:
        states = {"weights": 4 * p, "gradients": 4 * p, "optimizer": 8 * p}
        if dp > 1 and pp == 1:  # a pipeline all-reduces its gradients in place (buckets)
            states["ddp_buckets"] = 4 * p
    vocab = _padded(m.vocab_size, m.make_vocab_size_divisible_by * tp) / tp
    fixed = sum(states.values())

    def need(b: int) -> tuple[float, dict]:
        act = activation_bytes(cfg, tp, b)
        temporary = loss_bytes(m, b * m.seq_length, vocab)[1]
        if pp > 1:  # the first stage's in-flight micro-batches or the last's logits
            first = act["layers"] * pipe["share"] * pipe["in_flight"] + \
                (act["total"] - act["saved"])
            last = act["layers"] * pipe["share"] + act["total"] - act["layers"]
            activations = max(first, last + temporary)
            return fixed + activations, {"activations": int(activations), "temporary": 0}
        return fixed + act["total"] + temporary, {"activations": act["total"],
                                                   "temporary": int(temporary)}

    total, parts = need(mb)
    budget = dev["memory"] * (1 - MARGIN)
    per_dp = t.global_batch_size // dp if t.global_batch_size % dp == 0 else None
    sizes = [b for b in range(1, (per_dp or t.global_batch_size) + 1)
             if per_dp is None or per_dp % b == 0]
    fitting = [b for b in sizes if need(b)[0] <= budget]
    fits = total <= budget
    # compute and communication
    tokens = t.global_batch_size * m.seq_length
    flops = model_flops_per_step(m, t.global_batch_size, m.seq_length)  # forward + backward
    layers = len(m.pattern) / 2
    if m.activation_checkpointing == "full":  # every layer's forward again (not the logits)
        flops += flops / 3 - 2 * tokens * m.hidden_size * m.vocab_size
    elif m.activation_checkpointing == "selective":  # scores and context again
        flops += 4 * tokens * m.seq_length * m.hidden_size * m.pattern.count("s")
    e = 4 if t.precision == "fp32" else 2
    # Megatron's f and g: two all-reduces of [b, s, h] per layer forward (16-bit outputs
    # under autocast; again when full recomputation reruns the layer) and two backward
    # (gradients of the fp32 LayerNorm outputs: 4 bytes)
    # (sequence parallelism: the same bytes as an all-gather and a reduce-scatter each, and
    # backward gathers each core's input again for its weight gradient: 1.5x backward)
    forwards = 2 if m.activation_checkpointing == "full" else 1
    backward = 2 * 4 * (1.5 if par.sequence_parallel else 1)
    tp_bytes = (layers * mb * m.seq_length * m.hidden_size * (2 * e * forwards + backward)
                * accum) if tp > 1 else 0
    tp_bytes *= pipe["share"]  # a stage's layers
    dp_bytes = (2 if zero and t.precision != "fp32" else 4) * p if dp > 1 else 0
    # each micro-batch's [b, s, h] forward and its gradient, per chunk boundary (fp32, or
    # bf16 weights' bf16 activations); sequence parallelism sends each TP rank's [b, s/tp,
    # h] shard (Megatron's way: the bytes divide by TP)
    sp = tp if par.sequence_parallel and tp > 1 else 1
    p2p_bytes = 2 * pipe["virtual"] * accum * mb * m.seq_length * m.hidden_size \
        * (2 if t.params_dtype == "bf16" else 4) / sp if pp > 1 else 0
    step_time = None
    if dev["peak_flops"] is not None:
        peak = dev["peak_flops"]["fp32" if t.precision == "fp32" else "bf16"]
        compute = flops / (tp * dp * pp * peak * MFU) / (1 - pipe["bubble"])
        ring = lambda n: 2 * (n - 1) / n  # noqa: E731 (bytes each rank sends, per byte)
        dp_link = dev["dp_link"] if tp * dp > GPUS_PER_NODE else dev["tp_link"]
        comm = (tp_bytes * ring(tp) / dev["tp_link"] if tp > 1 else 0.0) + \
            (dp_bytes * ring(dp) / dp_link if dp > 1 else 0.0)
        if pp > 1:  # stages on other nodes once TP x DP fills one
            comm += p2p_bytes / (dev["dp_link"] if tp * dp * pp > GPUS_PER_NODE
                                 else dev["tp_link"])
        step_time = compute + comm
    out = {
        "config": {"tp": tp, "dp": dp, "pp": pp, "micro_batch_size": mb, "accumulation": accum,
                   "global_batch_size": t.global_batch_size, "seq_length": m.seq_length,
                   "precision": t.precision, "activation_checkpointing": m.activation_checkpointing,
                   "engine": par.engine, "zero_stage": par.zero_stage if zero else None,
                   "sequence_parallel": bool(par.sequence_parallel and tp > 1),
                   "pipeline_schedule": par.pipeline_schedule if pp > 1 else None,
                   "virtual_pipeline_size": pipe["virtual"],
                   "distributed_optimizer": bool(par.distributed_optimizer and not zero)},
        "device": dev["name"], "device_memory": dev["memory"],
        "params_total": params["total"], "params_per_rank": p,
        "params_embedding": params["embedding"], "padded_vocab": params["padded_vocab"],
        "memory_per_rank": {"total": int(total), **{k: int(v) for k, v in states.items()},
                            **parts},
        "fits": fits, "max_micro_batch": max(fitting) if fitting else 0,
        "flops_per_token": flops / (t.global_batch_size * m.seq_length),
        "flops_per_step": flops, "step_time_s": step_time, "assumed_mfu": MFU,
        "tp_allreduce_bytes_per_step": int(tp_bytes),
        "tp_allreduce_bytes_per_layer_per_step": int(tp_bytes / layers) if layers else 0,
        "dp_allreduce_bytes_per_step": int(dp_bytes),
        "pipeline_bubble": pipe["bubble"], "pipeline_in_flight_micro_batches": pipe["in_flight"],
        "p2p_bytes_per_step": int(p2p_bytes), "suggestion": None,
        **checkpoint_cost(params["stored"], tp, dp * pp),
    }
    return out


def checkpoint_cost(stored_params: int, tp: int, dp: int) -> dict:
    """Bytes of a sharded checkpoint, in all and per rank, and its estimated save time."""
    total = 12 * stored_params  # fp32 weights (or ZeRO's masters) + Adam's two moments
    per_rank = -(-total // (tp * dp))
    ranks_per_node = min(tp * dp, GPUS_PER_NODE)
    return {"checkpoint_bytes": total, "checkpoint_bytes_per_rank": per_rank,
            "checkpoint_save_s": per_rank * ranks_per_node / DISK_BYTES_PER_S,
            "assumed_disk_bytes_per_s": DISK_BYTES_PER_S}


def suggest(cfg: Config, tp: int, dp: int, device: str) -> dict | None:
    """The cheapest change that makes a plan that does not fit fit: ``{"overrides": [...],
    "tp": N, "pp": P, "why": ...}``, tried in order of cost (sequence parallelism at
    TP > 1, selective recomputation, a smaller micro-batch dividing the per-rank batch,
    full recomputation, the distributed optimizer, ZeRO-2, more TP within a node, then
    pipeline stages across nodes at the node's TP), or None."""
    m, t = cfg.model, cfg.train
    tries = []
    if tp > 1 and not cfg.parallel.sequence_parallel and m.seq_length % tp == 0 \
            and cfg.train.phase2_seq_length % tp == 0 and tp <= m.query_groups \
            and m.position_embedding != "relative":
        tries.append((["parallel.sequence_parallel=true"], tp,
                      "sequence parallelism: norms, dropouts and residuals split over the "
                      "TP group (the same communication bytes, no recomputation)"))
    if m.activation_checkpointing == "none":
        tries.append((["model.activation_checkpointing=selective"], tp,
                      "recompute attention's core (a few % more compute)"))
    per_rank = t.global_batch_size // dp
    for b in sorted((b for b in range(1, t.micro_batch_size) if per_rank % b == 0),
                    reverse=True):  # divisors: the global batch stays what it is
        tries.append(([f"train.micro_batch_size={b}"], tp,
                      f"micro-batch {b} with more accumulation (same global batch)"))
    if m.activation_checkpointing != "full":
        tries.append((["model.activation_checkpointing=full"], tp,
                      "recompute every layer in backward (~33% more compute)"))
    if cfg.parallel.engine != "deepspeed" and not cfg.parallel.distributed_optimizer and dp > 1:
        tries.append((["parallel.distributed_optimizer=true"], tp,
                      "the distributed optimizer: masters and Adam moments split over DP "
                      "(no slower than DDP)"))
    if cfg.parallel.engine != "deepspeed" and dp > 1:
        tries.append((["parallel.distributed_optimizer=false", "parallel.engine=deepspeed",
                       "parallel.zero_stage=2"], tp,
                      "ZeRO-2: optimizer state and gradients partitioned over DP"))
    more = tp
    while more * 2 <= GPUS_PER_NODE:
        more *= 2
        tries.append(([f"parallel.tensor_parallel_size={more}"], more,
                       f"TP x{more // tp} (DP {dp} x TP {more} = {dp * more} devices)"))
    tries = [(o, new_tp, cfg.parallel.pipeline_parallel_size, why)
             for o, new_tp, why in tries]
    pp = cfg.parallel.pipeline_parallel_size
    while pp * 2 <= m.num_layers and pp < 64:  # TP fills the node: stages across nodes
        pp *= 2
        if m.num_layers % pp == 0 and cfg.parallel.engine == "ddp":
            tries.append(([f"parallel.tensor_parallel_size={more}",
                           f"parallel.pipeline_parallel_size={pp}"], more, pp,
                          f"TP {more} within a node x PP {pp} stages across nodes "
                          f"(DP {dp}: {dp * more * pp} devices)"))
    for overrides, new_tp, new_pp, why in tries:
        trial = apply_overrides(cfg, overrides)
        try:
            if plan(trial, new_tp, dp, device, pp=new_pp)["fits"]:
                return {"overrides": overrides, "tp": new_tp, "pp": new_pp, "why": why}
        except PlanError:
            continue
    return None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of ``cfg`` with ``section.key=value`` overrides."""
    new = load_config(None, overrides)
    out = dataclasses.replace(cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name))
                                      for f in dataclasses.fields(cfg)})
    for item in overrides:
        dotted = item.split("=", 1)[0]
        section, key = dotted.split(".")
        setattr(getattr(out, section), key, getattr(getattr(new, section), key))
    return out


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def report(out: dict) -> str:
    c, mem = out["config"], out["memory_per_rank"]
    lines = [f"parameters: {out['params_total'] / 1e9:.3f} B total "
             f"({out['params_embedding'] / 1e6:.1f} M in the word embedding, vocab padded to "
             f"{out['padded_vocab']}), "
             f"{out['params_per_rank'] / 1e9:.3f} B per "
             + (f"TP rank (TP={c['tp']}, DP={c['dp']})" if c["pp"] == 1 else
                f"rank (TP={c['tp']}, DP={c['dp']}, PP={c['pp']}: the largest stage)"),
             f"memory per rank at micro-batch {c['micro_batch_size']} ({c['precision']}, "
             f"checkpointing {c['activation_checkpointing']}, "
             f"{'sequence parallel, ' if c['sequence_parallel'] else ''}{c['engine']}"
             f"{' ZeRO-' + str(c['zero_stage']) if c['zero_stage'] else ''}"
             f"{' + distributed optimizer' if c['distributed_optimizer'] else ''}):"]
    for key in ("weights", "gradients", "masters", "optimizer", "ddp_buckets", "activations",
                "temporary"):
        if key in mem:
            lines.append(f"  {key:<12} {_gib(mem[key]):>12}")
    lines.append(f"  {'total':<12} {_gib(mem['total']):>12}  of {_gib(out['device_memory'])} "
                 f"({out['device']}, {MARGIN:.0%} kept free)")
    lines.append(f"compute: {out['flops_per_token'] / 1e9:.2f} GFLOP per token, "
                 f"{out['flops_per_step'] / 1e15:.2f} PFLOP per step")
    tp, dp = c["tp"], c["dp"]
    tp_part = (f"TP all-reduce {out['tp_allreduce_bytes_per_step'] / GiB:.2f} GiB (full "
               f"[micro-batch, seq, hidden] activations and gradients: the same at any TP size;"
               f" a ring sends {2 * (tp - 1) / tp:.2f} x that)") if tp > 1 else "no TP all-reduce"
    dp_part = (f"DP gradient all-reduce {out['dp_allreduce_bytes_per_step'] / GiB:.2f} GiB "
               f"(this rank's gradients; a ring sends {2 * (dp - 1) / dp:.2f} x that)") \
        if dp > 1 else "no DP all-reduce"
    lines.append(f"communication per step, per rank: {tp_part}, {dp_part}")
    if c["pp"] > 1:
        v = c["virtual_pipeline_size"]
        lines.append(f"pipeline: {c['pp']} stages, {c['pipeline_schedule']}"
                     f"{f' V={v}' if v > 1 else ''}"
                     f", {c['accumulation']} micro-batches per step: bubble "
                     f"{out['pipeline_bubble']:.1%} of a step, the first stage holds "
                     f"{out['pipeline_in_flight_micro_batches']:.3g} micro-batches of "
                     f"activations; point-to-point {out['p2p_bytes_per_step'] / GiB:.2f} GiB "
                     "per step per rank")
    lines.append(f"checkpoint: {_gib(out['checkpoint_bytes'])} (weights + Adam, vocab unpadded), "
                 f"{_gib(out['checkpoint_bytes_per_rank'])} written by each rank; save "
                 f"~{out['checkpoint_save_s']:.1f} s at "
                 f"{out['assumed_disk_bytes_per_s'] / 1e9:g} GB/s of disk per node")
    if out["step_time_s"] is not None:
        lines.append(f"step time ~{out['step_time_s']:.2f} s (MFU {out['assumed_mfu']:.0%} "
                     "assumed, communication not overlapped)")
    if out["fits"]:
        lines.append(f"fits at micro-batch {c['micro_batch_size']} with "
                     f"{c['activation_checkpointing']} checkpointing: {_gib(mem['total'])} / "
                     f"{_gib(out['device_memory'])} (largest that fits: {out['max_micro_batch']})")
    else:
        s = out["suggestion"]
        lines.append(f"does NOT fit: {_gib(mem['total'])} / {_gib(out['device_memory'])}"
                     + (f"; cheapest fix: {' '.join(s['overrides'])} ({s['why']})" if s
                        else "; no single change found: more TP and DP, or a smaller model"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_lite.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--tp", type=int, default=None, help="default: parallel.tensor_parallel_size")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--pp", type=int, default=None,
                   help="pipeline stages (default: parallel.pipeline_parallel_size)")
    p.add_argument("--device", default="h100",
                   help=f"{', '.join(DEVICES)} or a memory size (80GiB, 80G, 81920M)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    a = parse_args(p, argv)

    def body() -> None:
        cfg = load_config(a.config, a.overrides)
        if problems := cfg.problems() + model_problems(cfg):  # the layout: below
            raise ConfigError("; ".join(problems))
        tp = a.tp or cfg.parallel.tensor_parallel_size
        pp = a.pp or cfg.parallel.pipeline_parallel_size
        if tp < 1 or a.dp < 1 or pp < 1:
            raise PlanError("--tp, --dp and --pp must be >= 1")
        cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size = tp, pp
        if problems := pipeline_problems(cfg, tp * a.dp * pp):
            raise ConfigError("; ".join(problems))
        resolve_global_batch(cfg, a.dp)  # train.global_batch_tokens -> samples
        if cfg.train.micro_batch_size == 0:  # auto: plan micro-batch 1, report the largest
            cfg.train.micro_batch_size = 1
        with torch.device("meta"):
            out = plan(cfg, tp, a.dp, a.device)
            if not out["fits"]:
                out["suggestion"] = suggest(cfg, tp, a.dp, a.device)
        print(json.dumps(out) if a.json else report(out))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())


def measured_activation_bytes(model, batch: dict, precision: str, device) -> int:
    """The bytes autograd keeps for backward after one forward of ``batch`` (every
    distinct storage saved, parameters excluded): what :func:`activation_bytes` predicts
    without the recomputation peak. Collective when the model is tensor parallel."""
    model.train()
    with saved_tensor_bytes(model) as saved:
        with autocast(precision, device):
            model(**batch)
    return sum(saved.values())
