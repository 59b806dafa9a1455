"""The compact top-k encoding (`signals.topk_codec = "compact-v1"`, the default since kdpipe 0.3).

A float16 top-64 costs ~184 B/token on real text: ids 110 (uint16 in logit order barely compress) and
log-probabilities 74. Two observations make it ~90 (bench/RESULTS.md, "Compact top-k"):

- Ids. Which 64 tokens a teacher ranks highest is skewed towards a few thousand tokens. Ranked by how often
  they appear in the teacher's top-k on a calibration batch (then by corpus frequency, then by id), and
  sorted, the ranks of one position are an increasing sequence whose gaps are small: slot 0 holds the rank of
  the argmax (the top-1 stays exact and first), slots 1.. the gaps between the ascending ranks of the rest.
  The rank -> id table is one array of the cache (`logits/id_table`), written once. Ids are exact.
- Log-probabilities, 8 bits, in the same slot order. What a KL target needs is precision where the mass is:
  the levels u_j of -log p start at 0 and grow by min(e^(u/2) / 64, 1/4), steps of ~1/64 nat near p = 1,
  whose square-root-of-p spacing is the one that spreads the KL error evenly over tokens, widening to 1/4 nat
  for p < 4e-3, down to -38.9 nats. A log-probability is off by at most 1/8 nat before, and 1/4 nat after,
  the reader scales the top-k to the exact mass 1 - tail (the tail bucket is stored, in float16, from the full
  logits): the bucket KL sees a proper distribution and the tail exactly. Entries below e^-38.9 read as it.

The reader returns the top-k in descending order of decoded value (ties in rank order), slot 0 the argmax.
"""

from __future__ import annotations

import numpy as np

CODEC = "compact-v1"
NUM_LEVELS = 256


def _levels() -> np.ndarray:
    u = [0.0]
    for _ in range(NUM_LEVELS - 1):
        u.append(u[-1] + min(np.exp(u[-1] / 2) / 64, 0.25))
    return np.array(u)


LEVELS = _levels()  # -log p of each 8-bit code
_MIDPOINTS = (LEVELS[1:] + LEVELS[:-1]) / 2
_NEGATIVE_LEVELS = (-LEVELS).astype(np.float32)
QUANTIZATION_ERROR = float(np.diff(LEVELS).max() / 2)  # 1/8 nat: nearest level
ERROR_BOUND = 2 * QUANTIZATION_ERROR  # after scaling the top-k to the stored mass 1 - tail
FLOOR = float(LEVELS[-1])  # 38.9 nats


def rank_table(topk_counts: np.ndarray, token_counts: np.ndarray) -> np.ndarray:
    """Ids by rank: most often in the calibration top-k first, then most frequent in the corpus, then by id."""
    vocab = len(topk_counts)
    return np.lexsort((np.arange(vocab), -token_counts.astype(np.int64), -topk_counts.astype(np.int64)))


def ranks_of(id_table: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(id_table), np.int64)
    ranks[id_table] = np.arange(len(id_table))
    return ranks


def encode(ids: np.ndarray, logprobs: np.ndarray, ranks: np.ndarray, id_dtype) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids [..., k] in logit order and their log-probabilities -> (slots of `id_dtype`, uint8 levels)."""
    r = ranks[ids]
    order = np.argsort(r[..., 1:], axis=-1, kind="stable") + 1
    order = np.concatenate([np.zeros_like(order[..., :1]), order], -1)
    r = np.take_along_axis(r, order, -1)
    slots = np.concatenate([r[..., :1], np.diff(r[..., 1:], axis=-1, prepend=0)], -1)
    u = -np.take_along_axis(logprobs.astype(np.float64), order, -1)
    return slots.astype(id_dtype), np.searchsorted(_MIDPOINTS, u).astype(np.uint8)


def decode(slots: np.ndarray, levels: np.ndarray, id_table: np.ndarray,
           logtail: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int64, log-probabilities float32) [..., k], slot 0 the argmax, the rest by decreasing value;
    scaled so that the top-k holds 1 - exp(logtail) (the T=1 log tail [...]) when it is given."""
    slots = slots.astype(np.int64)
    ranks = np.cumsum(slots, axis=-1)
    ranks[..., 1:] -= slots[..., :1]  # slot 0 is a rank of its own, not the start of the gaps
    np.clip(ranks, 0, len(id_table) - 1, out=ranks)  # a damaged chunk fails its checksum; never index out
    # levels ascend as log-probabilities descend: a stable sort of uint8 (a radix sort) keeps ties in rank order
    order = np.argsort(levels[..., 1:], axis=-1, kind="stable") + 1
    order = np.concatenate([np.zeros_like(order[..., :1]), order], -1)
    ids = id_table[np.take_along_axis(ranks, order, -1)]
    logp = _NEGATIVE_LEVELS[np.take_along_axis(levels, order, -1)]
    if logtail is not None:
        top = logp[..., :1]  # slot 0 holds the largest value
        norm = np.log(np.exp(logp - top).sum(-1, dtype=np.float64))
        mass = np.log(-np.expm1(np.minimum(logtail.astype(np.float64), -1e-30)))
        logp += (mass - top[..., 0] - norm).astype(np.float32)[..., None]
    return ids, logp
