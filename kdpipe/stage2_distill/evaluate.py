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


def evaluate_model(student: str, cache_path: str, run_dir: str | None, max_sequences: int | None,
                   batch_size: int, device: str) -> dict[str, float]:
    """`kdpipe eval`: a saved student (any HF causal LM directory) against a cache: all its sequences, or the
    held-out units of a `kdpipe distill` run."""
    import json
    import time
    from pathlib import Path

    import transformers

    from kdpipe.errors import UserError
    from kdpipe.stage2_distill.data import eval_batches
    from kdpipe.stage2_distill.methods.base import Needs
    from kdpipe.storage.reader import TeacherCache

    cache = TeacherCache(cache_path)
    if not (Path(student) / "config.json").exists():
        raise UserError(f"{student} is not a model directory (no config.json)")
    model = transformers.AutoModelForCausalLM.from_pretrained(student).to(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab != cache.manifest.teacher.vocab_size:
        raise UserError(f"{student} has a vocabulary of {vocab}, the cache's teacher {cache.manifest.teacher.vocab_size}")
    units = list(range(cache.manifest.layout.num_units))
    if run_dir:
        run_file = Path(run_dir) / "run.json"
        if not run_file.exists():
            raise UserError(f"{run_dir} is not a kdpipe distill run (no run.json)")
        units = json.loads(run_file.read_text())["split"]["eval_units"]
    if not units or max_sequences == 0:
        raise UserError("no sequences to evaluate on")
    seen = {"sequences": 0, "tokens": 0}

    def batches():
        for batch in eval_batches(cache, Needs(topk=True), units, batch_size, max_sequences):
            seen["sequences"] += len(batch.input_ids)
            seen["tokens"] += int(batch.mask.sum())
            yield batch

    start = time.perf_counter()
    metrics = evaluate(model, batches(), torch.device(device), cache.manifest.data.packing == "padded")
    seconds = time.perf_counter() - start
    return {**metrics, "sequences": seen["sequences"], "tokens_per_s": seen["tokens"] / max(seconds, 1e-9)}
