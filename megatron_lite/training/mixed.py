"""``train.params_dtype=bf16``: Megatron's mixed precision (Micikevicius et al. 2018 with bf16).

With ``train.precision=bf16`` alone, weights stay fp32 and autocast casts them to bf16
in every forward (and keeps the residual stream, LayerNorm and softmax in fp32). Here,
as in Megatron-LM's ``--bf16``, the model itself is bf16:

* parameters, activations and the gradients autograd produces are bf16;
* each parameter has an fp32 ``main_grad``: a hook adds every bf16 gradient into it as
  soon as autograd has accumulated it, and frees the bf16 one, so micro-batches
  accumulate in fp32 and no bf16 gradient outlives its backward;
* the main gradients are averaged over the DP group in fp32 (one coalesced all-reduce
  per ``parallel.ddp_bucket_mb`` bucket after the last micro-batch; DDP, which would
  reduce the bf16 gradients, is not used);
* the optimizer steps fp32 master weights with fp32 Adam moments, and the bf16
  parameters are then copied from the masters.

The masters live in the model's own ``Parameter`` objects while :meth:`MainParams.fp32`
is active (``p.data`` swapped): the optimizer, gradient clipping, checkpoints and their
loading see fp32 tensors under the usual parameter names, so a checkpoint holds the full
fp32 masters exactly as a fp32 or autocast run's does (resume and conversion unchanged).

Memory per parameter, persistent: bf16 weight 2 + fp32 main grad 4 + fp32 master 4 +
Adam 8 = 18 bytes, against autocast's fp32 weight 4 + grad 4 + Adam 8 = 16 plus the
bf16 weight copies autocast keeps for backward (2); the saving is in the activations,
which are bf16 throughout (``bench/train_step.py`` prints both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from megatron_lite.parallel.comm import all_reduce


class MainParams:
    """bf16 parameters with fp32 main gradients and fp32 masters (see the module docstring).

    Args:
        model: an fp32 model, not yet compiled or wrapped; it is cast in place.
        dtype: the parameters' training dtype.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        self.masters = [p.detach().clone() for p in self.params]  # fp32
        self.low = [m.to(dtype) for m in self.masters]  # the parameters' bf16 storage
        for p, low in zip(self.params, self.low, strict=True):
            p.data = low
            if p.requires_grad:
                p.main_grad = torch.zeros_like(low, dtype=torch.float32)
                p.register_post_accumulate_grad_hook(_accumulate)
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                raise ValueError(f"train.params_dtype: buffer {name} would stay fp32")
        self._fp32 = False

    @property
    def trained(self) -> list[nn.Parameter]:
        return [p for p in self.params if p.requires_grad]

    def reduce_grads(self, group, world: int, bucket_bytes: int) -> None:
        """Average the main gradients over ``group`` (``world`` ranks), in fp32 buckets."""
        if world == 1:
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for p in self.trained:
            bucket.append(p.main_grad)
            size += p.main_grad.numel() * 4
            if size >= bucket_bytes:
                _all_reduce_mean(bucket, group, world)
                bucket, size = [], 0
        if bucket:
            _all_reduce_mean(bucket, group, world)

    @contextlib.contextmanager
    def fp32(self, grads: bool = False) -> Iterator[None]:
        """The fp32 masters in the parameters (and, with ``grads``, the main gradients as
        their ``.grad``): for the optimizer step, clipping, saving and loading. On exit the
        bf16 parameters are copied from the (possibly updated or loaded) masters, and with
        ``grads`` the main gradients are zeroed for the next step."""
        if self._fp32:
            raise RuntimeError("MainParams.fp32 is not re-entrant")
        self._fp32 = True
        for p, master in zip(self.params, self.masters, strict=True):
            p.data = master
            if grads and p.requires_grad:
                p.grad = p.main_grad
        try:
            yield
        finally:
            with torch.no_grad():
                for p, master, low in zip(self.params, self.masters, self.low, strict=True):
                    low.copy_(master)
                    p.data = low
                    if grads and p.requires_grad:
                        p.grad = None
                        p.main_grad.zero_()
            self._fp32 = False


def _accumulate(p: torch.Tensor) -> None:
    """Post-accumulate-grad hook: the bf16 gradient into the fp32 main gradient."""
    p.main_grad.add_(p.grad)
    p.grad = None


def _all_reduce_mean(tensors: list[torch.Tensor], group, world: int) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce(flat, group)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()

