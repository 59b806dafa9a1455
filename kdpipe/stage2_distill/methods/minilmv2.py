"""MiniLMv2: Wang, Bao, Huang, Dong, Wei 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation
for Compressing Pretrained Transformers".

The student's last block learns the teacher's self-attention relations of one chosen block (the
paper takes an upper-middle layer of large teachers, the last of base-size ones): for X in {Q, K, V},
heads are concatenated and re-split into R relation heads, relations softmax(X_r X_r^T / sqrt(d_r)),
and the loss is the sum over Q-Q, K-K, V-V of KL(teacher || student), averaged over relation heads and
positions. Re-splitting lets teacher and student have different head counts and widths. From the
cache: the teacher's post-RoPE Q/K/V factors (`--attention-form factors`); causal models relate each
token to itself and earlier tokens only.
"""

from __future__ import annotations

from kdpipe.stage2_distill.features import relation_kl, relation_logits
from kdpipe.stage2_distill.methods.base import BlockPairMethod, register


@register
class MiniLMv2(BlockPairMethod):
    name = "minilmv2"
    paper = "Wang et al. 2021"
    default_weight = 0.1
    defaults = {**BlockPairMethod.defaults, "relation_heads": 0}  # 0: as many relation heads as the fewer heads

    def loss(self, batch, out, step):
        t_layer, s_layer = self.block_pair()
        t_heads, s_q = self.ctx.teacher.num_heads, out.factors[s_layer][0]
        r = int(self.params["relation_heads"]) or min(t_heads, s_q.shape[1])
        terms = {}
        for i, part in enumerate("qkv"):
            t = relation_logits(batch.factors[t_layer][i], r)
            s = relation_logits(out.factors[s_layer][i], r)
            terms[f"{part}{part}"] = relation_kl(t, s, batch.layer_mask)
        return terms
