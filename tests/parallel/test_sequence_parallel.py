"""Sequence parallelism (Korthikanti et al. 2022, ``parallel.sequence_parallel``) against
independent references: the dense one-process model, the same run at TP=1 through the
trainer, the collectives it makes, and the TP ranks' norm weights."""

import pytest
import torch
import torch.distributed as dist

from megatron_lite.models import build_model
from megatron_lite.parallel import full_state_dict
from megatron_lite.parallel.comm import all_gather_list
from megatron_lite.parallel.mappings import (
    gather_from_sequence_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
    sequence_parallel_linear,
)
from tests.distributed import max_dev
from tests.models.test_models_tp import (
    _check_activation_checkpointing,
    _check_against_dense,
    make_batch,
    tiny_cfg,
)


def _with_sp(ctx, check, *args) -> None:
    ctx.sequence_parallel.enabled = True
    check(ctx, *args)
    assert ctx.sequence_parallel.active, "the forward did not split the sequence"


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_sequence_parallel_model_matches_dense(distributed, arch, tp):
    # logits, loss and every gradient (the norms' ones summed over TP) at identical
    # parameters, then the parameters after 3 AdamW steps
    distributed(_with_sp, tp, _check_against_dense, arch)
