"""Logit-level losses from a top-k teacher cache, each against the student's full-vocabulary logits.

Shapes: student logits [B, T, V]; teacher top-k ids [B, T, k] and log-probabilities at T=1 [B, T, k];
the teacher's full-vocabulary logsumexp per stored temperature; `mask` [B, T] marks valid positions.
Every loss is a mean over valid positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_logprobs(logprobs1: torch.Tensor, lse1: torch.Tensor, lse_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exact teacher log-probabilities at `temperature` of the stored tokens: log p_T = raw / T - lse_T,
    with raw = log p_1 + lse_1."""
    if temperature == 1.0:
        return logprobs1
    return (logprobs1 + lse1.unsqueeze(-1)) / temperature - lse_t.unsqueeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, per_sequence: bool = False) -> torch.Tensor:
    """Mean over valid positions: one number, or one per sequence [B] (multi-teacher weighting)."""
    mask = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    if per_sequence:
        return (x * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return (x * mask).sum() / mask.sum().clamp_min(1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_logmass(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logp))) over the last axis: the log-probability left outside the given tokens."""
    return _log1mexp(torch.logsumexp(logp, -1).clamp(max=0))


def bucket_kl(student_logits: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor, temperature: float = 1.0,
              mask: torch.Tensor | None = None, per_sequence: bool = False) -> torch.Tensor:
    """Exact (k+1)-bucket KL(p || q): the k stored tokens, plus one bucket for all the others.

    The teacher's probabilities of the stored tokens are exact (through the full-vocabulary logsumexp),
    so its tail mass 1 - sum(p_topk) is known. Coarsening both distributions the same way can only lower
    the KL (data-processing inequality): this is a lower bound of the full KL, equal to it when k = V.
    """
    s_logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_topk = s_logq.gather(-1, ids)
    t_logp = t_logp.float()
    p = t_logp.exp()
    kl_topk = (p * (t_logp - s_topk)).sum(-1)
    t_tail, s_tail = tail_logmass(t_logp), tail_logmass(s_topk)
    p_tail = t_tail.exp()
    kl_tail = torch.where(p_tail > 1e-6, p_tail * (t_tail - s_tail), torch.zeros_like(p_tail))
    return masked_mean(kl_topk + kl_tail, mask, per_sequence)


def renormalized_topk_kl(student_logits: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor,
                         temperature: float = 1.0, mask: torch.Tensor | None = None,
                         per_sequence: bool = False) -> torch.Tensor:
    """KL between teacher and student both renormalized over the teacher's top-k: what most tools do.
    It ignores the tail and is biased when the top-k holds little mass; kept for comparison."""
    s_topk = (student_logits.float() / temperature).gather(-1, ids)
    s_logq = F.log_softmax(s_topk, dim=-1)
    t_logp = F.log_softmax(t_logp.float(), dim=-1)
    return masked_mean((t_logp.exp() * (t_logp - s_logq)).sum(-1), mask, per_sequence)


def sampled_cross_entropy(student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                          temperature: float = 1.0, mask: torch.Tensor | None = None,
                          per_sequence: bool = False) -> torch.Tensor:
    """Sparse logit sampling (Anshumann et al. 2025): with m draws from the teacher distribution, the count
    frequencies c_i / m are an unbiased estimate of p_i, so -sum_i (c_i / m) log q_i is an unbiased
    estimate of the full cross-entropy H(p, q) (the KL up to the teacher's entropy, a constant)."""
    s_logq = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, ids)
    counts = counts.float()
    freq = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return masked_mean(-(freq * s_logq).sum(-1), mask, per_sequence)


def topk_logit_mse(student_logits: torch.Tensor, ids: torch.Tensor, t_logits: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's raw logits on the teacher's top-k."""
    s = student_logits.float().gather(-1, ids)
    return masked_mean(((s - t_logits.float()) ** 2).mean(-1), mask)


def lm_loss(student_logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
            per_sequence: bool = False) -> torch.Tensor:
    """Next-token cross-entropy on the data itself (hard labels)."""
    logits = student_logits[:, :-1].float()
    target = input_ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    ce = ce.view(target.shape)
    return masked_mean(ce, None if mask is None else mask[:, 1:], per_sequence)


def teacher_label_nll(ids: torch.Tensor, t_logp: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The teacher's next-token NLL on the data itself, per sequence [B], from its cached top-k at T=1:
    exact where the true next token is among the stored k; elsewhere -log(tail mass), which only the
    whole vocabulary could refine (a lower bound of the true NLL there)."""
    target = input_ids[:, 1:, None]
    logp = t_logp[:, :-1].float()
    hit = ids[:, :-1] == target
    tail = tail_logmass(logp)
    found = logp.masked_fill(~hit, float("-inf")).logsumexp(-1)
    return masked_mean(-torch.where(hit.any(-1), found, tail), mask[:, 1:], per_sequence=True)
