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


def _log1mexp(x: torch.Tensor, floor: float = 1e-7) -> torch.Tensor:
    """log(1 - exp(x)) for x <= -floor, accurate near both ends (Mächler 2012); x above -floor reads as -floor."""
    x = x.clamp(max=-floor)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_logmass(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logp))) over the last axis: the log-probability left outside the given tokens."""
    return _log1mexp(torch.logsumexp(logp, -1).clamp(max=0))


def student_topk_and_tail(student_logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0):
    """The student's log-probabilities at `temperature` of the given tokens [B, T, k], and its log-mass on all
    the others [B, T] (None when the tokens are the whole vocabulary). The tail is a logsumexp over the logits
    outside the tokens, never log(1 - sum of the top-k): that difference cancels in float32 once the tail is
    below ~1e-7, and its gradient vanishes or points the wrong way."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    topk = logq.gather(-1, ids)
    if ids.shape[-1] >= logq.shape[-1]:
        return topk, None
    return topk, logq.scatter(-1, ids, float("-inf")).logsumexp(-1)


def bucket_kl(student_logits: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor, temperature: float = 1.0,
              mask: torch.Tensor | None = None, per_sequence: bool = False,
              t_logtail: torch.Tensor | None = None) -> torch.Tensor:
    """Exact (k+1)-bucket KL(p || q): the k stored tokens, plus one bucket for all the others.

    The teacher's probabilities of the stored tokens are exact (through the full-vocabulary logsumexp) and its
    log tail mass `t_logtail` [B, T] at `temperature` is stored at extraction, summed over the full logits
    (caches from before kdpipe 0.2 lack it: then it is recovered as log(1 - sum p), right for tails above
    ~1e-4 only). Coarsening both distributions the same way can only lower the KL (data-processing
    inequality): this is a lower bound of the full KL, equal to it when k = V.
    """
    s_topk, s_tail = student_topk_and_tail(student_logits, ids, temperature)
    t_logp = t_logp.float()
    kl = (t_logp.exp() * (t_logp - s_topk)).sum(-1)
    if s_tail is not None:
        t_tail = tail_logmass(t_logp) if t_logtail is None else t_logtail.float()
        p_tail = t_tail.exp()
        # a tail that underflowed to 0 contributes 0, with a zero (not NaN) gradient
        kl = kl + p_tail * (torch.where(p_tail > 0, t_tail, torch.zeros_like(t_tail)) - s_tail)
    return masked_mean(kl, mask, per_sequence)


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
                          temperature: float = 1.0, mask: torch.Tensor | None = None, per_sequence: bool = False,
                          t_logp: torch.Tensor | None = None, sample_temperature: float = 1.0,
                          log_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse logit sampling (Anshumann et al. 2025): an estimate of the full cross-entropy H(p_T, q_T) from
    m draws of the teacher at `sample_temperature` (distinct `ids` [B, T, m] with their `counts`).

    At the sampling temperature the count frequencies c_i / m estimate p_i without bias. At another
    temperature T the draws are importance-weighted by p_T / p_s, known from the teacher's T=1
    log-probabilities `t_logp` of the drawn ids: log w_i = (1/T - 1/T_s) * t_logp_i - log_norm, where
    log_norm [B, T] = lse_T - lse_s - (1/T - 1/T_s) * lse_1 from the stored logsumexps makes the estimate
    unbiased; without it the weights are self-normalized (consistent, bias O(1/m)).
    """
    s_logq = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, ids)
    counts = counts.float()
    m = counts.sum(-1, keepdim=True).clamp_min(1)
    if abs(temperature - sample_temperature) < 1e-9:
        weights = counts / m
    elif t_logp is None:
        raise ValueError(f"draws made at T={sample_temperature:g} estimate T={temperature:g} only with the "
                         f"teacher's log-probabilities of the drawn ids (t_logp)")
    else:
        log_w = (1 / temperature - 1 / sample_temperature) * t_logp.float()
        log_w = log_w.masked_fill(counts == 0, float("-inf"))  # padding slots
        if log_norm is None:
            weights = torch.softmax(log_w + counts.log(), -1).nan_to_num(0.0)
        else:
            weights = counts / m * (log_w - log_norm.unsqueeze(-1)).exp()
    return masked_mean(-(weights * s_logq).sum(-1), mask, per_sequence)


def inclusion_weights(t_logp: torch.Tensor, counts: torch.Tensor, temperature: float = 1.0,
                      sample_temperature: float = 1.0, lse1: torch.Tensor | None = None,
                      lse_t: torch.Tensor | None = None, lse_s: torch.Tensor | None = None) -> torch.Tensor:
    """Horvitz-Thompson weights of the distinct drawn ids [B, T, m]: p_T,i / P(i drawn at least once), with
    P = 1 - (1 - r_i)^m for m draws with replacement from the proposal r (the teacher at `sample_temperature`).

    The weighted sum over the drawn ids is an unbiased estimate of sum_i p_T,i f(i) for any f, like the count
    frequencies c_i / m; but a token the draws are sure to reach (r_i = 0.5, m = 12: P = 0.9998) is weighted by
    its exact probability, where c_i / m has a standard deviation of 0.14. The head of the distribution costs no
    variance; only tokens a draw may miss do. Other temperatures need the logsumexps at T=1, T and T_s [B, T].

    Measured, it trains worse students than the counts (bench/RESULTS.md, "Fidelity in one pass": +7.7% held-out
    perplexity from online KD where the counts are +4.8%; at ~5 passes +12.3% against +10.4%). A likely cause,
    not measured: the weights sum to 1 only in expectation, and that sum scales the student's whole distribution
    in the gradient, where the counts' tail draws take their mass from the head. Kept for the fidelity benches,
    not offered as a `kd` estimator."""
    counts = counts.float()
    m = counts.sum(-1, keepdim=True).clamp_min(1)
    t_logp = t_logp.float()
    same = abs(temperature - sample_temperature) < 1e-9
    if same and temperature == 1.0:
        log_p = log_r = t_logp
    elif lse1 is None or lse_t is None or lse_s is None:
        raise ValueError(f"inclusion weights at T={temperature:g} of draws made at T={sample_temperature:g} need "
                         f"the teacher's logsumexp at T=1, {temperature:g} and {sample_temperature:g}")
    else:
        raw = t_logp + lse1.float().unsqueeze(-1)
        log_p = raw / temperature - lse_t.float().unsqueeze(-1)
        log_r = log_p if same else raw / sample_temperature - lse_s.float().unsqueeze(-1)
    # log P(drawn) = log(1 - exp(m log(1 - r))): exact for r near 1 (P -> 1) and for r near 0 (P -> m r)
    # (a floor of 1e-30, not 1e-7: a token drawn at r = 1e-9 has P = m r, far below 1e-7)
    log_hit = _log1mexp(m * torch.log1p(-log_r.exp().clamp(max=1 - 1e-7)), floor=1e-30)
    return (log_p - log_hit).exp().masked_fill(counts == 0, 0.0)  # count 0: a padding slot


def sampled_inclusion_cross_entropy(student_logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                                    temperature: float = 1.0, mask: torch.Tensor | None = None,
                                    per_sequence: bool = False) -> torch.Tensor:
    """An unbiased estimate of the full cross-entropy H(p_T, q_T) from the distinct drawn ids and their
    `inclusion_weights`. The weights do not sum to 1 (they do in expectation), so the gradient in the student's
    logits is (sum w) q - w: unbiased for q - p."""
    s_logq = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, ids)
    return masked_mean(-(weights * s_logq).sum(-1), mask, per_sequence)


def sampled_kl(student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, t_logp: torch.Tensor | None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) at T=1 estimated from draws made at T=1: the mean over draws of log p - log q, unbiased;
    without the drawn ids' log-probabilities (an older cache) NaN, since the teacher's entropy is unknown."""
    if t_logp is None:
        return student_logits.new_tensor(float("nan"))
    s_logq = F.log_softmax(student_logits.float(), dim=-1).gather(-1, ids)
    counts = counts.float()
    freq = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return masked_mean((freq * (t_logp.float() - s_logq)).sum(-1), mask)


