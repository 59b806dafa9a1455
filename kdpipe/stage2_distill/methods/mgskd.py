"""MGSKD: Liu, Zhu, Zhang, Zou, Zhang, Zhu 2022, "Multi-Granularity Structural Knowledge Distillation
for Language Model Compression".

Structure, not features, is transferred, at three granularities, over the mapped layers 0..S
(embeddings, intermediate layers, output):
- tokens (the lower `lower_layers` layers): pair-wise relations X_h X_h^T / sqrt(d_h) per relation
  head, matched by MSE over valid pairs, and triple-wise angles cos∠(x_j - x_i, x_k - x_i) at the k1
  tokens that receive most of the teacher's relation mass, among each one's k2 strongest neighbours
  (chosen from the teacher), matched by smooth-L1;
- spans (same layers): the same pair and triple losses over mean-pooled contiguous spans; the paper
  takes phrases from a parser, kdpipe draws a seeded random segmentation each step (as GKD does);
- samples (the upper layers): angles among the mean-pooled vectors of the batch's samples, per
  relation head, matched by smooth-L1.
The relations never compare widths, so teacher and student widths may differ freely.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.errors import UserError
from kdpipe.stage2_distill.features import own_channel_scale, own_token_scale, pool
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.stage2_distill.methods.base import Method, Needs, register


def pair_relations(x: torch.Tensor, heads: int, per_dim: bool = False) -> torch.Tensor:
    """[B, n, H] -> [B, heads, n, n] dot products within each relation head, over sqrt(d_h) as in the paper
    or, `per_dim`, over d_h: mean products, whose scale does not depend on the width (widths may differ)."""
    b, n, d = x.shape
    x = x.float().view(b, n, heads, d // heads).transpose(1, 2)
    return x @ x.transpose(-1, -2) / ((d // heads) if per_dim else (d // heads) ** 0.5)


def triplet_angles(x: torch.Tensor, anchors: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """cos of the angle at x[anchor] between x[j] - x[anchor] and x[k] - x[anchor] for j, k among the
    anchor's neighbours. x: [B, n, H], anchors: [B, k1], neighbours: [B, k1, k2] -> [B, k1, k2, k2]."""
    rows = torch.arange(x.shape[0], device=x.device)
    around = F.normalize(x[rows[:, None, None], neighbours].float() - x[rows[:, None], anchors].float()[:, :, None], dim=-1)
    return around @ around.transpose(-1, -2)


def structure_loss(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, heads: int, k1: int, k2: int,
                   per_dim: bool = False) -> torch.Tensor:
    """MGSKD's token (or span) loss: pair-wise MSE plus triple-wise smooth-L1, over valid positions."""
    n = s.shape[1]
    valid = (mask[:, :, None] & mask[:, None, :])[:, None].expand(-1, heads, n, n)
    t_pair = pair_relations(t, heads, per_dim)
    pair = ((pair_relations(s, heads, per_dim) - t_pair) ** 2 * valid).sum() / valid.sum().clamp_min(1)
    k1, k2 = min(k1, n), min(k2, n - 1)
    if k2 < 2:
        return pair
    with torch.no_grad():  # which triples to compare is the teacher's choice
        probs = torch.nan_to_num(torch.softmax(t_pair.masked_fill(~valid, float("-inf")), -1)) * valid
        received = probs.sum((1, 2)).masked_fill(~mask, float("-inf"))  # [B, n]
        anchors = received.topk(k1, -1).indices
        local = probs.sum(1).masked_fill(~valid[:, 0], float("-inf"))
        local = local.masked_fill(torch.eye(n, dtype=torch.bool, device=s.device), float("-inf"))
        neighbours = local.gather(1, anchors[..., None].expand(-1, -1, n)).topk(k2, -1).indices  # [B, k1, k2]
    rows = torch.arange(s.shape[0], device=s.device)
    ok = mask[rows[:, None], anchors][:, :, None, None] & mask[rows[:, None, None], neighbours][:, :, :, None] \
        & mask[rows[:, None, None], neighbours][:, :, None, :]
    ok = ok & ~torch.eye(k2, dtype=torch.bool, device=s.device)
    diff = F.smooth_l1_loss(triplet_angles(s, anchors, neighbours), triplet_angles(t, anchors, neighbours),
                            reduction="none")
    return pair + (diff * ok).sum() / ok.sum().clamp_min(1)


