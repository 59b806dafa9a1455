"""KD: Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network".

Soft-target loss T^2 * KL(p_T || q_T) between the teacher's and the student's distributions at
temperature T. From a top-k cache the KL is estimated one of three ways (`estimator`):
`bucket` (default): exact (k+1)-bucket KL, the stored top-k plus the known tail mass;
`renorm`: KL of both renormalized over the top-k (what most tools do; biased);
`sampled`: cross-entropy against m draws from the teacher (unbiased; needs --sample-count), importance-
weighted when T is not the temperature the draws were made at (unbiased still, but a few draws of a peaked
teacher rarely reach the tail a higher T spreads mass to: extract with --sample-temperature T for that T).
"""

from __future__ import annotations

import torch

from kdpipe.errors import UserError
from kdpipe.stage2_distill.losses import (bucket_kl, renormalized_topk_kl, sampled_cross_entropy, sampled_log_norm,
                                          teacher_logprobs)
from kdpipe.stage2_distill.methods.base import Batch, Context, Method, Needs, StudentOutput, register

ESTIMATORS = ("bucket", "renorm", "sampled")


def temperature_index(ctx: Context, temperature: float, teacher: int = 0) -> int:
    for i, t in enumerate(ctx.teacher_temperatures[teacher]):
        if abs(t - temperature) < 1e-9:
            return i
    return -1  # reported by Needs.missing before training starts


def soft_loss(batch: Batch, out: StudentOutput, ctx: Context, temperature: float, estimator: str, teacher: int = 0,
              per_sequence: bool = False, logits: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_T || q_T) to teacher `teacher` (the i-th --cache) by the chosen estimator, without the T^2
    factor; one number, or one per sequence. `logits` replaces the student's (another head)."""
    b, logits = batch.teacher(teacher), out.logits if logits is None else logits
    if estimator == "sampled":
        sample_t = ctx.teacher_sample_temperatures[teacher]
        log_norm = sampled_log_norm(b.logsumexp, temperature, sample_t, ctx.teacher_temperatures[teacher])
        return sampled_cross_entropy(logits, b.sampled_ids, b.sampled_counts, temperature, b.predicts, per_sequence,
                                     t_logp=b.sampled_logprobs, sample_temperature=sample_t, log_norm=log_norm)
    i = temperature_index(ctx, temperature, teacher)
    t_logp = teacher_logprobs(b.topk_logprobs, b.logsumexp[..., 0], b.logsumexp[..., i], temperature)
    if estimator == "renorm":
        return renormalized_topk_kl(logits, b.topk_ids, t_logp, temperature, b.predicts, per_sequence)
    t_logtail = None if b.logtail is None else b.logtail[..., i]
    return bucket_kl(logits, b.topk_ids, t_logp, temperature, b.predicts, per_sequence, t_logtail=t_logtail)


def soft_needs(temperature: float, estimator: str) -> Needs:
    if estimator not in ESTIMATORS:
        raise UserError(f"estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")
    if estimator == "sampled":
        return Needs(sampled=True, sampled_at=[temperature])
    return Needs(topk=True, temperatures=[temperature])


@register
class KD(Method):
    name = "kd"
    paper = "Hinton et al. 2015"
    defaults = {"temperature": 1.0, "estimator": "bucket"}

    def needs(self) -> Needs:
        return soft_needs(self.params["temperature"], self.params["estimator"])

    def loss(self, batch: Batch, out: StudentOutput, step: int) -> dict[str, torch.Tensor]:
        t = float(self.params["temperature"])
        return {"kd": t * t * soft_loss(batch, out, self.ctx, t, self.params["estimator"])}
