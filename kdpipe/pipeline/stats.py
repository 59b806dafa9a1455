"""`kdpipe inspect --stats`: how much of the teacher's distribution the stored top-k holds, and the
teacher's entropy, computed with dask over the whole cache (chunk by chunk, never all in memory).

The top-k probabilities are exact (log-probabilities through the full-vocabulary logsumexp). The tail
mass t is read from logits/logtail where the cache has it (summed over the full logits at extraction),
since 1 - (sum of float16 top-k probabilities) cancels when the tail is small; older caches fall back to
that difference. The entropy is bounded, not known: the tail's share lies between putting all tail mass
on one token (-t log t) and spreading it evenly over the other V - k tokens (+ t log(V - k)).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdpipe.errors import UserError
from kdpipe.storage.reader import TeacherCache

BINS = 50


def cache_stats(path: str) -> dict[str, Any]:
    import dask.array as da

    cache = TeacherCache(path, allow_partial=True)
    m = cache.manifest
    k, vocab = m.signals.top_k, m.teacher.vocab_size
    if not k:
        raise UserError(f"{path} is an importance-sampled cache (--top-k 0): --stats describes a top-k cache")
    done = cache.done_sequences()
    logp = cache.topk_logprobs_dask().astype("float64")[done]
    lengths = np.asarray(cache.lengths())[done]
    valid = da.from_array(np.arange(m.data.seq_len)[None, :] < lengths[:, None], chunks=logp.chunks[:2])

    p = da.exp(logp)
    if m.signals.logtail:  # T=1 comes first among the stored temperatures
        tail = da.exp(cache.dask("logits/logtail").astype("float64")[done][..., 0])
        mass = 1 - tail
    else:
        mass = p.sum(-1)
        tail = 1 - mass
    tail = da.clip(tail, 0, 1)  # a stored tail below float32's range is -inf: 0
    h_topk = -(p * logp).sum(-1)
    h_low = h_topk - tail * da.log(da.maximum(tail, 1e-300))  # 0 log 0 = 0
    h_high = h_low + tail * np.log(max(vocab - k, 1))
    ks = [x for x in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if x < k] + [k]
    cumulative = da.cumsum(p, axis=-1)
    sel = valid.ravel()
    mass_flat, low_flat, high_flat = mass.ravel()[sel], h_low.ravel()[sel], h_high.ravel()[sel]
    mass_hist, mass_edges = da.histogram(mass_flat, bins=BINS, range=(0, 1))
    top = float(np.log(vocab))
    ent_hist, ent_edges = da.histogram(low_flat, bins=BINS, range=(0, top))
    mean_mass_at = [cumulative[..., x - 1].ravel()[sel].mean() for x in ks]
    results = da.compute(mass_hist, ent_hist, mass_flat.mean(), low_flat.mean(), high_flat.mean(),
                         (mass_flat < 0.5).mean(), tail.ravel()[sel].mean(), *mean_mass_at)
    mass_hist, ent_hist, mean_mass, mean_low, mean_high, below_half, mean_tail, *at = results
    return {
        "path": path, "positions": int(valid.sum().compute()), "top_k": k, "vocab_size": vocab,
        "topk_mass": {"mean": float(mean_mass), "fraction_below_0.5": float(below_half),
                      "quantiles": _quantiles(mass_hist, mass_edges), "histogram": mass_hist.tolist(),
                      "edges": mass_edges.tolist()},
        "tail_mass": {"mean": float(mean_tail), "source": "logits/logtail" if m.signals.logtail else "1 - top-k mass"},
        "mean_mass_at_k": {str(x): float(v) for x, v in zip(ks, at)},
        "entropy_nats": {"mean_lower_bound": float(mean_low), "mean_upper_bound": float(mean_high),
                         "lower_bound_quantiles": _quantiles(ent_hist, ent_edges),
                         "histogram_of_lower_bound": ent_hist.tolist(), "edges": ent_edges.tolist()},
    }


def _quantiles(hist: np.ndarray, edges: np.ndarray, qs=(0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, float]:
    """Quantiles read off the histogram (bin upper edges): exact to one bin width."""
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    return {f"{q:g}": float(edges[1:][np.searchsorted(cdf, q)]) for q in qs}


def format_stats(s: dict[str, Any]) -> str:
    m, e = s["topk_mass"], s["entropy_nats"]
    lines = [f"teacher statistics over {s['positions']} positions (top-{s['top_k']} of {s['vocab_size']})",
             f"  top-{s['top_k']} mass: mean {m['mean']:.4f}; {m['fraction_below_0.5']:.1%} of positions below 0.5; "
             f"quantiles " + ", ".join(f"{q}: {v:.2f}" for q, v in m["quantiles"].items()),
             f"  mass outside the top-{s['top_k']}: mean {s['tail_mass']['mean']:.3g} (from {s['tail_mass']['source']})",
             "  mean mass held by the top-k' tokens: " + ", ".join(f"k'={x}: {v:.3f}"
                                                                   for x, v in s["mean_mass_at_k"].items()),
             f"  entropy (nats): mean between {e['mean_lower_bound']:.3f} and {e['mean_upper_bound']:.3f} "
             f"(the tail's share is bounded, not known)"]
    return "\n".join(lines)


def plot_stats(s: dict[str, Any], png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    m, e = s["topk_mass"], s["entropy_nats"]
    axes[0].stairs(m["histogram"], m["edges"], fill=True)
    axes[0].set(title=f"top-{s['top_k']} probability mass", xlabel="mass", ylabel="positions")
    axes[1].stairs(e["histogram_of_lower_bound"], e["edges"], fill=True)
    axes[1].set(title="teacher entropy (lower bound)", xlabel="nats", ylabel="positions")
    ks = [int(x) for x in s["mean_mass_at_k"]]
    axes[2].plot(ks, list(s["mean_mass_at_k"].values()), "o-")
    axes[2].set(title="mean mass held by the top-k'", xlabel="k'", ylabel="mass", xscale="log", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
