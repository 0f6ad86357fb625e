"""Self-attention relations and their KL divergences: MiniLM and MiniLMv2 distillation.

MiniLM (Wang et al. 2020, "Deep Self-Attention Distillation"): the student's last layer
learns the teacher's last-layer **attention distributions** ``softmax(q k^T / sqrt(d_k))``
and **value relations** ``softmax(v v^T / sqrt(d_k))``, per head (so the head counts must
match), KL(teacher || student) averaged over heads and query positions, summed.

MiniLMv2 ("Multi-Head Self-Attention Relation Distillation"): for queries, keys and
values separately, concatenate the heads (``[s, h]``), split that into ``R`` relation
heads of ``d_r = h / R``, and take ``softmax(x x^T / sqrt(d_r))``; the KL of each of the
three (Q-Q, K-K, V-V) averaged. Student and teacher only share ``R``, not their heads.

A relation is ``[b, heads, s, s]`` over keys: padding keys (BERT) and, for a causal model,
future keys are masked out of the softmax; padded query rows are not averaged. Tensor
parallelism: a TP rank holds whole attention heads, so its slice of the concatenated
hidden is whole relation heads when ``R`` is a multiple of the TP size; each rank sums its
heads' KL and one all-reduce (identity in backward) adds the ranks.
"""

from __future__ import annotations

import torch

from megatron_lite.parallel import reduce_from_tp_region

MASKED = -1e9  # finite: exp() is 0, and the teacher's and student's masked logits cancel


def relation(x: torch.Tensor, y: torch.Tensor, d: int, allowed: torch.Tensor | None
             ) -> torch.Tensor:
    """Log-probabilities ``log_softmax(x y^T / sqrt(d))`` over keys, fp32, ``[b, H, s, s]``;
    ``allowed`` (broadcast to it) masks keys out."""
    logits = torch.matmul(x.float(), y.float().transpose(-1, -2)) / d ** 0.5
    if allowed is not None:
        logits = logits.masked_fill(~allowed, MASKED)
    return torch.log_softmax(logits, dim=-1)


def split_relation_heads(x: torch.Tensor, local_relation_heads: int) -> torch.Tensor:
    """``[b, H, s, d]`` attention heads -> ``[b, R, s, H d / R]``: the heads concatenated
    (head-major, as the hidden dimension holds them) and cut into relation heads."""
    b, heads, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, local_relation_heads, heads * d // local_relation_heads
                                     ).transpose(1, 2)


def kl_sum(teacher_logp: torch.Tensor, student_logp: torch.Tensor,
           queries: torch.Tensor | None) -> torch.Tensor:
    """Sum over heads and valid queries of KL(teacher || student) over keys."""
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # [b, H, s]
    if queries is not None:
        kl = kl * queries[:, None, :]
    return kl.sum()


def masks(captured: tuple, attention_mask: torch.Tensor | None
          ) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """``(allowed keys, valid queries, number of valid queries)`` of a captured forward."""
    q = captured[0]
    b, _, s, _ = q.shape
    allowed = None
    if captured[4]:  # causal
        allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()[None, None]
    queries = None
    if attention_mask is not None:
        keys = attention_mask.bool()[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
        queries = attention_mask.float()
    count = float(queries.sum()) if queries is not None else float(b * s)
    return allowed, queries, count


def minilm_losses(teacher: tuple, student: tuple, heads: int, tp_group,
                  attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """MiniLM: ``{"attention": KL, "value": KL}`` of captured ``(q, k, v, mask, causal)``
    (``[b, H/tp, s, d]`` each) of the teacher's and the student's layer; ``heads`` is the
    total head count (the same for both)."""
    allowed, queries, count = masks(student, attention_mask)
    out = {}
    for name, (ti, tj), (si, sj) in (("attention", (0, 1), (0, 1)),
                                      ("value", (2, 2), (2, 2))):
        t_logp = relation(teacher[ti], teacher[tj], teacher[ti].shape[-1], allowed)
        s_logp = relation(student[si], student[sj], student[si].shape[-1], allowed)
        total = reduce_from_tp_region(kl_sum(t_logp.detach(), s_logp, queries), tp_group)
        out[name] = total / (heads * count)
    return out


def minilmv2_losses(teacher: tuple, student: tuple, relation_heads: int, tp_size: int,
                    tp_group, attention_mask: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
    """MiniLMv2: ``{"query": KL, "key": KL, "value": KL}`` over ``relation_heads``."""
    allowed, queries, count = masks(student, attention_mask)
    local = relation_heads // tp_size
    out = {}
    for name, i in (("query", 0), ("key", 1), ("value", 2)):
        t = split_relation_heads(teacher[i], local)
        s = split_relation_heads(student[i], local)
        t_logp = relation(t, t, t.shape[-1], allowed)
        s_logp = relation(s, s, s.shape[-1], allowed)
        total = reduce_from_tp_region(kl_sum(t_logp.detach(), s_logp, queries), tp_group)
        out[name] = total / (relation_heads * count)
    return out

