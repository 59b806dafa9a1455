"""RAIL-KD: Haidar, Anchuri, Rezagholizadeh, Ghaddar, Langlais, Poupart 2022, "RAIL-KD: RAndom
Intermediate Layer Mapping for Knowledge Distillation".

Every `redraw_every` steps (the paper: every epoch) a sorted random subset of S-1 teacher
intermediate layers is drawn and mapped in order to the student's intermediate layers; the loss is
the layer-wise MSE of L2-normalized pooled vectors (the student's through a learned linear map). The
draw is seeded and reproducible, and comes from the intermediate layers the cache holds (extract
with `--hidden-layers all` for the paper's setting). Combine with `kd` and `lm` for the full objective.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import UserError
from kdpipe.stage2_distill.features import pool
from kdpipe.stage2_distill.methods.base import Method, Needs, register


@register
class RAILKD(Method):
    name = "rail_kd"
    paper = "Haidar et al. 2022"
    adapted = "pooled hidden states instead of [CLS]; redrawn every N steps rather than per epoch"
    default_weight = 0.1
    defaults = {"redraw_every": 100, "seed": 0, "pooling": "mean", "scale": "channel"}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pool_layers = ctx.intermediate_hidden()
        self.count = ctx.student_layers - 1
        if self.count < 1 or len(self.pool_layers) < self.count:
            raise UserError(f"method rail_kd draws {max(self.count, 1)} teacher intermediate layers but the cache "
                            f"holds {len(self.pool_layers)}: re-extract with `kdpipe extract --hidden-layers all ...`")
        self.project = nn.ModuleList(nn.Linear(ctx.student_hidden, ctx.teacher.hidden_size, bias=False)
                                     for _ in range(self.count))

    def needs(self) -> Needs:
        return Needs(hidden=self.pool_layers)

    def student_layers(self) -> list[int]:
        return list(range(1, self.ctx.student_layers))

    def drawn(self, step: int) -> list[int]:
        """The teacher layers of the current draw (sorted), seeded by (seed, draw number)."""
        rng = np.random.default_rng([int(self.params["seed"]), step // int(self.params["redraw_every"])])
        return sorted(rng.choice(self.pool_layers, size=self.count, replace=False).tolist())

    def loss(self, batch, out, step):
        how, total = self.params["pooling"], 0.0
        for i, (s_layer, t_layer) in enumerate(zip(self.student_layers(), self.drawn(step))):
            s = self.hidden(self.project[i](pool(out.hidden[s_layer].float(), batch.layer_mask, how)), t_layer)
            t = pool(self.hidden(batch.hidden[t_layer], t_layer), batch.layer_mask, how)
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
            total = total + ((s - t) ** 2).sum(-1).mean()
        return {"rail": total}
