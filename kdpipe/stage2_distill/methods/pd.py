"""PD: Turc, Chang, Lee, Toutanova 2019, "Well-Read Students Learn Better: On the Importance of
Pre-training Compact Models". Pre-trained distillation: a student pre-trained on its own (language
modelling) is then distilled with the soft-target loss. kdpipe takes the pre-trained student as
`--student DIR` and refuses a student built from scratch."""

from __future__ import annotations

from kdpipe.errors import UserError
from kdpipe.stage2_distill.methods.base import Context, register
from kdpipe.stage2_distill.methods.kd import KD


@register
class PD(KD):
    name = "pd"
    paper = "Turc et al. 2019"

    def __init__(self, params, ctx: Context):
        super().__init__(params, ctx)
        if not ctx.student_pretrained:
            raise UserError("method pd distills a pre-trained student: pass --student a pretrained model directory")

    def loss(self, batch, out, step):
        return {"pd": super().loss(batch, out, step)["kd"]}
