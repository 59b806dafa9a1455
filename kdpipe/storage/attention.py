"""Attention maps from Q/K factors: the one softmax used when capturing `probs` and when recomputing
them from stored `factors`, so that both forms agree by construction."""

from __future__ import annotations

import torch


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Expand grouped-query K/V heads [B, h_kv, T, d] to [B, h, T, d]."""
    rep = num_heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def attention_scores(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Pre-softmax scores Q K^T * scaling in float32, [B, h, Tq, Tk], soft-capped as the model does
    (Gemma 2: tanh(s / c) * c)."""
    k = repeat_kv(k, q.shape[1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    return torch.tanh(scores / softcap) * softcap if softcap else scores


def key_mask(
    tq: int, tk: int, causal: bool, lengths: torch.Tensor | None, device: torch.device | None = None,
    window: int = 0,
) -> torch.Tensor | None:
    """Boolean [B or 1, 1, Tq, Tk] mask of allowed keys (True = attend), or None when all are. `window`:
    a sliding window (Mistral, Gemma's local layers): query i sees keys i - window + 1 .. i only."""
    mask = None
    if causal:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)
        if window:
            mask &= ~torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq - window)
        mask = mask[None, None]
    if lengths is not None:
        valid = torch.arange(tk, device=device)[None, :] < lengths.to(device)[:, None]
        valid = valid[:, None, None, :]
        mask = valid if mask is None else mask & valid
    return mask


def gather_time(x: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """x at the positions [B, P] of its time axis `dim` (1 for hidden states [B, T, H], 2 for factors [B, h, T, d],
    2 and 3 for masks [B or 1, 1, T, T]); row b of x takes row b's positions."""
    b, p = positions.shape
    x = x.expand(b, *x.shape[1:]) if x.shape[0] == 1 else x
    view = [b] + [1] * (x.dim() - 1)
    view[dim] = p
    size = list(x.shape)
    size[dim] = p
    return x.gather(dim, positions.to(x.device).long().reshape(view).expand(size))


def positions_mask(positions: torch.Tensor, window: int = 0) -> torch.Tensor:
    """[B, 1, P, P] allowed keys among the positions [B, P] of a causal model: query i sees key j when j's position
    is not after i's, and, with a sliding window, fewer than `window` positions before it (key_mask's rule)."""
    d = positions[:, :, None].long() - positions[:, None, :].long()
    allowed = d >= 0
    if window:
        allowed &= d < window
    return allowed[:, None]


def probs_from_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys; masked keys get probability 0 (a fully masked row stays all zero)."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scaling: float, causal: bool, lengths: torch.Tensor | None = None,
    window: int = 0, softcap: float | None = None, positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Post-softmax attention [B, h, T, T] from post-RoPE queries and keys, under the model's own mask; from a
    position-subsampled cache ([B, h, P, d] at `positions` [B, P]) the attention among those positions."""
    if positions is not None:
        mask = positions_mask(positions, window) if causal else None
        if lengths is not None:
            valid = (positions.to(q.device) < lengths.to(q.device)[:, None])[:, None, None, :]
            mask = valid if mask is None else mask & valid
        return probs_from_scores(attention_scores(q, k, scaling, softcap), mask)
    mask = key_mask(q.shape[2], k.shape[2], causal, lengths, q.device, window)
    return probs_from_scores(attention_scores(q, k, scaling, softcap), mask)


def window_of(allowed: torch.Tensor | None) -> int | None:
    """The sliding window a [.., T, T] allowed-key mask (one sequence, no padding) describes: 0 for plain
    causal attention, w for a window of w keys, None for any other pattern."""
    if allowed is None:
        return 0
    allowed = allowed.reshape(-1, *allowed.shape[-2:])[0].bool().cpu()
    t = allowed.shape[-1]
    w = int(allowed.sum(-1).max())
    band = key_mask(t, t, True, None, window=0 if w >= t else w)[0, 0]
    if torch.equal(allowed, band):
        return 0 if w >= t else w
    return None
