"""MiniLM: Wang, Wei, Dong, Bao, Yang, Zhou 2020, "MiniLM: Deep Self-Attention Distillation for
Task-Agnostic Compression of Pre-Trained Transformers".

The student's last block mimics the teacher's last block: attention transfer KL(A_t || A_s) of the
per-head attention distributions, plus value-relation transfer KL(VR_t || VR_s) with
VR = softmax(V V^T / sqrt(d)) per head; both averaged over heads and (valid) query positions. From
the cache: the teacher's Q/K/V factors of that block; the distributions are recomputed exactly.
MiniLM keeps the head count; when it differs here, attention is compared as the head-mean
distribution and value relations through re-split relation heads (as MiniLMv2 does). With
alpha_vr=0 only distributions are needed, so a cache of stored attention probs serves too; value
relations need V, which only the factors form holds.
"""

from __future__ import annotations

import torch

from kdpipe.stage2_distill.features import causal_log_probs, relation_kl, relation_logits
from kdpipe.stage2_distill.methods.base import BlockPairMethod, Needs, register
from kdpipe.storage.attention import repeat_kv


def per_head_values(v, num_heads: int, heads: int):
    """The values each attention head reads (grouped-query heads repeated) when relations are per attention
    head; the stored K/V heads as they are when they are re-split into fewer relation heads."""
    return repeat_kv(v, num_heads) if heads == num_heads else v


def _attention_kl(t_logp: torch.Tensor, s_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(A_t || A_s) over keys, averaged over heads and valid query rows; keys the teacher gives
    probability 0 (masked) contribute 0."""
    if t_logp.shape[1] != s_logp.shape[1]:  # different head counts: compare head-mean distributions
        t_logp = t_logp.exp().mean(1, keepdim=True).log()
        s_logp = s_logp.exp().mean(1, keepdim=True).clamp_min(1e-30).log()  # finite: log's gradient at 0 is NaN
    p = t_logp.exp()
    kl = torch.where(p > 0, p * (t_logp - s_logp), torch.zeros_like(p)).sum(-1)  # [B, h, T]
    rows = mask[:, None, :].expand_as(kl).float()
    return (kl * rows).sum() / rows.sum().clamp_min(1)


@register
class MiniLM(BlockPairMethod):
    name = "minilm"
    paper = "Wang et al. 2020"
    adapted = "head-mean attention and re-split value relations when head counts differ"
    default_weight = 0.1
    defaults = {**BlockPairMethod.defaults, "alpha_at": 1.0, "alpha_vr": 1.0}

    def needs(self) -> Needs:
        return super().needs() if self.params["alpha_vr"] else Needs(attention=[self.block_pair()[0]])

    def loss(self, batch, out, step):
        t_layer, s_layer = self.block_pair()
        sq, sk, sv = out.factors[s_layer]
        s_logp = causal_log_probs(sq, sk, out.scaling, out.masks.get(s_layer), out.softcaps.get(s_layer))
        if not self.params["alpha_vr"]:  # distributions only: either cached form
            return {"at": self.params["alpha_at"] * _attention_kl(batch.attention[t_layer].log(), s_logp,
                                                                  batch.layer_mask),
                    "vr": s_logp.new_zeros(())}
        tq, tk, tv = batch.factors[t_layer]
        t_mask = self.ctx.teacher_mask(t_layer, tq.shape[2], tq.device, batch.signal_positions)
        at = _attention_kl(causal_log_probs(tq, tk, self.ctx.teacher_attention_scaling, t_mask,
                                            self.ctx.teacher_attention_softcap), s_logp, batch.layer_mask)
        heads = sq.shape[1] if sq.shape[1] == tq.shape[1] else min(sq.shape[1], tq.shape[1])
        vr = relation_kl(relation_logits(per_head_values(tv, tq.shape[1], heads), heads),
                         relation_logits(per_head_values(sv, sq.shape[1], heads), heads), batch.layer_mask)
        return {"at": self.params["alpha_at"] * at, "vr": self.params["alpha_vr"] * vr}
