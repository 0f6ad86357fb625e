"""``train.compile``: ``torch.compile`` of the model, region by region (torchtitan's way).

Each residual sublayer is compiled on its own (``nn.Module.compile``: parameters, their
names and the state dict are untouched), and so is GPT's output layer + vocab-parallel
cross-entropy (chunked by ``model.loss_chunk_tokens``: dynamo unrolls the chunk loop and
inductor fuses each chunk's softmax passes).
The stack's loop stays eager: LayerDrop's plan, the Transformer-XL memory and the
RNG-exact activation checkpoint (:func:`megatron_lite.parallel.checkpoint`) run between
compiled regions, so checkpointing recomputes a compiled sublayer.

Every region is compiled with ``fullgraph=True``: a graph break is an error, not a slow
path. What makes them traceable:

* the TP all-reduces become functional collectives while tracing
  (:mod:`megatron_lite.parallel.mappings`);
* dropout inside a TP region (attention probabilities) draws from
  :meth:`TPRNGTracker.uniform`, a hash of a default-generator draw and the rank's seed,
  instead of swapping generator states (``get_rng_state`` cannot be traced);
* random ops run as eager ATen ops in graph order (inductor's ``fallback_random``), so a
  compiled step draws the very dropout masks of an eager one (at TP=1; at TP>1 the
  attention masks come from the hash), and a checkpointed sublayer's recomputation,
  which restores the default generator first, draws them again.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.parallel import ParallelContext


def compiled_regions(model: nn.Module) -> list[nn.Module | object]:
    """What :func:`compile_model` compiles: each sublayer, and GPT's ``loss`` method (the
    output layer + cross-entropy, chunked or not: dynamo traces the chunk loop whole)."""
    regions: list = list(model.transformer.layers)
    if hasattr(model, "wte"):  # GPT: output layer + cross-entropy
        regions.append(model.loss)
    return regions


def compile_model(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Compile ``model``'s regions in place (see the module docstring); returns it.

    Args:
        model: a :class:`GPTModel` or :class:`BertModel` (not yet wrapped by DDP).
        ctx: its parallel context (the TP-region RNG stream is seeded before tracing).
    """
    import torch._inductor.config as inductor_config

    # NOTE: eager-identical dropout masks (see the module docstring): the price is
    # unfused random kernels, small next to the matmuls
    inductor_config.fallback_random = True
    # every sublayer is a cache entry of the same code (guarded on the module): allow
    # one per sublayer, training and recomputation (grad on/off), train and eval
    limit = 4 * len(model.transformer.layers) + 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    ctx.rng.ensure()
    for layer in model.transformer.layers:
        layer.compile(fullgraph=True)
    if hasattr(model, "wte"):
        model.loss = torch.compile(model.loss, fullgraph=True)
    return model
