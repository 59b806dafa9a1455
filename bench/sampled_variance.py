"""The noise of sampled-logit estimators on a real teacher, without training: what each estimate p^ of the
teacher's distribution costs in variance for the same m draws, measured against the exact p in float64.

    python bench/sampled_variance.py --data '/tmp/plays/*.txt'      # ~3 min on 2 cores

Estimators (all unbiased, or consistent where said), over 16 x 128 tokens of the corpus, 4 seeds of draws:
  counts       systematic draws at T=1, count frequencies c / m (what `kd:estimator=sampled` trains on);
  tempered-T   systematic draws from the teacher at T (flatter: more distinct tail ids), each weighted by
               p / r (r the proposal), with the exact normalizer; `-self` the same weights self-normalized;
  exact-head   draws at T=1, the exact p of every token sure to be drawn (p >= 1/m) from its stored 8-bit
               log-probability, c / m for the others;
  ratio        the same, the other draws sharing the head's exact remainder 1 - sum p_head.
Columns: distinct ids per position (bytes); E|p^ - p|^2 per position; the gradient noise |(sum p^ - 1) q -
(p^ - p)|^2 at a student q = p; the same summed over positions per vocabulary row, squared (what an optimizer's
per-row statistics see); the variance of the estimate of the true next token's probability.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from kdpipe.modelio import resolve_teacher
from kdpipe.pipeline.demo import smollm2_gguf
from kdpipe.stage1_extract.corpus import expand_sources, iter_documents, tokenize_documents
from kdpipe.stage1_extract.logits import LogitSignals, LogitSpec
from kdpipe.stage1_extract.packing import pack
from kdpipe.stage1_extract.teacher import load_teacher_and_tokenizer
from kdpipe.storage.codecs import dequantize_logprobs, quantize_logprobs

ESTIMATORS = ("counts", "tempered-1.5", "tempered-1.5-self", "tempered-2", "tempered-2-self", "exact-head", "ratio")


def draws(logits: torch.Tensor, m: int, tau: float, seed: int):
    spec = LogitSpec(top_k=1, temperatures=[1.0], vocab_size=logits.shape[-1], sample_count=m,
                     sample_temperature=tau, sampler="systematic", seed=seed)
    sig = LogitSignals(spec)
    sig.compute(logits.clone(), lambda h: h, list(range(len(logits))))
    logp = torch.from_numpy(dequantize_logprobs(quantize_logprobs(sig.sampled_logprobs.numpy()))).double()
    return sig.sampled_ids, sig.sampled_counts.double(), logp


def weights(name: str, logits: torch.Tensor, counts: torch.Tensor, logp: torch.Tensor, m: int) -> torch.Tensor:
    if name == "counts":
        return counts / m
    if name.startswith("tempered"):
        tau = float(name.split("-")[1])
        lse1 = logits.double().logsumexp(-1, keepdim=True)
        log_r = (logp + lse1) / tau - (logits.double() / tau).logsumexp(-1, keepdim=True)
        w = (counts / m * (logp - log_r).exp()).masked_fill(counts == 0, 0)
        return w / w.sum(-1, keepdim=True) if name.endswith("-self") else w
    p = logp.exp().masked_fill(counts == 0, 0)
    head = (p >= 1 / m) & (counts > 0)
    exact = torch.where(head, p, torch.zeros_like(p))
    rest = torch.where(head, torch.zeros_like(counts), counts)
    if name == "exact-head":
        return exact + rest / m
    remainder = (1 - exact.sum(-1, keepdim=True)).clamp_min(0)
    n = rest.sum(-1, keepdim=True)
    return exact + torch.where(n > 0, rest * remainder / n.clamp_min(1), torch.zeros_like(counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    source = resolve_teacher(str(smollm2_gguf()))
    teacher, tokenizer = load_teacher_and_tokenizer(source)
    blocks, _ = pack(tokenize_documents(iter_documents(expand_sources(args.data)), tokenizer), 128,
                     tokenizer.eos_token_id, "packed", tokenizer.eos_token_id, max_sequences=args.sequences)
    ids = torch.from_numpy(np.asarray(blocks[0:args.sequences])).long()
    with torch.no_grad():
        logits = torch.cat([teacher(input_ids=x, use_cache=False).logits.float() for x in ids.split(4)])
    p = logits.double().log_softmax(-1).exp()
    target = ids[:, 1:, None]
    true_p = p[:, :-1].gather(-1, target).squeeze(-1)
    print(f"SmolLM2 on {args.sequences} x 128 tokens: teacher perplexity {float((-true_p.log()).mean().exp()):.1f}")
    print(f"{'m':>3} {'estimator':18} {'distinct':>8} {'E|p^-p|^2':>10} {'grad noise':>10} {'per row':>9} "
          f"{'true-token var':>14}")
    for m in (12, 24):
        for name in ESTIMATORS:
            tau = float(name.split("-")[1]) if name.startswith("tempered") else 1.0
            stats = []
            for seed in range(args.seeds):
                drawn, counts, logp = draws(logits, m, tau, seed)
                est = torch.zeros_like(p).scatter_add_(-1, drawn, weights(name, logits, counts, logp, m))
                err = est - p
                noise = (est.sum(-1, keepdim=True) - 1) * p - err  # the gradient's noise in the logits at q = p
                stats.append([float((counts > 0).sum(-1).double().mean()), float((err ** 2).sum(-1).mean()),
                              float((noise ** 2).sum(-1).mean()), float((noise.sum((0, 1)) ** 2).sum()),
                              float((est[:, :-1].gather(-1, target).squeeze(-1) - true_p).pow(2).mean())])
            d, sq, g, row, tv = np.mean(stats, 0)
            print(f"{m:3} {name:18} {d:8.2f} {sq:10.2e} {g:10.2e} {row:9.2e} {tv:14.2e}", flush=True)


if __name__ == "__main__":
    main()
