"""Logit signals without ever holding the full B x T x V logits.

The teacher's output head is intercepted for the duration of a forward pass: instead of the
vocabulary projection of every position at once, it projects `rows` positions at a time and keeps
only what the cache stores (top-k, the full-vocabulary logsumexp per temperature, and optional
sampled ids). Peak logit memory drops from B*T*V*4 bytes to rows*V*4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass
class LogitSpec:
    top_k: int
    temperatures: Sequence[float]
    vocab_size: int
    rows: int = 512
    sample_count: int = 0
    sample_temperature: float = 1.0
    sampler: str = "multinomial"  # or "systematic" (systematic_draws)
    seed: int = 0
    scale: float = 1.0  # what the model multiplies its head's output by (Granite, Cohere, Falcon-H1)
    softcap: float | None = None  # final-logit soft-capping (Gemma 2 style), applied as the model does


# What transformers' causal-LM classes do to the head's output before returning it, by the attribute
# that holds the constant (on the model, its inner model, or its config): multiply, or divide by it.
# `kdpipe extract` checks the result against the model's own forward before writing anything
# (stage1_extract.probe), so a transform missing here is refused by name, never stored wrong.
SCALES = (("logit_scale", False), ("lm_head_multiplier", False), ("logits_scaling", True))
SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap")


def head_transform(model: nn.Module) -> tuple[float, float | None]:
    """(scale, softcap) the model applies after its LM head: logits * scale, then tanh(x / c) * c."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    places = [model, getattr(model, "model", None), config]
    scale, softcap = 1.0, None
    for name, divide in SCALES:
        value = next((getattr(p, name) for p in places if isinstance(getattr(p, name, None), (int, float))), None)
        if value is not None and not isinstance(value, bool):
            scale = scale / value if divide else scale * value
    for name in SOFTCAPS:
        value = next((getattr(p, name) for p in places if isinstance(getattr(p, name, None), (int, float))), None)
        softcap = softcap or value
    return float(scale), (float(softcap) if softcap else None)


