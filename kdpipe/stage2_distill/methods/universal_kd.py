"""Universal-KD: Wu, Rezagholizadeh, Ghaddar, Haidar, Ghodsi 2021, "Universal-KD: Attention-based
Output-Grounded Intermediate Layer Knowledge Distillation".

Every intermediate layer of both models is grounded in a common output space, read as logits, and
each student layer j attends over all teacher layers, alpha_ji = softmax_i(g_s_j . g_t_i), and matches
the attended target by KL(softmax(sum_i alpha_ji g_t_i) || softmax(g_s_j)). The paper grounds the
teacher's layers through the teacher's own fixed classifier; the cache holds no teacher weights, so the
teacher side is an equally fixed map: a seeded random projection of each standardized (LayerNorm, no
affine) teacher vector to `size` dimensions, scaled to unit-variance logits. Nothing on the teacher side
trains, so the loss cannot be zeroed by mapping both sides to a constant (with both maps learned, as
GKD has it, the all-zero maps are a global optimum); standardizing keeps a decoder's massive activation
channels from turning every target into a one-hot. The student's maps (one linear map per layer) learn. Like ALP-KD
no layer mapping is chosen; unlike it the widths never need to agree. Vectors are pooled (`pooling`:
mean, last or first) where the paper reads [CLS]. The teacher layers are whatever intermediate layers
the cache holds, recorded in the run's method description. Combine with `kd` for the output layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import UserError
from kdpipe.stage2_distill.features import attend_layers, pool
from kdpipe.stage2_distill.methods.base import Method, Needs, register


@register
class UniversalKD(Method):
    name = "universal_kd"
    paper = "Wu et al. 2021"
    adapted = ("pooled hidden states instead of [CLS]; the teacher grounded by a fixed seeded projection of its "
               "standardized states (the cache has no teacher classifier), the student by learned maps")
    default_weight = 0.1
    defaults = {"pooling": "mean", "size": 0, "seed": 0}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.teacher_layers = ctx.intermediate_hidden()
        if not self.teacher_layers or ctx.student_layers < 2:
            raise UserError("method universal_kd needs intermediate teacher hidden states and a student of 2 or more "
                            "layers: re-extract with `kdpipe extract --hidden-layers all ...`")
        size = int(self.params["size"]) or ctx.student_hidden
        g = torch.Generator().manual_seed(int(self.params["seed"]))
        h = ctx.teacher.hidden_size
        # a buffer, not a parameter: saved with the method's state, never trained
        self.register_buffer("ground_teacher", torch.randn(len(self.teacher_layers), size, h, generator=g) / h ** 0.5)
        self.ground_student = nn.ModuleList(nn.Linear(ctx.student_hidden, size, bias=False)
                                            for _ in self.student_layers())

    def needs(self) -> Needs:
        return Needs(hidden=self.teacher_layers)

    def student_layers(self) -> list[int]:
        return list(range(1, self.ctx.student_layers))

    def ground(self, n: int, pooled: torch.Tensor) -> torch.Tensor:
        """Teacher layer n's pooled vector [B, H] in the output space [B, u]: standardized, projected."""
        return F.layer_norm(pooled, pooled.shape[-1:]) @ self.ground_teacher[n].T

    def loss(self, batch, out, step):
        how = self.params["pooling"]
        t = torch.stack([self.ground(n, pool(batch.hidden[i].float(), batch.layer_mask, how))
                         for n, i in enumerate(self.teacher_layers)], 1)  # [B, L', u]
        total = 0.0
        for g, j in zip(self.ground_student, self.student_layers()):
            s = g(pool(out.hidden[j].float(), batch.layer_mask, how))  # [B, u]
            t_logp, s_logp = F.log_softmax(attend_layers(t, s), -1), F.log_softmax(s, -1)
            total = total + (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        return {"universal": total}
