"""MT-BERT: Wu, Wu, Huang 2021, "One Teacher is Enough? Pre-trained Language Model Distillation from
Multiple Teachers".

Each teacher's soft loss is weighted per example by how well that teacher fits the labels,
1 / (1 + CE_i), and each teacher's hidden states are fitted through its own linear map of the
student's (widths may differ per teacher); the hard-label loss is added:
    L = sum_i mean_b[ T^2 KL_i(b) / (1 + CE_i(b)) ] + alpha_hidden * sum_i MSE(W_i H_s, H_t_i) + alpha_hard * LM.
From the cache, CE_i is the teacher's next-token NLL on the data: exact where the true token is in
its stored top-k, -log(tail mass) elsewhere. `layer_map` is shared by the teachers (uniform, skip,
last, explicit) or `final`: the last states only, for teachers of different depths.
"""

from __future__ import annotations

from torch import nn

from kdpipe.stage2_distill.features import hidden_mse
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.stage2_distill.losses import lm_loss, teacher_label_nll
from kdpipe.stage2_distill.methods.base import register
from kdpipe.stage2_distill.methods.multi import MultiTeacherMethod


@register
class MTBERT(MultiTeacherMethod):
    name = "mt_bert"
    paper = "Wu et al. 2021"
    adapted = "teacher CE from the cached top-k (the tail bucket bounds tokens outside it)"
    topk_only = True
    defaults = {**MultiTeacherMethod.defaults, "alpha_hidden": 1.0, "alpha_hard": 1.0, "layer_map": "uniform",
                "scale": "channel"}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pairs = [self._pairs(t.num_layers) if self.params["alpha_hidden"] else [] for t in ctx.teachers]
        self.fit = nn.ModuleList(nn.Linear(ctx.student_hidden, t.hidden_size) for t in ctx.teachers)

    def _pairs(self, teacher_layers: int) -> list[tuple[int, int]]:
        """`final` fits only the last states (teachers of any depth); otherwise a shared layer map."""
        if self.params["layer_map"] == "final":
            return [(self.ctx.student_layers, teacher_layers)]
        return map_layers(self.params["layer_map"], self.ctx.student_layers, teacher_layers)

    def teacher_needs(self, i):
        needs = super().teacher_needs(i)
        needs.topk = True  # each example's weight is the teacher's NLL on the data, from its top-k
        needs.hidden = [t for _, t in self.pairs[i]]
        return needs

    def student_layers(self) -> list[int]:
        return sorted({s for pairs in self.pairs for s, _ in pairs})

    def loss(self, batch, out, step):
        p, soft, hidden = self.params, 0.0, 0.0
        for i in range(self.num_teachers):
            b = batch.teacher(i)
            tail = None if b.logtail is None else b.logtail[..., 0]
            weight = 1 / (1 + teacher_label_nll(b.topk_ids, b.topk_logprobs, b.input_ids, b.targets, tail))
            soft = soft + (weight * self.kd(batch, out, i)).mean()
            for s, t in self.pairs[i]:
                hidden = hidden + hidden_mse(self.hidden(self.fit[i](out.hidden[s].float()), t, i),
                                             self.hidden(b.hidden[t], t, i), batch.layer_mask)
        return {"soft": soft, "hidden": p["alpha_hidden"] * hidden,
                "hard": p["alpha_hard"] * lm_loss(out.logits, batch.input_ids, batch.targets)}