def sample_angles(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Angles among the samples' pooled vectors per relation head: [B, H] -> [heads, B, B, B]."""
    b, d = x.shape
    x = x.float().view(b, heads, d // heads).transpose(0, 1)  # [heads, B, d_h]
    e = F.normalize(x[:, None, :, :] - x[:, :, None, :], dim=-1)  # e[h, i, j] = unit(x_j - x_i)
    return e @ e.transpose(-1, -2)


def span_means(x: torch.Tensor, mask: torch.Tensor, cuts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each contiguous span [cuts[i], cuts[i+1]) over valid tokens; a span is valid if any is."""
    reps, valid = [], []
    m = mask.float().unsqueeze(-1)
    for a, b in zip(cuts[:-1], cuts[1:]):
        count = m[:, a:b].sum(1)
        reps.append((x[:, a:b].float() * m[:, a:b]).sum(1) / count.clamp_min(1))
        valid.append(count.squeeze(-1) > 0)
    return torch.stack(reps, 1), torch.stack(valid, 1)


@register
class MGSKD(Method):
    name = "mgskd"
    paper = "Liu et al. 2022"
    adapted = ("random contiguous spans instead of parsed phrases; relations of RMS-normalized states as mean "
               "products (scale=token)")
    default_weight = 0.1
    defaults = {"layer_map": "uniform", "lower_layers": 2, "heads": 8, "k1": 20, "k2": 20, "span_rate": 0.3,
                "w_token": 1.0, "w_span": 1.0, "w_sample": 4.0, "seed": 0, "scale": "token"}
    # token: each state divided by its own RMS, as the model's norm does before every block; the paper's
    # BERT states come out of a LayerNorm, a pre-norm decoder's residual stream does not (SmolLM2's span
    # relations at channel scale started at 327 and sent the gradient norm to 950 on the methods bench)
    choices = {"scale": ("token", "channel", "raw")}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pairs = [(0, 0)] + map_layers(self.params["layer_map"], ctx.student_layers, ctx.teacher.num_layers)
        heads = int(self.params["heads"])
        if heads < 1 or ctx.student_hidden % heads or ctx.teacher.hidden_size % heads:
            raise UserError(f"mgskd heads={heads} must divide both widths ({ctx.student_hidden} and "
                            f"{ctx.teacher.hidden_size}): choose a common divisor")

    def needs(self) -> Needs:
        return Needs(hidden=[t for _, t in self.pairs])

    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    def spans(self, length: int, step: int) -> list[int]:
        """Seeded random segmentation of [0, length) into about span_rate * length spans."""
        count = max(2, min(length, int(length * float(self.params["span_rate"]))))
        rng = np.random.default_rng([int(self.params["seed"]), step])
        inner = np.sort(rng.choice(np.arange(1, length), size=count - 1, replace=False)).tolist()
        return [0, *inner, length]

    def loss(self, batch, out, step):
        p, mask = self.params, batch.layer_mask
        heads, k1, k2 = int(p["heads"]), int(p["k1"]), int(p["k2"])
        token = span = sample = out.logits.new_zeros(())
        cuts = self.spans(mask.shape[1], step)
        per_dim = p["scale"] == "token"
        for i, (s_layer, t_layer) in enumerate(self.pairs):
            s = out.hidden[s_layer].float()
            if per_dim:
                s, t = own_token_scale(s), own_token_scale(batch.hidden[t_layer].float())
            else:
                t = self.hidden(batch.hidden[t_layer], t_layer)
            if p["scale"] == "channel":  # relations of both at their channel scale: massive channels are not all
                s = own_channel_scale(s, mask)
            if i < int(p["lower_layers"]):
                token = token + structure_loss(s, t, mask, heads, k1, k2, per_dim)
                (s_span, span_ok), (t_span, _) = span_means(s, mask, cuts), span_means(t, mask, cuts)
                span = span + structure_loss(s_span, t_span, span_ok, heads, k1, k2, per_dim)
            else:
                s_ang = sample_angles(pool(s.float(), mask, "mean"), heads)
                t_ang = sample_angles(pool(t, mask, "mean"), heads)
                sample = sample + F.smooth_l1_loss(s_ang, t_ang)
        return {"token": p["w_token"] * token, "span": p["w_span"] * span, "sample": p["w_sample"] * sample}
