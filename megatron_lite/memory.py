"""Memory sizes and what autograd keeps: shared by the planner and the micro-batch probe."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.models.positions import position_scheme


def parse_memory(text: str) -> int:
    """``80GiB``, ``80G`` (binary, as nvidia-smi and docker mean it), ``80GB`` (decimal),
    ``81920M``, ``1T`` -> bytes; ``ValueError`` for anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, re.I)
    if not match or not match.group(2) and match.group(3):
        raise ValueError(f"{text!r} is not a memory size like 80GiB, 80G, 80GB, 81920M")
    value, unit, suffix = float(match.group(1)), match.group(2).upper(), match.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1000 if suffix.upper() == "B" else 1024  # GB decimal; G, GiB binary
    return int(value * base**power)


@contextlib.contextmanager
def saved_tensor_bytes(model) -> Iterator[dict[int, int]]:
    """Count what autograd saves for backward inside the block: ``{storage pointer: bytes}``
    of every distinct storage, the model's parameters removed at the end."""
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved
    for p in model.parameters():
        saved.pop(p.untyped_storage().data_ptr(), None)


def estimate_parameters(m: ModelConfig, tp: int = 1, layer_share: float = 1.0) -> int:
    """The model's parameter count from its sizes alone (nothing is built), the vocab padded
    for ``tp``: what a fit check can afford before allocating anything. Counts the
    position scheme's input table, BERT's heads and each sublayer of the pattern; leaves out
    what is small next to those (Transformer-XL's biases, adaptive spans, W_R).
    ``layer_share``: count only that share of the layers (a pipeline's largest stage,
    which still holds every embedding: the first stage's and the tied head's copy)."""
    h, ffn, pattern = m.hidden_size, m.ffn_size, m.pattern
    multiple = m.make_vocab_size_divisible_by * tp
    vocab = -(-m.vocab_size // multiple) * multiple
    norm = h if m.normalization == "rmsnorm" else 2 * h  # RMSNorm: a gain, no bias
    bias = 1 if m.add_bias_linear else 0
    kv = 2 * m.query_groups * (h // m.num_attention_heads)  # K and V rows (grouped-query)
    attention = 2 * h * h + h * kv + bias * (2 * h + kv) + norm  # Q, K, V, output, biases
    matrices = 3 if m.activation == "swiglu" else 2  # SwiGLU: gate, up, down
    mlp = matrices * h * ffn + bias * ((matrices - 1) * ffn + h) + norm
    heads = 2 if m.untie_embeddings_and_output_weights else 1  # embedding (+ output layer)
    layers = pattern.count("s") * attention + pattern.count("f") * mlp
    total = round(layers * layer_share) + heads * vocab * h + norm
    table = position_scheme(m).input_table(device="meta")  # learned positions
    total += sum(p.numel() for p in table.parameters()) if table is not None else 0
    if m.arch == "bert":  # token types, MLM dense + norm + bias, pooler, NSP
        total += m.num_tokentypes * h + h * h + 3 * h + vocab + h * h + h + 2 * h + 2
    return total