class LogitSignals:
    """Outputs of one forward pass: topk ids and log-probabilities at T=1 [B, T, k] (temperatures[0] must be
    1), logsumexp and the log-mass outside the top-k [B, T, n_temps], and when sampling, unique ids, their
    counts and their T=1 log-probabilities [B, T, m] (ids by count, descending; unused slots have count 0)."""

    def __init__(self, spec: LogitSpec):
        self.spec = spec
        self.topk_ids = self.topk_values = self.logsumexp = self.logtail = None
        self.sampled_ids = self.sampled_counts = self.sampled_logprobs = None

    def compute(self, hidden: torch.Tensor, project, sequence_ids: Sequence[int]) -> None:
        spec = self.spec
        b, t, _ = hidden.shape
        k, n_temps = spec.top_k, len(spec.temperatures)
        m = min(spec.sample_count, spec.vocab_size)
        dev = hidden.device
        self.topk_ids = torch.empty(b, t, k, dtype=torch.int64, device=dev)
        self.topk_values = torch.empty(b, t, k, dtype=torch.float32, device=dev)
        self.logsumexp = torch.empty(b, t, n_temps, dtype=torch.float32, device=dev)
        self.logtail = torch.empty(b, t, n_temps, dtype=torch.float32, device=dev)
        if m:
            self.sampled_ids = torch.empty(b, t, m, dtype=torch.int64, device=dev)
            self.sampled_counts = torch.empty(b, t, m, dtype=torch.int64, device=dev)
            self.sampled_logprobs = torch.empty(b, t, m, dtype=torch.float32, device=dev)
        for b0, b1, t0, t1 in _windows(b, t, spec.rows):
            logits = project(hidden[b0:b1, t0:t1]).float()
            if spec.scale != 1.0:
                logits.mul_(spec.scale)
            if spec.softcap:
                logits = torch.tanh(logits / spec.softcap) * spec.softcap
            values, ids = logits.topk(k, dim=-1)
            # the row maximum: every exp below is of a value <= 0 (a sampled-only cache keeps no top-k)
            top = values[..., :1] if k else logits.amax(-1, keepdim=True)
            shifted = logits.sub_(top)  # in place: the slice's raw logits are not needed again
            drawn = self._sample(shifted, b0, t0, sequence_ids) if m else None
            # The top-k and the rest are summed apart, so the tail mass is a sum of its own terms, exact
            # down to ~1e-38, not 1 - sum(top-k), which float32 cannot resolve below ~1e-7.
            head = values - top
            rest = shifted.scatter_(-1, ids, float("-inf"))  # in place again
            tails = _tail_sums(rest, spec.temperatures)
            for i, temp in enumerate(spec.temperatures):
                head_sum = (head / temp).exp().sum(-1)  # >= 1: the maximum contributes exp(0)
                tail_sum = tails[i]
                total = (head_sum + tail_sum).log()
                self.logsumexp[b0:b1, t0:t1, i] = top[..., 0] / temp + total
                self.logtail[b0:b1, t0:t1, i] = tail_sum.log() - total
            lse = self.logsumexp[b0:b1, t0:t1, :1]
            # stored as log-probabilities: float16 resolves them near 0, where the mass is; raw logits of
            # ~20 would be off by up to 1/64 and the top-k mass could exceed 1
            self.topk_values[b0:b1, t0:t1] = values - lse
            self.topk_ids[b0:b1, t0:t1] = ids
            if drawn is not None:
                self.sampled_logprobs[b0:b1, t0:t1] = drawn + top - lse

    def _sample(self, shifted: torch.Tensor, b0: int, t0: int, sequence_ids: Sequence[int]) -> torch.Tensor:
        """m draws per position from the teacher at the sampling temperature, by rows of one sequence (the
        generator is seeded per sequence, so results do not depend on the batch size, the rank or a resume);
        returns the drawn ids' shifted logits (logit - row maximum), for their log-probabilities."""
        spec = self.spec
        weights = (shifted / spec.sample_temperature).exp()
        t1 = t0 + shifted.shape[1]
        for j in range(shifted.shape[0]):
            if t0 == 0:
                self._generator = torch.Generator(device=shifted.device)
                self._generator.manual_seed(spec.seed * 1_000_003 + int(sequence_ids[b0 + j]))
            if spec.sampler == "systematic":
                offsets = torch.rand(weights.shape[1], 1, dtype=torch.float64, generator=self._generator,
                                     device=weights.device)
                draws = systematic_draws(weights[j], spec.sample_count, offsets)
            else:
                draws = torch.multinomial(weights[j], spec.sample_count, replacement=True, generator=self._generator)
            ids, counts = distinct_counts(draws)
            width = self.sampled_ids.shape[-1]  # min(m, V): at most V distinct ids, the rest unused slots
            self.sampled_ids[b0 + j, t0:t1] = ids[:, :width]
            self.sampled_counts[b0 + j, t0:t1] = counts[:, :width]
        return shifted.gather(-1, self.sampled_ids[b0:b0 + shifted.shape[0], t0:t1])


def _tail_sums(rest: torch.Tensor, temperatures: Sequence[float]) -> list[torch.Tensor]:
    """sum exp(x / T) over each row of `rest` (shifted logits <= 0, -inf on the top-k), per temperature.

    T=2 is the square root of T=1's terms, taken in place: one sqrt instead of a division and an exp over the
    vocabulary, 2.8x faster for the default temperatures 1,2 on a CPU (most of the head's cost beyond its
    matmul and top-k). Terms below float32's range at T=1 (x < -87, denormal or 0) are lost to the sqrt, at
    most V * e^-43.5 in all; a row whose T=2 tail is within 1e4 times that of it is summed directly instead.
    """
    ones = rest.exp()
    sums = {1.0: ones.sum(-1)}
    if 2.0 in temperatures:
        halves = ones.sqrt_().sum(-1)
        low = halves < rest.shape[-1] * 1.3e-19 * 1e4
        if low.any():
            halves[low] = (rest[low] / 2).exp().sum(-1)
        sums[2.0] = halves
    del ones
    return [sums[t] if t in sums else (rest / t).exp().sum(-1) for t in temperatures]


