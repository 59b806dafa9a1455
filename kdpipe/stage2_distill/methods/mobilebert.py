"""MobileBERT: Sun, Yu, Song, Liu, Yang, Zhou 2020, "MobileBERT: a Compact Task-Agnostic BERT for
Resource-Limited Devices".

Per mapped layer l: feature-map transfer MSE(H_s W, H_t) and attention transfer KL(A_t || A_s) of the
per-head attention distributions. `progressive` (the paper's schedule) trains layer 1's terms first,
then layer 2's, ... in equal stages of the run; otherwise all layers jointly. The paper also freezes
the layers below the stage; kdpipe keeps them trainable (document-level difference). The teacher's
attention comes from the cache in either form: stored probabilities, or recomputed from Q/K/V
factors. When head counts differ, head-mean distributions are compared (an adaptation).
"""

from __future__ import annotations


from kdpipe.stage2_distill.features import causal_log_probs, hidden_mse
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.stage2_distill.methods.base import Method, Needs, register, width_map
from kdpipe.stage2_distill.methods.minilm import _attention_kl


@register
class MobileBERT(Method):
    name = "mobilebert"
    paper = "Sun et al. 2020"
    adapted = "lower layers stay trainable in progressive mode; head-mean attention when head counts differ"
    default_weight = 0.1
    defaults = {"layer_map": "uniform", "alpha_fmt": 1.0, "alpha_at": 1.0, "progressive": False, "scale": "channel"}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pairs = map_layers(self.params["layer_map"], ctx.student_layers, ctx.teacher.num_layers)
        self.project = width_map(ctx.student_hidden, ctx.teacher.hidden_size)

    def needs(self) -> Needs:
        return Needs(hidden=[t for _, t in self.pairs], attention=[t for _, t in self.pairs])

    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    def student_attention_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    def active_pairs(self, step: int) -> list[tuple[int, int]]:
        if not self.params["progressive"]:
            return self.pairs
        stage = min(len(self.pairs) - 1, step * len(self.pairs) // max(1, self.ctx.total_steps))
        return [self.pairs[stage]]

    def loss(self, batch, out, step):
        fmt = at = 0.0
        for s, t in self.active_pairs(step):
            fmt = fmt + hidden_mse(self.hidden(self.project(out.hidden[s].float()), t), self.hidden(batch.hidden[t], t),
                                   batch.layer_mask)
            sq, sk, _ = out.factors[s]
            t_logp = batch.attention[t].log()  # log 0 = -inf at masked keys: they contribute 0
            s_logp = causal_log_probs(sq, sk, out.scaling, out.masks.get(s), out.softcaps.get(s))
            at = at + _attention_kl(t_logp, s_logp, batch.layer_mask)
        return {"fmt": self.params["alpha_fmt"] * fmt, "at": self.params["alpha_at"] * at}
