"""SID: Aguilar, Ling, Zhang, Yao, Fan, Guo 2020, "Knowledge Distillation from Internal Representations".

The student learns the teacher's internal representations layer by layer. For a mapped layer pair:
the cosine distance 1 - cos(h_s, h_t) of the pooled hidden states (the paper's [CLS]; here `pooling`
mean, last or first), plus KL(A_t || A_s) of the layer's attention distributions (`alpha_att`; 0
drops it and the cache then needs no attention). The run is split into S + 1 equal stages, as in
GKD's implementation: stage k trains the terms of student layers 1..k (stacked), and the last stage
trains the output with KD alone. The paper also freezes the layers already learned; kdpipe keeps
them trainable. A learned linear map takes the student's vectors to the teacher's width when they
differ. The teacher's attention is read from either cached form; with different head counts
the head-mean distributions are compared.
"""

from __future__ import annotations

import torch.nn.functional as F

from kdpipe.stage2_distill.features import causal_log_probs, pool
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.stage2_distill.methods.base import Method, Needs, register, width_map
from kdpipe.stage2_distill.methods.kd import soft_loss, soft_needs
from kdpipe.stage2_distill.methods.minilm import _attention_kl


@register
class SID(Method):
    name = "sid"
    paper = "Aguilar et al. 2020"
    adapted = "pooled hidden states instead of [CLS]; learned layers stay trainable; stages by step count"
    default_weight = 0.1
    defaults = {"layer_map": "uniform", "pooling": "mean", "alpha_att": 1.0, "temperature": 1.0,
                "estimator": "bucket", "scale": "channel"}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pairs = map_layers(self.params["layer_map"], ctx.student_layers, ctx.teacher.num_layers)
        self.project = width_map(ctx.student_hidden, ctx.teacher.hidden_size, bias=False)

    def needs(self) -> Needs:
        needs = soft_needs(self.params["temperature"], self.params["estimator"])
        needs.hidden = [t for _, t in self.pairs]
        needs.attention = [t for _, t in self.pairs] if self.params["alpha_att"] else []
        return needs

    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    def student_attention_layers(self) -> list[int]:
        return [s for s, _ in self.pairs] if self.params["alpha_att"] else []

    def stage(self, step: int) -> int:
        """1..len(pairs) while learning layers, len(pairs) + 1 for the output stage."""
        stages = len(self.pairs) + 1
        return min(stages, 1 + step * stages // max(1, self.ctx.total_steps))

    def loss(self, batch, out, step):
        p, stage = self.params, self.stage(step)
        zero = out.logits.new_zeros(())  # every term is logged at every step, so curves stay aligned
        if stage > len(self.pairs):
            t = float(p["temperature"])
            return {"cos": zero, "att": zero, "kd": t * t * soft_loss(batch, out, self.ctx, t, p["estimator"])}
        cos = att = zero
        for s, t in self.pairs[:stage]:
            s_vec = self.hidden(self.project(pool(out.hidden[s].float(), batch.layer_mask, p["pooling"])), t)
            t_vec = pool(self.hidden(batch.hidden[t], t), batch.layer_mask, p["pooling"])
            cos = cos + (1 - F.cosine_similarity(s_vec, t_vec, dim=-1)).mean()
            if p["alpha_att"]:
                sq, sk, _ = out.factors[s]
                s_logp = causal_log_probs(sq, sk, out.scaling, out.masks.get(s), out.softcaps.get(s))
                att = att + _attention_kl(batch.attention[t].log(), s_logp, batch.layer_mask)
        return {"cos": cos, "att": p["alpha_att"] * att, "kd": zero}
