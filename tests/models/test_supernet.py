"""PAR's supernet: Gumbel-softmax weights, and the mixed block against its branches."""

import torch

from megatron_lite.experiments.supernet import SuperTransformer, gumbel_softmax
from megatron_lite.parallel import ParallelContext
from tests.models.test_models_tp import tiny_cfg


def test_gumbel_softmax_sums_to_one_and_hardens_as_tau_falls():
    logits = torch.tensor([[0.3, -1.0, 2.0], [0.0, 0.0, 0.0]], requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    for tau in (5.0, 1.0, 0.1):
        w = gumbel_softmax(logits, tau, torch.Generator().manual_seed(1))
        assert torch.allclose(w.sum(-1), torch.ones(2)) and (w >= 0).all()
    cold = gumbel_softmax(logits, 1e-3, torch.Generator().manual_seed(1))
    assert torch.allclose(cold.max(-1).values, torch.ones(2), atol=1e-6)  # one-hot
    warm = gumbel_softmax(logits, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(cold.argmax(-1), warm.argmax(-1))  # the same noise, sharpened
    hard = gumbel_softmax(logits, 1.0, gen, hard=True)
    assert set(hard.detach().flatten().tolist()) == {0.0, 1.0} and torch.equal(
        hard.detach().sum(-1), torch.ones(2))
    hard[:, 0].sum().backward()  # straight through: the soft weights' gradient
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_a_one_hot_block_is_its_branch():
    torch.manual_seed(0)
    cfg = tiny_cfg("gpt")
    net = SuperTransformer(cfg, ParallelContext(), blocks=3).eval()
    with torch.no_grad():  # softmax(alpha) one-hot (to float precision): s, i, f
        net.alpha.copy_(torch.tensor([[60.0, 0, 0], [0, 0, 60.0], [0, 60.0, 0]]))
    x = torch.randn(2, 5, 32)
    want = net.final_ln(net.ffn[2](net.attn[0](x)))  # block 1 is the identity
    assert (net(x) - want).abs().max() <= 1e-5
    assert net.pattern() == "sf"


def test_training_weights_use_the_keyed_noise_only():
    net = SuperTransformer(tiny_cfg("gpt"), ParallelContext(), blocks=4).train()
    net.key = (3, 0)
    torch.manual_seed(1)
    a = net.weights()
    torch.manual_seed(2)  # the global RNG plays no part
    assert torch.equal(a, net.weights())
    net.key = (4, 0)
    assert not torch.equal(a, net.weights())


def test_fewer_branches_mix_only_those():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32)
    only_attention = SuperTransformer(tiny_cfg("gpt"), ParallelContext(), blocks=2,
                                      branches="s").eval()
    assert only_attention.alpha.shape == (2, 1)
    want = only_attention.final_ln(only_attention.attn[1](only_attention.attn[0](x)))
    assert (only_attention(x) - want).abs().max() <= 1e-6  # a single branch has weight 1
    mixed = SuperTransformer(tiny_cfg("gpt"), ParallelContext(), blocks=1, branches="fi").eval()
    want = mixed.final_ln(0.5 * mixed.ffn[0](x) + 0.5 * x)  # softmax(0, 0) = (1/2, 1/2)
    assert (mixed(x) - want).abs().max() <= 1e-6 and mixed.pattern() == "f"
