"""Dynamic KD ("Uncertainty"): Li, Lin, Ren, Zhang, Sun 2021, "Dynamic Knowledge Distillation for
Pre-trained Language Models".

The student's own uncertainty steers what it learns from, per example: u = its mean prediction
entropy over valid positions divided by log V (in [0, 1], not back-propagated). With one teacher the
soft loss is weighted by u (dynamic supervision: learn more where unsure). With n teachers ordered
from smallest to largest (`order`, default: by hidden size x layers), teacher j (of 0..n-1) gets
    w_j = u + (1 - 2u) * j / (n - 1), normalized over j,
so a confident student leans on the largest teacher and an uncertain one on the smallest (the
teacher adoption GKD's implementation settled on), and L = sum_j mean_b [w_j T^2 KL_j]: the weights sum to
1 per example, so n teachers that agree cost what one does (no second 1/n).
"""

from __future__ import annotations

import math

import torch

from kdpipe.errors import UserError
from kdpipe.stage2_distill.losses import masked_mean
from kdpipe.stage2_distill.methods.base import register
from kdpipe.stage2_distill.methods.multi import MultiTeacherMethod


def normalized_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of softmax(logits) over valid positions, / log V, per sequence [B]."""
    logp = torch.log_softmax(logits.float(), -1)
    return masked_mean(-(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1]), mask, per_sequence=True)


@register
class Uncertainty(MultiTeacherMethod):
    name = "uncertainty"
    paper = "Li et al. 2021"
    defaults = {**MultiTeacherMethod.defaults, "order": ""}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        n = len(ctx.teachers)
        if self.params["order"]:
            self.order = [int(x) for x in str(self.params["order"]).split(":")]
            if sorted(self.order) != list(range(n)):
                raise UserError(f"uncertainty order must list the {n} caches smallest first, e.g. "
                                f"{':'.join(map(str, range(n)))}")
        else:
            self.order = sorted(range(n), key=lambda i: ctx.teachers[i].hidden_size * ctx.teachers[i].num_layers)

    def weights(self, u: torch.Tensor) -> torch.Tensor:
        """[B] uncertainty -> [B, n] weight per cache."""
        n = self.num_teachers
        if n == 1:
            return u[:, None]
        rank = torch.empty(n, device=u.device)
        rank[torch.tensor(self.order, device=u.device)] = torch.arange(n, device=u.device, dtype=rank.dtype) / (n - 1)
        w = u[:, None] + (1 - 2 * u[:, None]) * rank[None, :]
        return w / w.sum(-1, keepdim=True).clamp_min(1e-12)

    def loss(self, batch, out, step):
        with torch.no_grad():
            w = self.weights(normalized_entropy(out.logits, batch.predicts))
        return {"kd": sum((w[:, i] * self.kd(batch, out, i)).mean() for i in range(self.num_teachers))}
