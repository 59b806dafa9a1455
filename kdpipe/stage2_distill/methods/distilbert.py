"""DistilBERT: Sanh, Debut, Chaumond, Wolf 2019, "DistilBERT, a distilled version of BERT".

L = alpha_ce * T^2 * KL(p_T || q_T) + alpha_mlm * LM loss + alpha_cos * (1 - cos(h_s, h_t)) on the last
hidden states, over valid positions. The paper's masked-LM term is the causal LM loss for causal
students. DistilBERT initializes the student from every other teacher layer: `kdpipe distill
--student teacher:layers=N --init-from-teacher DIR` (weights are read once; the teacher never runs).
When the student is narrower than the teacher, a learned linear map takes its hidden state to the
teacher's width (the paper keeps the width, so needs none).
"""

from __future__ import annotations

import torch.nn.functional as F

from kdpipe.stage2_distill.losses import lm_loss
from kdpipe.stage2_distill.methods.base import Method, Needs, register, width_map
from kdpipe.stage2_distill.methods.kd import soft_loss, soft_needs


@register
class DistilBERT(Method):
    name = "distilbert"
    paper = "Sanh et al. 2019"
    defaults = {"temperature": 2.0, "alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0, "estimator": "bucket",
                "scale": "channel"}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.project = width_map(ctx.student_hidden, ctx.teacher.hidden_size, bias=False)

    def needs(self) -> Needs:
        needs = soft_needs(self.params["temperature"], self.params["estimator"])
        if self.params["alpha_cos"]:
            needs.hidden = [self.ctx.teacher.num_layers]
        return needs

    def student_layers(self) -> list[int]:
        return [self.ctx.student_layers] if self.params["alpha_cos"] else []

    def loss(self, batch, out, step):
        p, t = self.params, float(self.params["temperature"])
        terms = {}
        if p["alpha_ce"]:
            terms["ce"] = p["alpha_ce"] * t * t * soft_loss(batch, out, self.ctx, t, p["estimator"])
        if p["alpha_mlm"]:
            terms["mlm"] = p["alpha_mlm"] * lm_loss(out.logits, batch.input_ids, batch.targets)
        if p["alpha_cos"]:
            last = self.ctx.teacher.num_layers
            s_h = self.hidden(self.project(out.hidden[self.ctx.student_layers].float()), last)
            t_h = self.hidden(batch.hidden[last], last)
            cos = F.cosine_similarity(s_h, t_h, dim=-1)
            mask = batch.layer_mask.float()
            terms["cos"] = p["alpha_cos"] * ((1 - cos) * mask).sum() / mask.sum().clamp_min(1)
        return terms
