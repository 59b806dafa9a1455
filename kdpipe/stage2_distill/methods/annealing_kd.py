"""Annealing-KD: Jafari, Rezagholizadeh, Sharma, Ghodsi 2021, "Annealing Knowledge Distillation".

Phase 1 (the first `phase1` fraction of steps): the student's logits regress (MSE) onto annealed
teacher logits Phi(T) * z_t, with T stepping down from `max_temperature` to 1 and
Phi(T) = 1 - (T - 1) / max_temperature, so the target sharpens gradually to the teacher's own logits.
Phase 2: the hard-label loss alone. From the cache, the MSE runs over the teacher's top-k tokens only,
whose raw logits are exact (stored log-probabilities plus the full-vocabulary logsumexp): the paper
regresses every logit, but the cache holds no raw logit outside the top-k (the tail is one mass, which
fixes no individual logit), so the student's tail logits are left free in phase 1.
"""

from __future__ import annotations

import math

from kdpipe.stage2_distill.losses import lm_loss, topk_logit_mse
from kdpipe.stage2_distill.methods.base import Method, Needs, register


@register
class AnnealingKD(Method):
    name = "annealing_kd"
    paper = "Jafari et al. 2021"
    adapted = "the annealed MSE covers the k cached logits, not the whole vocabulary"
    defaults = {"max_temperature": 7, "phase1": 0.5}

    def needs(self) -> Needs:
        return Needs(topk=True, temperatures=[1.0])

    def annealing_factor(self, step: int) -> float:
        """Phi(T) for the current step of phase 1: T = max_temperature, ..., 1 in equal stages."""
        tau = int(self.params["max_temperature"])
        phase1 = max(1, int(self.ctx.total_steps * float(self.params["phase1"])))
        stage = min(tau - 1, step * tau // phase1)
        temperature = tau - stage
        return 1 - (temperature - 1) / tau

    def loss(self, batch, out, step):
        phase1 = max(1, math.floor(self.ctx.total_steps * float(self.params["phase1"])))
        if step < phase1:
            raw = batch.topk_logprobs + batch.logsumexp[..., :1]
            target = self.annealing_factor(step) * raw
            return {"annealed_mse": topk_logit_mse(out.logits, batch.topk_ids, target, batch.predicts)}
        return {"hard": lm_loss(out.logits, batch.input_ids, batch.targets)}
