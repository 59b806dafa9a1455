"""Counting the draws of a sampled cache: the m draws' distinct ids alone against a dense count over the vocabulary.

    python bench/sampled_counts.py [--vocab 49152] [--rows 512] [--draws 12] [--repeats 5]

`kdpipe extract --top-k 0 --sample-count M` draws m ids per position (stage1_extract.logits.systematic_draws) in
windows of --logit-rows positions, then stores each position's distinct ids with their counts, most drawn first.
Through kdpipe 0.7.0 that was a dense [rows, V] count (scatter_add) and its top-m: two passes over the vocabulary per
window. `distinct_counts` sorts the m draws instead. Prints, for one window of random logits, milliseconds of
the draws alone, of draws + dense count, of draws + distinct_counts, and the ratio; checks both give the same
counts. One torch thread, as the head's other work leaves the sampler.
"""

from __future__ import annotations

import argparse
import time

import torch

from kdpipe.stage1_extract.logits import distinct_counts, systematic_draws


def dense_counts(draws: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kdpipe 0.7.0 and earlier: counts over the whole vocabulary, then their top-m."""
    counts = torch.zeros(draws.shape[0], vocab).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float32))
    top, ids = counts.topk(draws.shape[1], dim=-1)
    return torch.where(top > 0, ids, 0), top.long()


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--draws", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, generator=g) * 3
    weights = (logits - logits.max(-1, keepdim=True).values).exp()
    offsets = torch.rand(args.rows, 1, dtype=torch.float64, generator=g)
    draws = systematic_draws(weights, args.draws, offsets)
    rebuilt = [torch.zeros(args.rows, args.vocab, dtype=torch.long).scatter_add_(1, *pair)
               for pair in (dense_counts(draws, args.vocab), distinct_counts(draws))]
    assert torch.equal(*rebuilt), "the two countings disagree"

    runs = {"draws alone": lambda: systematic_draws(weights, args.draws, offsets),
            "draws + dense count": lambda: dense_counts(systematic_draws(weights, args.draws, offsets), args.vocab),
            "draws + distinct_counts": lambda: distinct_counts(systematic_draws(weights, args.draws, offsets))}
    ms = {name: best_ms(fn, args.repeats) for name, fn in runs.items()}
    print(f"one window of {args.rows} positions x vocabulary {args.vocab}, m = {args.draws}, 1 thread, "
          f"best of {args.repeats}")
    for name, t in ms.items():
        print(f"  {name:24} {t:8.1f} ms")
    print(f"  sampler speed-up: {ms['draws + dense count'] / ms['draws + distinct_counts']:.2f}x; counting alone "
          f"{ms['draws + dense count'] - ms['draws alone']:.1f} ms -> "
          f"{ms['draws + distinct_counts'] - ms['draws alone']:.1f} ms")


if __name__ == "__main__":
    main()
