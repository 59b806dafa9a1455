"""TMKD: Yang, Shou, Gong, Lin, Jiang 2020, "Model Compression with Two-stage Multi-teacher Knowledge
Distillation for Web Question Answering System".

The student shares its body between several output heads, one per teacher, each trained on its
teacher's soft targets: sum_i T^2 KL(p_i || q_head_i), so every teacher shapes the shared
representation without averaging their distributions away. Here the heads are linear maps of the
student's final hidden state to the vocabulary (training-only parts of the method); the student's
own head learns the teachers' mean soft loss, so the exported student needs no extra head (TMKD
combines its heads at inference).
"""

from __future__ import annotations

from torch import nn

from kdpipe.stage2_distill.methods.base import register
from kdpipe.stage2_distill.methods.multi import MultiTeacherMethod


@register
class TMKD(MultiTeacherMethod):
    name = "tmkd"
    paper = "Yang et al. 2020"
    adapted = "the exported student keeps its own head, trained on the teachers' mean soft loss"
    defaults = {**MultiTeacherMethod.defaults, "alpha_heads": 1.0}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.heads = nn.ModuleList(nn.Linear(ctx.student_hidden, t.vocab_size, bias=False) for t in ctx.teachers)

    def student_layers(self) -> list[int]:
        return [self.ctx.student_layers]  # the final (normed) hidden state

    def loss(self, batch, out, step):
        h = out.hidden[self.ctx.student_layers]
        n = self.num_teachers
        own = sum(self.kd(batch, out, i).mean() for i in range(n)) / n
        heads = sum(self.kd(batch, out, i, logits=head(h)).mean() for i, head in enumerate(self.heads)) / n
        return {"own": own, "heads": self.params["alpha_heads"] * heads}
