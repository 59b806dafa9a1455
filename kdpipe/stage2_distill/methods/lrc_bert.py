"""LRC-BERT: Fu, Zhou, Yang, Tang, Liu, Liu, Li 2021, "LRC-BERT: Latent-representation Contrastive
Knowledge Distillation for Natural Language Understanding".

COS-NCE over the intermediate outputs of the mapped layers: with g(i, j) = 1 - the mean cosine
similarity between student sample i's and teacher sample j's states (over mapped layers and tokens
valid in both), each sample pulls its own teacher states in and pushes the other samples' away:
    L_i = g(i, i) + 1/(B-1) * sum_{j != i} (2 - g(i, j)) / 2,
with the batch's other samples as negatives. The student's states go through a learned linear map to
the teacher's width. The paper's second-stage gradient perturbation of the embeddings is left out
(it needs a second forward per step; combine with `kd` for the output distribution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.errors import UserError
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.stage2_distill.methods.base import Method, Needs, register, width_map


def cos_distance_matrix(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """g[i, j] = 1 - mean cos(s[i, l, p], t[j, l, p]) over layers l and positions p valid in i and j.
    s, t: [B, L, T, H]; mask: [B, T] -> [B, B]."""
    cos = torch.einsum("ilph,jlph->ijlp", F.normalize(s, dim=-1), F.normalize(t, dim=-1))
    both = (mask[:, None, :] & mask[None, :, :]).float()[:, :, None, :].expand_as(cos)
    return 1 - (cos * both).sum((-1, -2)) / both.sum((-1, -2)).clamp_min(1)


def cos_nce(g: torch.Tensor) -> torch.Tensor:
    b = g.shape[0]
    positive = g.diagonal()
    negative = (2 - g).masked_fill(torch.eye(b, dtype=torch.bool, device=g.device), 0).sum(-1) / (b - 1) / 2
    return (positive + negative).mean()


@register
class LRCBERT(Method):
    name = "lrc_bert"
    batch_rows = 2
    paper = "Fu et al. 2021"
    adapted = "no gradient-perturbation stage"
    default_weight = 0.1
    defaults = {"layer_map": "uniform", "scale": "channel"}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pairs = map_layers(self.params["layer_map"], ctx.student_layers, ctx.teacher.num_layers)
        self.project = width_map(ctx.student_hidden, ctx.teacher.hidden_size, bias=False)

    def needs(self) -> Needs:
        return Needs(hidden=[t for _, t in self.pairs])

    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    def loss(self, batch, out, step):
        if batch.input_ids.shape[0] < 2:
            raise UserError("method lrc_bert contrasts samples within a batch: use --batch-size 2 or more")
        s = torch.stack([self.hidden(self.project(out.hidden[s].float()), t) for s, t in self.pairs], 1)
        t = torch.stack([self.hidden(batch.hidden[t], t) for _, t in self.pairs], 1)
        return {"cos_nce": cos_nce(cos_distance_matrix(s, t, batch.layer_mask))}