def distinct_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ids of each row of `draws` [T, m] and how often each was drawn, both [T, m]: the most drawn
    first (ties by id), the unused slots id 0 and count 0. Works on the m draws alone; a dense [T, V] count and
    its top-m would cost a pass over the vocabulary."""
    ids = draws.sort(-1).values
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    group = new.cumsum(-1) - 1  # [T, m]: which distinct id each sorted draw is
    counts = torch.zeros_like(ids).scatter_add_(1, group, torch.ones_like(ids))
    distinct = torch.zeros_like(ids).scatter_(1, group, ids)  # a group's draws all write its one id
    counts, order = counts.sort(dim=-1, descending=True, stable=True)
    return distinct.gather(1, order), counts


def systematic_draws(weights: torch.Tensor, m: int, offsets: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The ids [T, m] of m systematic draws per row of unnormalized `weights` [T, V]: the points (u + j) / m,
    j < m, one uniform offset u [T, 1] per row, located in the row's cumulative distribution.

    Each token's expected count is m * p_i exactly, as with m independent draws, so count / m estimates p
    without bias; but a count is always floor(m p_i) or ceil(m p_i): its variance is at most 1/4, where
    independent draws give m p_i (1 - p_i) (3 at p = 1/2, m = 12). A token with m p_i >= 1 is always drawn.

    Located in two levels, so that no float64 pass over the vocabulary is needed (a float64 cumsum over V was
    10x the cost of torch.multinomial): float32 sums of blocks of `block` tokens, accumulated in float64, find
    each point's block; a float64 cumsum of that block alone finds its token. Each token's share of its block
    is exact in float64, the block's share of the row as exact as its float32 sum (relative error ~1e-7).
    """
    t, v = weights.shape
    nb = -(-v // block)
    padded = (weights if v % block == 0 else torch.nn.functional.pad(weights, (0, nb * block - v))).view(t, nb, block)
    sums = padded.sum(-1).double()  # [T, nb]
    ends = sums.cumsum(-1)
    steps = torch.arange(m, dtype=torch.float64, device=weights.device)
    points = (offsets + steps) / m * ends[:, -1:]  # [T, m], each below the row's total
    # bin j is [end_{j-1}, end_j): right=True skips empty blocks (and a token of weight 0 below)
    blk = torch.searchsorted(ends, points, right=True).clamp_(max=nb - 1)
    width = sums.gather(1, blk)
    within = ((points - (ends.gather(1, blk) - width)) / width).clamp_(0, 1 - 1e-12)  # [T, m] in [0, 1)
    inner = padded.gather(1, blk.unsqueeze(-1).expand(t, m, block)).double().cumsum(-1)  # [T, m, block]
    inner = inner / inner[..., -1:]  # not in place: the divisor is a view of the same tensor
    pos = torch.searchsorted(inner, within.unsqueeze(-1), right=True).squeeze(-1).clamp_(max=block - 1)
    return (blk * block + pos).clamp_(max=v - 1)


def _windows(b: int, t: int, rows: int):
    """Slices of at most `rows` positions: whole sequences when they fit, else pieces of one sequence."""
    if t <= rows:
        per = max(1, rows // t)
        for b0 in range(0, b, per):
            yield b0, min(b, b0 + per), 0, t
    else:
        for b0 in range(b):
            for t0 in range(0, t, rows):
                yield b0, b0 + 1, t0, min(t, t0 + rows)


class HeadTap:
    """Context manager: the model's output head computes `LogitSignals` instead of full logits.

    The head module keeps its own forward (and any hooks on it, such as DeepSpeed's parameter
    gathering); it is only called on slices. The model receives a [B, T, 1] placeholder as logits.
    """

    def __init__(self, model: nn.Module, signals: LogitSignals):
        self.head = model.get_output_embeddings()
        self.signals = signals
        self.sequence_ids: Sequence[int] = ()

    def __enter__(self) -> "HeadTap":
        head, cls_forward = self.head, type(self.head).forward

        def forward(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            self.signals.compute(hidden, lambda h: cls_forward(head, h), self.sequence_ids)
            return hidden.new_zeros(hidden.shape[:-1] + (1,))

        head.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        del self.head.forward
