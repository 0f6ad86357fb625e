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

Under ``torch.compile`` the swap cannot be traced (dynamo breaks the graph at
``get_rng_state`` after a random op, and inductor draws its own random numbers from
seeds taken from the default generator). :meth:`TPRNGTracker.uniform` is the traceable
form of a per-rank stream: a counter-based hash of (the element's index, a 32-bit key
drawn from the *default* generator, this rank's seed). The default generator advances
identically on every TP rank, so replicated regions stay in step, while the rank's seed
makes the numbers its own; no state is mutated, so activation checkpointing and resume
reproduce it from the default generator's state alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mix (xor-shift / multiply rounds) of int64 values in
    ``[0, 2**32)``. NOTE: multipliers below 2**31 keep every product under 2**63, so no
    step relies on int64 overflow (undefined in the C++ inductor emits)."""
    for mult, shift in ((0x7FEB352D, 15), (0x2C1B3C6D, 12), (0x297A2D39, 15)):
        x = (x ^ (x >> 16)) * mult & _MASK32
        x = x ^ (x >> shift)
    return x


def hash_uniform(shape, key: torch.Tensor, seed: int, device=None) -> torch.Tensor:
    """fp32 uniforms in ``[0, 1)`` for every element of ``shape``: a pure function of the
    element index, the int64 tensor ``key`` (``[1]``, a value in ``[0, 2**32)``) and the
    python int ``seed``. Traceable by ``torch.compile`` (integer tensor ops only)."""
    numel = 1
    for n in shape:
        numel *= n
    idx = torch.arange(numel, device=device, dtype=torch.int64) & _MASK32
    x = _mix32(_mix32(idx ^ key) ^ ((seed ^ (seed >> 32)) & _MASK32))
    return ((x >> 8).to(torch.float32) * 2.0**-24).view(shape)


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
        self._seeds: dict[str, int] = {}

    def add(self, name: str, seed: int) -> None:
        """Register a stream ``name`` seeded with ``seed`` (without touching the default one)."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        self._states[name] = _fresh_state(self.device, seed)
        self._seeds[name] = seed

    def reset(self) -> None:
        """Forget every tracked state (modules holding this tracker keep working)."""
        self._states, self._seeds = {}, {}

    def ensure(self, name: str = TP_REGION) -> None:
        """Seed stream ``name`` if it is not yet (lazily, from the default stream: so TP=1
        code works without setup). Call before ``torch.compile`` traces :meth:`uniform`."""
        if name not in self._states:
            self.add(name, int(torch.randint(0, 2**62, (1,)).item()))

    def uniform(self, shape, device=None, name: str = TP_REGION) -> torch.Tensor:
        """``[shape]`` fp32 uniforms of this rank's stream ``name``, traceable by
        ``torch.compile`` (see the module docstring): one 32-bit key drawn from the
        default generator per call, hashed with every element index and the stream's seed.
        """
        if name not in self._seeds:
            raise RuntimeError(f"RNG stream {name!r} is not seeded: call ensure() first")
        key = torch.randint(0, 2**32, (1,), device=device, dtype=torch.int64)
        return hash_uniform(shape, key, self._seeds[name], device)

    def dropout(self, x: torch.Tensor, p: float, training: bool = True,
                name: str = TP_REGION) -> torch.Tensor:
        """Dropout of ``x`` with this rank's stream ``name``: eager, ``F.dropout`` inside
        :meth:`fork`; while ``torch.compile`` traces, a mask from :meth:`uniform`."""
        if not training or p == 0.0:
            return x
        if not torch.compiler.is_compiling():
            with self.fork(name):
                return torch.nn.functional.dropout(x, p, True)
        keep = self.uniform(x.shape, x.device, name) >= p
        return x * keep.to(x.dtype) / (1.0 - p)

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of every tracked state (for checkpoints)."""
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace the tracked states (from :meth:`get_states`); the seeds stay."""
        self._states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TP_REGION) -> Iterator[None]:
        """Run the body with the default generator replaced by the tracked stream ``name``.

        An unseeded tracker (e.g. a bare module built outside a job) is seeded lazily
        from the current default stream, so TP=1 code works without setup.
        """
        self.ensure(name)
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
    if torch.compiler.is_compiling():
        # inside a compiled region (selective recompute of the attention core): the
        # traceable checkpoint; the compiler's partitioner recomputes the region in the
        # backward graph and keeps what random ops drew, so the masks are the forward's
        return torch.utils.checkpoint.checkpoint(run_function, *args, use_reentrant=False)
    # NOTE: a reentrant checkpoint only runs its backward when its output needs grad;
    # a dummy leaf that requires grad guarantees that even when no input does (e.g. the
    # first block fed by a frozen embedding), so the block's parameters still get grads.
    dummy = torch.empty(0, device=tracker.device, requires_grad=True)
    return _CheckpointFunction.apply(lambda _, *a: run_function(*a), tracker, dummy, *args)


def checkpoint_nonreentrant(run_function: Callable[..., Any], tracker: TPRNGTracker,
                            *args: Any) -> Any:
    """:func:`checkpoint` on torch's non-reentrant checkpoint (saved-tensor hooks), the
    recomputation run with every RNG stream (the default generators and the tracker's
    TP-region states) as it was in forward, and restored after.

    For stages of ``torch.distributed.pipelining``: with several micro-batches in flight
    (1F1B), the reentrant :func:`checkpoint` gave the first stage wrong gradients there
    (torch 2.13, gloo, CPU: step-1 gradient norm off by 14 %); this one matches a
    run without recomputation.
    """
    saved: dict = {}

    @contextlib.contextmanager
    def forward():
        saved["rng"] = rng_state(tracker)
        yield

    @contextlib.contextmanager
    def recompute():
        after = rng_state(tracker)
        set_rng_state(tracker, saved["rng"])
        try:
            yield
        finally:
            set_rng_state(tracker, after)

    return torch.utils.checkpoint.checkpoint(
        run_function, *args, use_reentrant=False, context_fn=lambda: (forward(), recompute()))
