"""LayerDrop (Fan et al. 2019): structured dropout of whole layers, and depth on demand.

In training each *unit* (a layer: a pair of sublayers, ``model.layerdrop_granularity=
layer``; or each sublayer, ``sublayer``) is skipped with probability ``model.layerdrop``:
the identity, no rescaling, as fairseq's ``LayerDropModuleList``. Never in evaluation.
``model.layers_to_keep`` skips the layers it does not name, always (a pruned model
without writing a checkpoint; ``python -m megatron_lite.prune`` writes one).

NOTE: the decisions must be the same on every rank of a TP group, or their collectives
would not match and the job would hang. They are drawn from a generator seeded with
``(train.seed, step, micro-batch, DP rank)`` (:class:`LayerDropHook` sets that key
before each micro-batch of training), never from the global RNG: TP ranks agree, DP
ranks differ (independent samples, as on separate GPUs), and a resumed run draws the
same decisions again. The activation-checkpoint recompute reuses the plan made in
forward.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from megatron_lite.config import ModelConfig, layer_units
from megatron_lite.hooks import TrainingHook


class LayerDrop:
    """Which sublayers of a stack run in one forward pass.

    Args:
        cfg: the model config (``layerdrop*``, ``layers_to_keep``, the pattern).
        dp_rank: this rank's data-parallel index (part of the decision seed).
    """

    def __init__(self, cfg: ModelConfig, dp_rank: int = 0):
        pattern = cfg.pattern
        self.p, self.keep_ends, self.dp_rank = cfg.layerdrop, cfg.layerdrop_keep_ends, dp_rank
        layers = layer_units(pattern)
        self.units = layers if cfg.layerdrop_granularity == "layer" else \
            [(i, i + 1) for i in range(len(pattern))]
        kept = cfg.kept_layers
        self.kept = None if kept is None else \
            {i for j in kept for i in range(*layers[j])}
        self.key: tuple[int, ...] | None = None  # (seed, step, micro-batch), set per micro-batch
        self._calls = 0  # the key of a forward when nobody set one

    @property
    def active(self) -> bool:
        return self.p > 0 or self.kept is not None

    def plan(self, num_sublayers: int, training: bool) -> list[bool] | None:
        """Run flags per sublayer, or None when every sublayer runs."""
        if not self.active:
            return None
        run = [self.kept is None or i in self.kept for i in range(num_sublayers)]
        if training and self.p > 0:
            key = self.key if self.key is not None else (0, self._calls)
            self._calls += 1
            seed = np.random.SeedSequence([*key, self.dp_rank]).generate_state(1)[0]
            u = torch.rand(len(self.units), generator=torch.Generator().manual_seed(int(seed)))
            last = len(self.units) - 1
            for j, (start, end) in enumerate(self.units):
                if u[j] < self.p and not (self.keep_ends and j in (0, last)):
                    run[start:end] = [False] * (end - start)
        return run

    def training_hooks(self, cfg) -> list[TrainingHook]:
        """:class:`LayerDropHook` when layers are dropped in training or not kept."""
        return [LayerDropHook(cfg.train.seed, self, cfg.model)] if self.active else []

    def describe(self, cfg: ModelConfig) -> str:
        """The start line of a run that drops or skips layers ("" when it does neither)."""
        said = []
        if self.p > 0:
            unit = "layer (a pair of sublayers)" if cfg.layerdrop_granularity == "layer" \
                else "sublayer"
            ends = ", never the first and last" if self.keep_ends else ""
            said.append(f"LayerDrop (Fan et al. 2019): each {unit} of {len(self.units)} "
                        f"skipped with p={self.p:g} in training{ends}; every one runs in "
                        "evaluation")
        if cfg.kept_layers is not None:
            said.append(f"model.layers_to_keep={cfg.layers_to_keep}: only these "
                        f"{len(cfg.kept_layers)} of {len(layer_units(cfg.pattern))} layers "
                        "run")
        return "; ".join(said)


def zero_touch(module: nn.Module) -> torch.Tensor:
    """0 times one element of each parameter of ``module``: added to the output of a stack
    that skipped ``module``, it gives every one of its parameters a (zero) gradient.

    NOTE: so a dropped layer never leaves a parameter without a gradient. DDP then needs
    no ``find_unused_parameters`` (DP ranks drop different layers; DDP would otherwise
    wait for those gradients forever), ZeRO's reduction sees every parameter, and the
    training step is the same at every DP size. Costs one tiny op per parameter.
    """
    return sum(p.view(-1)[:1].sum() for p in module.parameters()) * 0.0


def set_layerdrop_key(model: nn.Module, key: tuple[int, ...]) -> None:
    """Seed the next forward's LayerDrop decisions with ``key`` (e.g. seed, step, micro)."""
    for m in model.modules():
        drop = getattr(m, "layerdrop", None)
        if isinstance(drop, LayerDrop):
            drop.key = key


class LayerDropHook(TrainingHook):
    """Seeds each training micro-batch's LayerDrop decisions with ``(train.seed, step,
    micro-batch)``: a function of the step, so a resumed run draws them again."""

    def __init__(self, seed: int, drop: LayerDrop | None = None, cfg: ModelConfig | None = None):
        self.seed, self.drop, self.cfg = seed, drop, cfg

    def describe(self, trainer) -> str:
        return self.drop.describe(self.cfg) if self.drop is not None else ""

    def micro_batch(self, trainer, batch: dict, k: int) -> dict:
        set_layerdrop_key(trainer.model, (self.seed, trainer.step, k))
        return batch
