"""DGKD: Son, Na, Choi, Hwang 2021, "Densely Guided Knowledge Distillation using Multiple Teacher
Assistants".

The student learns from the teacher and every teacher assistant at once (one --cache each: the
teacher's, then the caches extracted from each trained assistant), and each step a random subset of
the guides is dropped (each kept with probability 1 - `drop_rate`, at least one kept), a
regularizer against leaning on one of them: L = (1 - alpha) LM + alpha mean_{i kept} T^2 KL_i.
The drawing is seeded by (seed, step): a run and its resume drop the same guides.
"""

from __future__ import annotations

import numpy as np

from kdpipe.stage2_distill.losses import lm_loss
from kdpipe.stage2_distill.methods.base import register
from kdpipe.stage2_distill.methods.multi import MultiTeacherMethod


@register
class DGKD(MultiTeacherMethod):
    name = "dgkd"
    paper = "Son et al. 2021"
    defaults = {**MultiTeacherMethod.defaults, "drop_rate": 0.5, "alpha": 1.0, "seed": 0}

    def kept(self, step: int) -> list[int]:
        rng = np.random.default_rng([int(self.params["seed"]), step])
        keep = np.flatnonzero(rng.random(self.num_teachers) >= float(self.params["drop_rate"])).tolist()
        return keep or [int(rng.integers(self.num_teachers))]

    def loss(self, batch, out, step):
        kept, alpha = self.kept(step), float(self.params["alpha"])
        soft = sum(self.kd(batch, out, i).mean() for i in kept) / len(kept)
        return {"soft": alpha * soft, "hard": (1 - alpha) * lm_loss(out.logits, batch.input_ids, batch.targets)}
