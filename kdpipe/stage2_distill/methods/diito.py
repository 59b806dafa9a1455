"""DIITO: Wu, Geiger, Rozner, Kreiss, Lu, Icard, Potts, Goodman 2022, "Causal Distillation for
Language Models" (distillation interchange intervention training objective).

The student is trained to behave like the teacher under the same causal interventions: the
representation of a span of a base sequence at an aligned layer is replaced by that of a span of a
source sequence, and the student's counterfactual output must match the teacher's counterfactual
output, KL(p_teacher^cf || q_student^cf) at T=1 (exact (k+1)-bucket KL from the cached top-k) over
the positions the intervention can reach (from the span's start on, by causality).

Cache-only adaptation: the teacher cannot run in stage 2, so the interventions are drawn at
extraction (`kdpipe extract --interchange LAYERS`): one per sequence, a source from the same work
unit, a teacher layer and spans, seeded; the teacher's counterfactual top-k is cached and the student
replays exactly those interventions, at the student layer aligned with the teacher's by the uniform
map (round(l * S / L), within 1..S-1). The paper draws new interventions every step. Base and source
run as one student forward of 2B rows, so the source states keep their gradient, as in the paper.
Combine with `kd` and `lm` for the paper's full objective.
"""

from __future__ import annotations

import torch

from kdpipe.errors import UserError
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.stage2_distill.losses import bucket_kl
from kdpipe.stage2_distill.methods.base import Method, Needs, register


@register
class DIITO(Method):
    name = "diito"
    paper = "Wu et al. 2022"
    adapted = "interventions drawn once at extraction (--interchange), one per sequence, not anew each step"

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        if ctx.student_layers < 2:
            raise UserError("method diito intervenes between student layers: the student needs 2 or more layers")

    def needs(self) -> Needs:
        s, t = self.ctx.student_layers, self.ctx.teacher.num_layers
        return Needs(interchange=[tl for sl, tl in map_layers("uniform", s, t) if sl < s and 0 < tl < t] or [1])

    def student_layer(self, teacher_layer: int) -> int:
        s, t = self.ctx.student_layers, self.ctx.teacher.num_layers
        return min(s - 1, max(1, round(teacher_layer * s / t)))

    def edits(self, layers: torch.Tensor, span: torch.Tensor, batch_size: int) -> dict:
        """Copy source row B + r's span states over base row r's span, at row r's student layer."""
        edits = {}
        for layer in sorted({self.student_layer(int(x)) for x in layers}):
            rows = [r for r in range(batch_size) if self.student_layer(int(layers[r])) == layer]

            def edit(h: torch.Tensor, rows=rows) -> torch.Tensor:
                h = h.clone()
                for r in rows:
                    base, source, count = (int(x) for x in span[r])
                    h[r, base:base + count] = h[batch_size + r, source:source + count]
                return h
            edits[layer] = edit
        return edits

    def loss(self, batch, out, step):
        ic, b = batch.interchange, batch.input_ids.shape[0]
        t = batch.input_ids.shape[1]
        positions = torch.arange(t, device=batch.input_ids.device)[None, :]
        source_mask = positions < ic["source_length"][:, None]
        logits, _ = out.run(torch.cat([batch.input_ids, ic["source_ids"].long()]), torch.cat([batch.mask, source_mask]),
                            self.edits(ic["layer"], ic["span"], b))
        reached = batch.predicts & (positions >= ic["span"][:, :1])
        return {"causal": bucket_kl(logits[:b], ic["topk_ids"], ic["topk_logprobs"], 1.0, reached)}
