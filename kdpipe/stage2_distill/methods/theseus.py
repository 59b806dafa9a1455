"""Theseus: Xu, Zhou, Ge, Wei, Zhou 2020, "BERT-of-Theseus: Compressing BERT by Progressive Module
Replacing".

The teacher's layers are grouped into S modules, one per student layer; each step every module is
replaced by its student layer with probability r (rising linearly from `replace_rate` to 1 by the
fraction `full_at` of the run), and the hybrid is trained on the task loss.

Cache-only adaptation (teacher-forced module replacement): no teacher runs in stage 2, so a kept
teacher module cannot process the hybrid's own input. Instead, when module j is kept, the state that
leaves it is the cached teacher state at its boundary (teacher layer m(j) of the uniform map, through
a learned linear map when widths differ), and the student layers above read it. The original feeds
student outputs into later teacher modules; here a kept module always emits what the teacher emitted
on its own inputs, so only the highest kept module matters: the student layers below it get no
gradient that step, as in the paper, and those above it learn on the teacher's state. The last module is always the student's (its output feeds the student's head).
The hybrid is an extra student forward per step. `objective` is the hybrid's loss: `lm` (the paper's
task loss, here next-token prediction) or `kd` (soft targets from the cache).
"""

from __future__ import annotations

import numpy as np

from kdpipe.errors import UserError
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.stage2_distill.losses import lm_loss
from kdpipe.stage2_distill.methods.base import Method, Needs, StudentOutput, register, width_map
from kdpipe.stage2_distill.methods.kd import soft_loss, soft_needs


@register
class Theseus(Method):
    name = "theseus"
    every_position = True
    paper = "Xu et al. 2020"
    adapted = "teacher-forced module replacement: a kept teacher module emits its cached boundary state"
    defaults = {"replace_rate": 0.5, "full_at": 1.0, "objective": "lm", "temperature": 1.0, "estimator": "bucket",
                "seed": 0}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        if self.params["objective"] not in ("lm", "kd"):
            raise UserError(f"theseus objective {self.params['objective']!r} is not one of lm, kd")
        self.boundaries = [(s, t) for s, t in map_layers("uniform", ctx.student_layers, ctx.teacher.num_layers)
                           if s < ctx.student_layers]
        self.project = width_map(ctx.teacher.hidden_size, ctx.student_hidden, bias=False)

    def needs(self) -> Needs:
        needs = soft_needs(self.params["temperature"], self.params["estimator"]) \
            if self.params["objective"] == "kd" else Needs()
        needs.hidden = [t for _, t in self.boundaries]
        return needs

    def rate(self, step: int) -> float:
        r0, full = float(self.params["replace_rate"]), float(self.params["full_at"])
        return min(1.0, r0 + step / max(1.0, self.ctx.total_steps * full) * (1 - r0))

    def kept(self, step: int) -> list[tuple[int, int]]:
        """The (student layer, teacher layer) boundaries whose teacher module is kept this step (seeded)."""
        draws = np.random.default_rng([int(self.params["seed"]), step]).random(len(self.boundaries))
        return [pair for pair, u in zip(self.boundaries, draws) if u >= self.rate(step)]

    def loss(self, batch, out, step):
        kept = self.kept(step)
        logits = out.logits
        if kept:  # otherwise every module is the student's: the plain forward is the hybrid
            # the last kept boundary overrides the earlier ones: only it reaches the output
            s, t = kept[-1]
            teacher_state = self.project(batch.hidden[t])
            logits, _ = out.run(batch.input_ids, batch.mask, {s: lambda h: teacher_state.to(h.dtype)})
        if self.params["objective"] == "lm":
            return {"theseus": lm_loss(logits, batch.input_ids, batch.targets)}
        temp = float(self.params["temperature"])
        return {"theseus": temp * temp * soft_loss(batch, StudentOutput(logits=logits), self.ctx, temp,
                                                    self.params["estimator"])}
