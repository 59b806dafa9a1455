"""The plain hard-label language-modelling loss: next-token cross-entropy on the cached token ids."""

from __future__ import annotations

from kdpipe.stage2_distill.losses import lm_loss
from kdpipe.stage2_distill.methods.base import Method, register


@register
class LM(Method):
    name = "lm"
    paper = "hard labels"

    def loss(self, batch, out, step):
        return {"lm": lm_loss(out.logits, batch.input_ids, batch.targets)}
