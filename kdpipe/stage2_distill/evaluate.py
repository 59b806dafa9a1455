"""Held-out evaluation against the teacher cache: next-token cross-entropy (and perplexity), the exact
bucket KL to the teacher over its stored top-k, and top-1 agreement with the teacher."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from kdpipe.stage2_distill.losses import bucket_kl, lm_loss
from kdpipe.stage2_distill.methods.base import Batch


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device, padded: bool) -> dict[str, float]:
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = agree = positions = lm_positions = 0.0
    for batch in batches:
        batch = batch.to(device)
        mask = batch.mask.long() if padded else None
        logits = model(input_ids=batch.input_ids, attention_mask=mask, use_cache=False).logits.float()
        n = batch.mask.sum().item()
        n_lm = batch.mask[:, 1:].sum().item()
        ce_sum += lm_loss(logits, batch.input_ids, batch.mask).item() * n_lm
        kl_sum += bucket_kl(logits, batch.topk_ids, batch.topk_logprobs, 1.0, batch.mask).item() * n
        agree += ((logits.argmax(-1) == batch.topk_ids[..., 0]) & batch.mask).sum().item()
        positions += n
        lm_positions += n_lm
    model.train(was_training)
    ce = ce_sum / max(lm_positions, 1)
    return {"eval/ce": ce, "eval/ppl": math.exp(min(ce, 50)), "eval/kl_teacher": kl_sum / max(positions, 1),
            "eval/top1_agreement": agree / max(positions, 1)}
