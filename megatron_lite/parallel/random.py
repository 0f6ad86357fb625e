"""TP-aware random number generation and an RNG-exact activation checkpoint.

Two streams, as in Megatron:

* the *default* generator is seeded identically on every TP rank: weight init and
  dropout in replicated regions (embeddings, residual stream) draw the same numbers
  everywhere, so replicated activations stay identical across the TP group;
* a *tracked* state per TP rank (:class:`TPRNGTracker`) is swapped in with
  ``with tracker.fork():`` for dropout inside TP regions (attention probabilities of
  this rank's heads), so each rank's heads get independent masks.

:func:`checkpoint` recomputes a block in backward after restoring both streams to what
they were in forward, so the recomputation draws exactly the same dropout masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _fresh_state(device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen.get_state()


class TPRNGTracker:
    """Named RNG states that can be swapped in for the device's default generator.

    Dropout kernels only read the default generator, so forking means: save the
    default state, install the tracked one, run, store the advanced tracked state back,
    and restore the default one.

    Args:
        device: whose generator is forked (CPU generator for CPU, CUDA for CUDA).
    """

    TP_REGION = "tp-region"

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        """Register a stream ``name`` seeded with ``seed`` (without touching the default one)."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        self._states[name] = _fresh_state(self.device, seed)

    def reset(self) -> None:
        """Forget every tracked state (modules holding this tracker keep working)."""
        self._states = {}

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of every tracked state (for checkpoints)."""
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace the tracked states (from :meth:`get_states`)."""
        self._states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TP_REGION) -> Iterator[None]:
        """Run the body with the default generator replaced by the tracked stream ``name``.

        An unseeded tracker (e.g. a bare module built outside a job) is seeded lazily
        from the current default stream, so TP=1 code works without setup.
        """
        if name not in self._states:
            self._states[name] = _fresh_state(
                self.device, int(torch.randint(0, 2**62, (1,)).item())
            )
        outer = _get_state(self.device)
        _set_state(self.device, self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_state(self.device)
            _set_state(self.device, outer)


def rng_state(tracker: TPRNGTracker) -> dict:
    """Every RNG state a step draws from: the default CPU generator, the device's (CUDA)
    and the tracker's TP-region streams. Used by checkpoints (exact resume) and by
    :func:`checkpoint` (exact recomputation)."""
    state = {"cpu": torch.get_rng_state(), "tracker": tracker.get_states()}
    if tracker.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(tracker.device)
    return state


def set_rng_state(tracker: TPRNGTracker, state: dict) -> None:
    """Restore a :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and tracker.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], tracker.device)
    tracker.set_states(state["tracker"])


class _CheckpointFunction(torch.autograd.Function):
    """Forward without keeping activations; backward re-runs forward with the RNG as it was."""

    @staticmethod
    def forward(ctx, run_function, tracker, *args):
        ctx.run_function = run_function
        ctx.tracker = tracker
        ctx.rng = rng_state(tracker)
        device_type = tracker.device.type
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        ctx.tensor_index = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        ctx.others = [None if torch.is_tensor(a) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_index))
        with torch.no_grad():
            return run_function(*args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        args = list(ctx.others)
        for i, t in zip(ctx.tensor_index, ctx.saved_tensors, strict=True):
            args[i] = t.detach().requires_grad_(t.requires_grad)
        after_forward = rng_state(ctx.tracker)
        set_rng_state(ctx.tracker, ctx.rng)
        device_type, enabled, dtype = ctx.autocast
        try:
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                outputs = ctx.run_function(*args)
        finally:
            set_rng_state(ctx.tracker, after_forward)
        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [
            (o, g)
            for o, g in zip(outputs, grad_outputs, strict=True)
            if torch.is_tensor(o) and o.requires_grad and g is not None
        ]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = tuple(a.grad if torch.is_tensor(a) else None for a in args)
        return (None, None, *grads)


def checkpoint(run_function: Callable[..., Any], tracker: TPRNGTracker, *args: Any) -> Any:
    """Activation checkpoint of ``run_function(*args)`` that restores both RNG streams.

    Activations inside ``run_function`` are dropped after forward and recomputed in
    backward; the default generator(s) and the tracker's TP-region states are set back
    to their forward values for the recomputation and restored afterwards, so dropout
    masks (and the RNG state seen by later code) are exactly as without checkpointing.

    Args:
        run_function: returns a tensor or a tuple of tensors.
        tracker: the context's :class:`TPRNGTracker`.
        *args: tensor (or plain) arguments; gradients flow to the tensor ones.
    """
    # NOTE: a reentrant checkpoint only runs its backward when its output needs grad;
    # a dummy leaf that requires grad guarantees that even when no input does (e.g. the
    # first block fed by a frozen embedding), so the block's parameters still get grads.
    dummy = torch.empty(0, device=tracker.device, requires_grad=True)
    return _CheckpointFunction.apply(lambda _, *a: run_function(*a), tracker, dummy, *args)
