"""The one interface for training-time behaviour: :class:`TrainingHook`.

The :class:`~megatron_lite.training.trainer.Trainer` owns the loop (data, forward,
backward, the optimizer, checkpoints, metrics) and names no variant. What a variant adds
to training (a memory carried across micro-batches, a loss term, a clamp after the
optimizer step, more metrics, a plot at the end, a stopping rule) is a hook: a
:class:`TrainingHook` whose methods the Trainer calls at fixed points. Every method is a
no-op here; a hook overrides what it needs.

Where hooks come from:

- the model: every module with a ``training_hooks(cfg)`` method offers hooks for the run
  (``cfg`` the whole :class:`~megatron_lite.config.Config`); :func:`model_hooks` collects
  them. A part that repeats (each attention sublayer's adaptive span) offers the same
  kind of hook from every copy: one hook of each class is kept, the first;
- the command: ``Trainer(cfg, ctx, hooks=[...])`` (distillation, the PAR search, the
  faults tests inject: ``tests/training/faults.py``).

The model's hooks come first, then the command's, and every method is called on every
hook in that order. Methods that run collectives (``step_metrics``, ``log_metrics``,
``at_end`` may) are called on every rank alike.

When the run starts, the main rank prints one ``variant: ...`` line for each chosen model
part and hook that describes itself (:meth:`TrainingHook.describe`, and the parts'
``describe``: :mod:`megatron_lite.models.registry`), so every variant announces itself.

One step of the Trainer, with the hooks' places::

    before_step                          the step's settings (a phase, a temperature)
    for each micro-batch k:
        batch = micro_batch(batch, k)    attach per-micro-batch state (a memory, a seed)
        loss = loss(batch) or the model's own loss
        backward(loss + sum of extra_loss)
        after_micro_batch                collect per-micro-batch statistics
    before_optimizer_step                DDP engine only: the complete gradients
    (clip, optimizer step)
    after_optimizer_step                 fix up the weights (a clamp)
    (step counted) record |= step_metrics
    (at a logged step) record |= log_metrics
    should_stop                          before each step: end the run early

This module imports nothing of the project: variants import it, never the reverse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

# the running Trainer (megatron_lite.training.trainer): named, not imported, so this
# interface sits below everything that offers or calls hooks
Trainer = Any


class TrainingHook:
    """Training-time behaviour of a variant; override what you need (all no-ops here).

    ``trainer`` is the running :class:`~megatron_lite.training.trainer.Trainer`: its
    ``cfg``, ``ctx``, ``model`` (the bare model), ``engine`` (what runs forward:
    DDP, the bare model or the ZeRO engine), ``zero`` (the ZeRO engine or None),
    ``optimizer``, ``run`` (:func:`~megatron_lite.run.build_run`'s), ``step`` (optimizer
    steps done), ``consumed`` (samples), ``accum`` (micro-batches per step),
    ``train_data`` and ``train_iter`` (the training data and its micro-batch iterator,
    which a hook may replace) and ``run_dir``.
    """

    # ------------------------------------------------------------------ building

    def describe(self, trainer: Trainer) -> str:
        """One line the main rank prints when the run starts (after :meth:`setup`): what
        this hook adds and its settings, so a variant announces itself; ``""`` for none."""
        return ""

    def setup(self, trainer: Trainer) -> None:
        """Once, when the model, optimizer, engine and micro-batch size are final,
        before a checkpoint is loaded (make per-micro-batch state, check the run)."""

    def param_groups(self, trainer: Trainer) -> list[dict]:
        """More optimizer parameter groups (their parameters leave the model's groups),
        asked once before the optimizer is built. A group may say ``"lr_schedule":
        False`` (it keeps its own ``lr``) and ``"clip": False`` (left out of gradient
        clipping and of ``grad_norm``; honoured by the DDP engine)."""
        return []

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """This rank's state, saved with its RNG states in the checkpoint's
        ``rank_state`` (given back only on the same layout). Keys must not collide with
        another hook's."""
        return {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore from a resumed checkpoint's ``rank_state`` (every hook's keys)."""

    def meta_state(self) -> dict[str, Any]:
        """Run-wide state (the same on every rank; plain Python values), saved in the
        checkpoint's metadata and given back at any layout."""
        return {}

    def load_meta_state(self, meta: dict[str, Any]) -> None:
        """Restore from a checkpoint's metadata (a resume, or a divergence recovery)."""

    # ------------------------------------------------------------------ one step

    def before_step(self, trainer: Trainer) -> None:
        """At the start of every optimizer step (``trainer.step`` steps done)."""

    def micro_batch(self, trainer: Trainer, batch: dict, k: int) -> dict:
        """Micro-batch ``k`` of the step, on the device: return it (changed, or with
        more keyword arguments for the model's forward)."""
        return batch

    def loss(self, trainer: Trainer, batch: dict) -> torch.Tensor | None:
        """The micro-batch's training loss, or None to leave it to the next hook and
        finally to ``trainer.engine(**batch)``. The first hook that answers owns it."""
        return None

    def extra_loss(self, trainer: Trainer) -> torch.Tensor | float:
        """A term added to each micro-batch's loss for backward, not to the logged
        ``loss`` (a regularizer)."""
        return 0.0

    def after_micro_batch(self, trainer: Trainer) -> None:
        """After each micro-batch's backward."""

    def before_optimizer_step(self, trainer: Trainer) -> None:
        """The native engine only (DDP or the distributed optimizer): the step's gradients
        are complete (reduced over DP, before unscaling, clipping and the optimizer step);
        e.g. drop a frozen parameter's gradient so the optimizer leaves it alone (under
        the distributed optimizer, fp32 weights: when every parameter of its optimizer
        group has none, the group is not stepped). DeepSpeed ZeRO steps inside its engine
        and does not call it."""

    def after_optimizer_step(self, trainer: Trainer) -> None:
        """After the optimizer step: the native engine, only when it was applied (finite
        gradients; the distributed optimizer's updated weights already gathered); ZeRO,
        after the step's micro-batches. ``trainer.sharded`` (ZeRO or the distributed
        optimizer, else None) clamps sharded fp32 masters with the weights."""

    def step_metrics(self, trainer: Trainer) -> dict:
        """More of this step's record, asked once the step is counted (``trainer.step``
        is the step just done); every step, logged or not."""
        return {}

    def log_metrics(self, trainer: Trainer) -> dict:
        """More of a record about to be logged (costlier summaries)."""
        return {}

    # ------------------------------------------------------------------ the run

    def on_recover(self, trainer: Trainer) -> None:
        """The divergence guard went back to the last checkpoint (after
        :meth:`load_meta_state`): drop what no longer follows."""

    def should_stop(self, trainer: Trainer) -> bool:
        """Asked before each step: True ends the run there (with its checkpoint)."""
        return False

    def at_end(self, trainer: Trainer) -> None:
        """After the run's last checkpoint and metrics (also when it stopped early:
        ``trainer.interrupted``, ``train.exit_after``, :meth:`should_stop`)."""


def model_hooks(model: nn.Module, cfg) -> list[TrainingHook]:
    """The hooks the model's parts offer: ``module.training_hooks(cfg)`` of every module
    that has it, in ``model.modules()`` order; one hook of each class (the first)."""
    found: dict[type, TrainingHook] = {}
    for module in model.modules():
        offer = getattr(module, "training_hooks", None)
        if callable(offer):
            for hook in offer(cfg):
                found.setdefault(type(hook), hook)
    return list(found.values())
