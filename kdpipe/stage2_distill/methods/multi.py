"""What the multi-teacher methods share: every --cache is a teacher over the same token ids, and each
method reads soft targets (and, for some, hidden states) from each of them."""

from __future__ import annotations

import torch

from kdpipe.stage2_distill.methods.base import Batch, Method, Needs, StudentOutput
from kdpipe.stage2_distill.methods.kd import soft_loss, soft_needs


class MultiTeacherMethod(Method):
    defaults = {"temperature": 1.0, "estimator": "bucket"}

    @property
    def num_teachers(self) -> int:
        return len(self.ctx.teachers)

    def needs(self) -> Needs:
        return self.teacher_needs(0)

    def teacher_needs(self, i: int) -> Needs:
        return soft_needs(self.params["temperature"], self.params["estimator"])

    def kd(self, batch: Batch, out: StudentOutput, i: int, logits: torch.Tensor | None = None) -> torch.Tensor:
        """T^2 KL(p_i || q) per sequence [B] against teacher i."""
        t = float(self.params["temperature"])
        return t * t * soft_loss(batch, out, self.ctx, t, self.params["estimator"], teacher=i, per_sequence=True,
                                 logits=logits)
