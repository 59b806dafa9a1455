"""Held-out evaluation against the teacher cache: next-token cross-entropy (and perplexity), the exact
bucket KL to the teacher over its stored top-k, and top-1 agreement with the teacher."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from kdpipe.console import say
from kdpipe.errors import UserError
from kdpipe.modelio import load_teacher, resolve_teacher
from kdpipe.stage2_distill.data import eval_batches
from kdpipe.stage2_distill.losses import bucket_kl, lm_loss, sampled_cross_entropy, sampled_kl
from kdpipe.stage2_distill.methods.base import Batch, Needs
from kdpipe.jsonfile import read_json
from kdpipe.storage.reader import TeacherCache


def eval_needs(cache) -> Needs:
    """What evaluation reads: the top-k, or the draws of an importance-sampled cache (--top-k 0)."""
    return Needs(topk=True) if cache.manifest.signals.top_k else Needs(sampled=True, sampled_at=[1.0])


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device, padded: bool) -> dict[str, float]:
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = agree = positions = lm_positions = 0.0
    kl_key = "eval/kl_teacher"
    for batch in batches:
        batch = batch.to(device)
        mask = batch.mask.long() if padded else None
        logits = model(input_ids=batch.input_ids, attention_mask=mask, use_cache=False).logits.float()
        predicts, targets = batch.predicts, batch.targets  # chat data: the assistant's tokens only
        n = predicts.sum().item()
        n_lm = targets[:, 1:].sum().item()
        ce_sum += lm_loss(logits, batch.input_ids, targets).item() * n_lm
        if batch.topk_ids is not None:
            tail = None if batch.logtail is None else batch.logtail[..., 0]
            kl_sum += bucket_kl(logits, batch.topk_ids, batch.topk_logprobs, 1.0, predicts, t_logtail=tail).item() * n
            top1 = batch.topk_ids[..., 0]
        elif batch.sampled_logprobs is not None:  # an importance-sampled cache: the unbiased KL estimate from
            kl_sum += sampled_kl(logits, batch.sampled_ids, batch.sampled_counts, batch.sampled_logprobs,  # draws
                                 predicts).item() * n
            top1 = batch.sampled_ids[..., 0]  # the most drawn id
        else:  # draws without log-probabilities: the teacher's entropy is unknown, so its cross-entropy, not KL
            kl_sum += sampled_cross_entropy(logits, batch.sampled_ids, batch.sampled_counts, mask=predicts).item() * n
            top1, kl_key = batch.sampled_ids[..., 0], "eval/ce_teacher"
        agree += ((logits.argmax(-1) == top1) & predicts).sum().item()
        positions += n
        lm_positions += n_lm
    model.train(was_training)
    ce = ce_sum / max(lm_positions, 1)
    return {"eval/ce": ce, "eval/ppl": math.exp(min(ce, 50)), kl_key: kl_sum / max(positions, 1),
            "eval/top1_agreement": agree / max(positions, 1)}


def held_out_units(run_dir: Path, cache: TeacherCache) -> list[int]:
    """The held-out units a run recorded in its run.json (checked: a run directory is input too)."""
    record = read_json(run_dir / "run.json")
    if record is None:
        raise UserError(f"{run_dir} is not a kdpipe distill run (no run.json)")
    units = record.get("split", {}).get("eval_units") if isinstance(record, dict) else None
    total = cache.manifest.layout.num_units
    if not isinstance(units, list) or not all(isinstance(u, int) and 0 <= u < total for u in units):
        raise UserError(f"{run_dir}/run.json has no valid held-out units for {cache.path} ({total} units)")
    if record.get("cache_fingerprint") not in (None, cache.manifest.data.fingerprint):
        raise UserError(f"{run_dir} was trained on a cache of other token ids than {cache.path}: its held-out units "
                        f"mean nothing there")
    return units


def evaluate_model(model_path: str, cache_path: str, run_dir: str | None, max_sequences: int | None,
                   batch_size: int, device: str, model=None) -> dict[str, float]:
    """`kdpipe eval`: any causal LM (a saved student, or a teacher: a model directory or a .gguf file) against
    a cache: the held-out units of a `kdpipe distill` run, or all of its sequences. A caller that has the model
    loaded already (the demo, from extraction) passes it; `model_path` then only names it."""
    source = resolve_teacher(model_path, "model")  # paths first, before anything loads
    cache = TeacherCache(cache_path)
    if run_dir:
        units = held_out_units(Path(run_dir), cache)
    else:
        units = np.flatnonzero(cache.units_done()).tolist()
    if not units or max_sequences == 0 or batch_size <= 0:
        raise UserError("no sequences to evaluate on (check --run, --max-sequences and --batch-size)")
    model = load_teacher(source, device=device) if model is None else model
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab != cache.manifest.teacher.vocab_size:
        raise UserError(f"{model_path} has a vocabulary of {vocab}, the cache's teacher "
                        f"{cache.manifest.teacher.vocab_size}: evaluate a model of the teacher's vocabulary")
    if not run_dir:
        say(f"evaluating on all {cache.num_sequences} sequences of {cache_path}, training sequences included: "
            f"pass --run DIR to use that run's held-out units")
    seen = {"sequences": 0, "tokens": 0}

    def batches():
        for batch in eval_batches(cache, eval_needs(cache), units, batch_size, max_sequences):
            seen["sequences"] += len(batch.input_ids)
            seen["tokens"] += int(batch.mask.sum())
            yield batch

    start = time.perf_counter()
    metrics = evaluate(model, batches(), torch.device(device), cache.manifest.data.packing == "padded")
    seconds = time.perf_counter() - start
    return {**metrics, "sequences": seen["sequences"], "tokens_per_s": seen["tokens"] / max(seconds, 1e-9)}
