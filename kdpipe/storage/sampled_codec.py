"""The compact sampled encoding (`signals.sampled_codec = "compact-v1"`, the default since kdpipe 0.5).

An importance-sampled cache stores, per position, the distinct ids of m draws, their counts and their 8-bit
log-probabilities. Stored raw (uint16 ids in count order, uint16 counts) that is 35 B/token at m = 12 on real
text, and the one-pass gap to online KD is the draws' variance, ~1/m (bench/RESULTS.md): bytes per draw are
what buys fidelity. Coded like the compact top-k (storage.topk_codec), the distinct ids of a position are
sorted by their rank in the cache's rank -> id table (`logits/id_table`) and stored as slot 0 = the first rank,
then the gaps between ascending ranks; counts are uint8 (m <= 255); log-probabilities follow the same slot
order. Unused slots hold 0 and count 0. Ids and counts are exact; 27.8 B/token at m = 12 (figures in
bench/RESULTS.md, "Compact sampled cache").

The reader returns the draws as the raw encoding did: by count, descending (ties in rank order), slot 0 the
most drawn id, unused slots id 0 and count 0.
"""

from __future__ import annotations

import numpy as np

CODEC = "compact-v1"


def count_dtype(sample_count: int):
    return np.uint8 if sample_count <= 255 else np.uint16


def encode(ids: np.ndarray, counts: np.ndarray, logprobs: np.ndarray | None, ranks: np.ndarray, id_dtype,
           sample_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Distinct ids [..., m] with counts (0: unused) and uint8 log-probabilities -> (rank slots of `id_dtype`,
    counts, log-probabilities), all in ascending rank order, unused slots last and 0."""
    used = counts > 0
    r = np.where(used, ranks[ids], np.iinfo(np.int64).max)  # unused slots sort last
    order = np.argsort(r, axis=-1, kind="stable")
    r, used = np.take_along_axis(r, order, -1), np.take_along_axis(used, order, -1)
    r = np.where(used, r, 0)
    slots = np.where(used, np.concatenate([r[..., :1], np.diff(r, axis=-1)], -1), 0)
    out_counts = np.take_along_axis(counts, order, -1).astype(count_dtype(sample_count))
    out_logp = None if logprobs is None else np.where(used, np.take_along_axis(logprobs, order, -1), 0).astype(np.uint8)
    return slots.astype(id_dtype), out_counts, out_logp


def decode(slots: np.ndarray, counts: np.ndarray, logprobs: np.ndarray | None,
           id_table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """-> (ids int64, counts int64, log-probability codes or None) [..., m], by count descending."""
    counts = counts.astype(np.int64)
    ranks = np.cumsum(slots.astype(np.int64), axis=-1)
    np.clip(ranks, 0, len(id_table) - 1, out=ranks)  # a damaged chunk fails its checksum; never index out
    ids = np.where(counts > 0, id_table[ranks], 0)
    order = np.argsort(-counts, axis=-1, kind="stable")
    ids, counts = np.take_along_axis(ids, order, -1), np.take_along_axis(counts, order, -1)
    return ids, counts, None if logprobs is None else np.take_along_axis(logprobs, order, -1)