def sampled_log_norm(lse: torch.Tensor, temperature: float, sample_temperature: float, temps: list[float]):
    """log_norm of `sampled_cross_entropy` from the stored logsumexps [B, T, n_temps] at `temps`; None when
    the sampling temperature's logsumexp is not stored (the weights are then self-normalized)."""
    index = {round(t, 9): i for i, t in enumerate(temps)}
    i_t, i_s = index.get(round(temperature, 9)), index.get(round(sample_temperature, 9))
    if i_t is None or i_s is None:
        return None
    return lse[..., i_t] - lse[..., i_s] - (1 / temperature - 1 / sample_temperature) * lse[..., 0]


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


def teacher_tail(t_logp: torch.Tensor, t_logtail: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's log-mass outside its top-k at T=1 [B, T]: as stored (`logits/logtail[..., 0]`), or, for a
    cache from before kdpipe 0.2, recovered from the top-k log-probabilities."""
    return tail_logmass(t_logp.float()) if t_logtail is None else t_logtail.float()


def teacher_label_nll(ids: torch.Tensor, t_logp: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                      t_logtail: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's next-token NLL on the data itself, per sequence [B], from its cached top-k at T=1:
    exact where the true next token is among the stored k; elsewhere -log(tail mass), which only the
    whole vocabulary could refine (a lower bound of the true NLL there)."""
    target = input_ids[:, 1:, None]
    logp = t_logp[:, :-1].float()
    hit = ids[:, :-1] == target
    tail = teacher_tail(logp, None if t_logtail is None else t_logtail[:, :-1])
    found = logp.masked_fill(~hit, float("-inf")).logsumexp(-1)
    return masked_mean(-torch.where(hit.any(-1), found, tail), mask[:, 1:], per_sequence=True)
