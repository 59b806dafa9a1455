"""ALP-KD: Passban, Wu, Rezagholizadeh, Liu 2021, "ALP-KD: Attention-Based Layer Projection for
Knowledge Distillation".

Every student layer j attends over all teacher layers: alpha_ji = softmax_i(h_s_j . h_t_i), target
c_j = sum_i alpha_ji h_t_i, loss MSE(h_s_j, c_j), so no layer is skipped and no fixed mapping is
chosen. The paper uses the [CLS] vectors; a causal LM has none, so vectors are pooled (`pooling`: mean,
last or first). The teacher layers are whatever layers above the embeddings the cache holds (1..L, the
final layer's output included, as in the paper), printed in the run's method description; every student
layer 1..S attends. Teacher vectors are compared at their channel scale (see Method.hidden). With differing widths a learned linear map takes the student's
vector to the teacher's width. Combine with `kd` and `lm` for the paper's full objective.
"""

from __future__ import annotations

import torch

from kdpipe.errors import UserError
from kdpipe.stage2_distill.features import attend_layers, pool
from kdpipe.stage2_distill.methods.base import Method, Needs, register, width_map


@register
class ALPKD(Method):
    name = "alp_kd"
    paper = "Passban et al. 2021"
    adapted = "pooled hidden states instead of [CLS]"
    default_weight = 0.1
    defaults = {"pooling": "mean", "scale": "channel"}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.teacher_layers = [x for x in ctx.cached_hidden if 0 < x <= ctx.teacher.num_layers]
        if not self.teacher_layers:
            raise UserError("method alp_kd needs teacher hidden states above the embeddings: re-extract with "
                            "`kdpipe extract --hidden-layers all ...`")
        self.project = width_map(ctx.student_hidden, ctx.teacher.hidden_size)

    def needs(self) -> Needs:
        return Needs(hidden=self.teacher_layers)

    def student_layers(self) -> list[int]:
        return list(range(1, self.ctx.student_layers + 1))

    def loss(self, batch, out, step):
        how = self.params["pooling"]
        # each teacher layer at its own channel scale; the student's map learns to land in that space
        t = torch.stack([pool(self.hidden(batch.hidden[i], i), batch.layer_mask, how) for i in self.teacher_layers], 1)
        total = 0.0
        for j in self.student_layers():
            s = self.project(pool(out.hidden[j].float(), batch.layer_mask, how))  # [B, H]
            total = total + ((s - attend_layers(t, s)) ** 2).mean()
        return {"alp": total}
