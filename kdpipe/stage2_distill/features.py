"""Feature transforms shared by the intermediate-layer methods: pooling a sequence to one vector, and
self-attention relations between tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.errors import UserError
from kdpipe.storage.attention import attention_scores, key_mask


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, H] -> [B, H]. BERT-era methods pool the [CLS] token; a causal LM has none, so: `first`
    token, `last` valid token (the one that has seen the whole sequence), or `mean` over valid tokens."""
    if how == "first":
        return hidden[:, 0]
    if how == "last":
        last = mask.long().sum(1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    raise UserError(f"pooling {how!r} is not one of first, last, mean")


def own_channel_scale(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] states divided by each channel's RMS over this batch's valid tokens (not back-propagated):
    the student's counterpart of Context.scale_hidden, for methods that compare relations within each
    model (whose widths may differ) rather than states."""
    valid = mask.unsqueeze(-1).to(x.dtype)
    ms = ((x.detach() ** 2) * valid).sum((0, 1)) / valid.sum((0, 1)).clamp_min(1)
    return x / (ms + 1e-6 * ms.mean() + 1e-12).sqrt()


def own_token_scale(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H] states, each divided by its own RMS over the features: what a model's RMSNorm sees (weights
    aside), so one token's massive activations do not set every relation's scale."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of [B, T, H] states over valid tokens and features (padding left out)."""
    valid = mask.unsqueeze(-1).to(teacher.dtype)
    return (((student.float() - teacher) ** 2) * valid).sum() / (valid.sum().clamp_min(1) * teacher.shape[-1])


def attend_layers(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """ALP-KD's layer attention: each example's student vector [B, H] attends over its teacher layer
    vectors [B, L, H] by dot product; returns the attention-weighted teacher vector [B, H]."""
    alpha = torch.softmax((teacher @ student.unsqueeze(-1)).squeeze(-1), -1)  # [B, L]
    return (alpha.unsqueeze(-1) * teacher).sum(1)


def relation_logits(x: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLMv2 relations: the heads of x [B, h(_kv), T, d] are concatenated ([B, T, h*d]), re-split into
    `heads` relation heads of size d_r, and related token to token: X_r X_r^T / sqrt(d_r) -> [B, R, T, T].
    Grouped-query K/V heads are concatenated as they are: repeating them first (as attention uses them)
    would put each dimension in a relation head several times and sharpen its relations by sqrt(repeats)."""
    b, h, t, d = x.shape
    if (h * d) % heads:
        raise UserError(f"relation_heads={heads} does not divide the attention width {h * d}: choose a divisor")
    x = x.transpose(1, 2).reshape(b, t, heads, h * d // heads).transpose(1, 2).float()
    return x @ x.transpose(-1, -2) / (x.shape[-1] ** 0.5)


def relation_kl(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) over keys, causal and padding keys masked, averaged over
    relation heads and valid query positions."""
    t = teacher.shape[-1]
    keep = key_mask(t, t, True, None, teacher.device) & mask[:, None, None, :]
    t_logp = F.log_softmax(teacher.masked_fill(~keep, float("-inf")), -1)
    s_logp = F.log_softmax(student.masked_fill(~keep, float("-inf")), -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).masked_fill(~keep, 0).sum(-1)  # [B, R, T]
    rows = mask[:, None, :].expand_as(kl).to(kl.dtype)
    return (kl * rows).sum() / rows.sum().clamp_min(1)


def causal_scores(q: torch.Tensor, k: torch.Tensor, scaling: float, heads_like: int | None = None,
                  allowed: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """Pre-softmax attention scores [B, h, T, T] with the masked entries set to 0 (TinyBERT's convention for
    masked scores). `allowed` is the model's own mask (its sliding window; plain causal when None). With
    `heads_like` set and a different head count, the head mean [B, 1, T, T] is returned, so that models
    with different head counts can be compared."""
    s = attention_scores(q, k, scaling, softcap)
    s = s.masked_fill(~_allowed(s, allowed), 0.0)
    return s.mean(1, keepdim=True) if heads_like is not None and heads_like != s.shape[1] else s


def causal_log_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, allowed: torch.Tensor | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """Log attention distributions [B, h, T, T] under the model's own mask (`allowed`; causal when None)."""
    s = attention_scores(q, k, scaling, softcap)
    return F.log_softmax(s.masked_fill(~_allowed(s, allowed), float("-inf")), -1)


def _allowed(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    return key_mask(scores.shape[-2], scores.shape[-1], True, None, scores.device) if allowed is None else allowed
