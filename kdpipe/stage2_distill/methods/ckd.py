"""CKD: Park, Kim, Yang 2021, "Distilling Linguistic Context for Language Model Compression".

Relations, not features, are transferred, so teacher and student widths may differ freely. Over the
hidden states of the mapped layers:
- word relations (WR), within a layer: pairwise token distances, normalized by their mean, and the
  angles cos∠(r_j - r_i, r_k - r_i) among tokens j, k in a window around each token i;
- layer-transforming relations (LTR), for each token across the mapped layers: pairwise distances
  (normalized by their mean) and angles among triples of layers.
Each potential is matched with the smooth-L1 (Huber) loss, summed and divided by the number of valid
terms, as the authors' code does. Padded tokens take no part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.stage2_distill.features import own_channel_scale
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.stage2_distill.methods.base import Method, Needs, register


def normalized_distances(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pairwise L2 distances [.., n, n] of x [.., n, d] over valid pairs, divided by their mean."""
    d = torch.cdist(x.float(), x.float()) * valid
    mean = d.sum((-1, -2), keepdim=True) / (d > 0).sum((-1, -2), keepdim=True).clamp_min(1)
    return d / mean.clamp_min(1e-12)


def angles(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """cos of the angle at x_i between x_j - x_i and x_k - x_i for the neighbours idx[i] = (j...)
    x: [N, n, d], idx: [n, w] -> [N, n, w, w]."""
    around = x[:, idx] - x.unsqueeze(2)  # [N, n, w, d]
    e = F.normalize(around.float(), dim=-1)
    return e @ e.transpose(-1, -2)


def window(n: int, w: int, device) -> torch.Tensor:
    half = (w - 1) // 2
    return (torch.arange(n, device=device)[:, None] + torch.arange(-half, half + 1, device=device)).clamp(0, n - 1)


@register
class CKD(Method):
    name = "ckd"
    paper = "Park et al. 2021"
    default_weight = 0.1
    defaults = {"layer_map": "uniform", "window": 5, "alpha_wr_dist": 1.0, "alpha_wr_angle": 1.0,
                "alpha_ltr_dist": 1.0, "alpha_ltr_angle": 1.0, "scale": "channel"}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pairs = map_layers(self.params["layer_map"], ctx.student_layers, ctx.teacher.num_layers)

    def needs(self) -> Needs:
        return Needs(hidden=[t for _, t in self.pairs])

    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    def loss(self, batch, out, step):
        p, m = self.params, batch.layer_mask.float()  # [B, T]
        # each model's relations at its own channel scale (massive channels would otherwise be every distance)
        t_stack = torch.stack([self.hidden(batch.hidden[t], t) for _, t in self.pairs], 1)  # [B, L, T, H]
        own = own_channel_scale if p["scale"] == "channel" else (lambda x, mask: x)
        s_stack = torch.stack([own(out.hidden[s].float(), batch.layer_mask) for s, _ in self.pairs], 1)
        b, n_layers, t, _ = t_stack.shape
        terms = {}

        def huber(s_val, t_val, mask):
            return (F.smooth_l1_loss(s_val, t_val, reduction="none") * mask).sum() / mask.sum().clamp_min(1)

        pair_mask = (m[:, None, :, None] * m[:, None, None, :]).expand(b, n_layers, t, t)
        if p["alpha_wr_dist"]:
            with torch.no_grad():
                t_d = normalized_distances(t_stack, pair_mask)
            terms["wr_dist"] = p["alpha_wr_dist"] * huber(normalized_distances(s_stack, pair_mask), t_d, pair_mask)
        if p["alpha_wr_angle"]:
            idx = window(t, int(p["window"]), t_stack.device)
            w = idx.shape[1]
            mask = (m[:, :, None, None] * m[:, idx][:, :, :, None] * m[:, idx][:, :, None, :])  # [B, T, w, w]
            mask = mask[:, None].expand(b, n_layers, t, w, w).reshape(b * n_layers, t, w, w)
            t_a = angles(t_stack.reshape(b * n_layers, t, -1), idx)
            s_a = angles(s_stack.reshape(b * n_layers, t, -1), idx)
            terms["wr_angle"] = p["alpha_wr_angle"] * huber(s_a, t_a.detach(), mask)
        t_tok = t_stack.transpose(1, 2).reshape(b * t, n_layers, -1)  # each token across layers
        s_tok = s_stack.transpose(1, 2).reshape(b * t, n_layers, -1)
        tok = m.reshape(b * t)
        if p["alpha_ltr_dist"] and n_layers > 1:
            mask = tok[:, None, None].expand(b * t, n_layers, n_layers)
            with torch.no_grad():
                t_d = normalized_distances(t_tok, mask)
            terms["ltr_dist"] = p["alpha_ltr_dist"] * huber(normalized_distances(s_tok, mask), t_d, mask)
        if p["alpha_ltr_angle"] and n_layers > 2:
            idx = torch.arange(n_layers, device=t_tok.device)[None, :].expand(n_layers, n_layers)
            mask = tok[:, None, None, None].expand(b * t, n_layers, n_layers, n_layers)
            terms["ltr_angle"] = p["alpha_ltr_angle"] * huber(angles(s_tok, idx), angles(t_tok, idx).detach(), mask)
        return terms
