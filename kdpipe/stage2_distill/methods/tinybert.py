"""TinyBERT: Jiao, Yin, Shang, Jiang, Chen, Li, Wang, Liu 2020, "TinyBERT: Distilling BERT for Natural
Language Understanding".

Transformer-layer distillation plus prediction-layer distillation:
  alpha_emb * MSE(E_s W_e, E_t) + sum over mapped layers [alpha_att * MSE(A_s, A_t) + alpha_hid * MSE(H_s W_h, H_t)]
  + alpha_pred * T^2 KL(p_T || q_T)
with A the pre-softmax attention scores (masked entries set to 0, as TinyBERT's code does), W learned
projections when the widths differ, student layer i mapped to teacher layer m(i) (`layer_map`, uniform
by default) and embeddings to embeddings. From the cache: hidden states of layer 0 and the mapped
layers, Q/K/V factors of the mapped blocks (scores are exact from them). The paper runs the two parts as
two stages; here both are weighted terms of one loss (set alpha_pred=0, then alpha_att=alpha_hid=
alpha_emb=0 in a second run for the staged recipe). When head counts differ, the head-mean scores are
compared (an adaptation; the paper keeps the head count).
"""

from __future__ import annotations

import torch.nn.functional as F

from kdpipe.stage2_distill.features import causal_scores, hidden_mse
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.stage2_distill.methods.base import Method, Needs, register, width_map
from kdpipe.stage2_distill.methods.kd import soft_loss, soft_needs


@register
class TinyBERT(Method):
    name = "tinybert"
    paper = "Jiao et al. 2020"
    adapted = "one run with weighted terms (two runs give the staged recipe); head-mean scores when head counts differ"
    default_weight = 0.1
    defaults = {"alpha_emb": 1.0, "alpha_hid": 1.0, "alpha_att": 1.0, "alpha_pred": 1.0, "temperature": 1.0,
                "layer_map": "uniform", "estimator": "bucket", "scale": "channel"}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pairs = map_layers(self.params["layer_map"], ctx.student_layers, ctx.teacher.num_layers)
        self.project = width_map(ctx.student_hidden, ctx.teacher.hidden_size)
        self.project_emb = width_map(ctx.student_hidden, ctx.teacher.hidden_size)

    def needs(self) -> Needs:
        p = self.params
        needs = soft_needs(p["temperature"], p["estimator"]) if p["alpha_pred"] else Needs()
        needs.hidden = ([0] if p["alpha_emb"] else []) + ([t for _, t in self.pairs] if p["alpha_hid"] else [])
        needs.factors = [t for _, t in self.pairs] if p["alpha_att"] else []
        return needs

    def student_layers(self) -> list[int]:
        p = self.params
        return ([0] if p["alpha_emb"] else []) + ([s for s, _ in self.pairs] if p["alpha_hid"] else [])

    def student_attention_layers(self) -> list[int]:
        return [s for s, _ in self.pairs] if self.params["alpha_att"] else []

    def loss(self, batch, out, step):
        p, terms, mask = self.params, {}, batch.layer_mask
        if p["alpha_emb"]:
            terms["emb"] = p["alpha_emb"] * hidden_mse(self.hidden(self.project_emb(out.hidden[0].float()), 0),
                                                       self.hidden(batch.hidden[0], 0), mask)
        if p["alpha_hid"]:
            terms["hid"] = p["alpha_hid"] * sum(hidden_mse(self.hidden(self.project(out.hidden[s].float()), t),
                                                           self.hidden(batch.hidden[t], t), mask)
                                                for s, t in self.pairs)
        if p["alpha_att"]:
            t_scale = self.ctx.teacher_attention_scaling
            att = 0.0
            for s, t in self.pairs:
                sq, sk, _ = out.factors[s]
                tq, tk, _ = batch.factors[t]
                s_scores = causal_scores(sq, sk, out.scaling, tq.shape[1], out.masks.get(s), out.softcaps.get(s))
                t_mask = self.ctx.teacher_mask(t, tq.shape[2], tq.device, batch.signal_positions)
                t_scores = causal_scores(tq, tk, t_scale, sq.shape[1], t_mask,
                                         self.ctx.teacher_attention_softcap)
                att = att + F.mse_loss(s_scores, t_scores)
            terms["att"] = p["alpha_att"] * att
        if p["alpha_pred"]:
            temp = float(p["temperature"])
            terms["pred"] = p["alpha_pred"] * temp * temp * soft_loss(batch, out, self.ctx, temp, p["estimator"])
        return terms
