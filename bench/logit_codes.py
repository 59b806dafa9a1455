"""The compact top-k's choices, measured on a float16 cache's exact top-k: which rank table, which order.

    kdpipe extract --teacher smollm2 --data paradiselost.txt --out f16.cache --seq-len 256 --max-sequences 32 \
        --logit-codec float16
    python bench/logit_codes.py f16.cache

The stored bytes per token (the compact presets, one chunk per 16 sequences) of the ids and 8-bit levels as
storage.topk_codec encodes them, with the rank table counted over the first 8 sequences (what extraction
does), over the whole cache, or from corpus frequency alone; and of the ids in logit order for contrast.
"""

from __future__ import annotations

import argparse

import numpy as np
from numcodecs import Blosc

from kdpipe.storage.codecs import PRESETS
from kdpipe.storage.reader import TeacherCache
from kdpipe.storage.topk_codec import encode, rank_table, ranks_of

SHUFFLE = {"shuffle": Blosc.SHUFFLE, "noshuffle": Blosc.NOSHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def stored(arr: np.ndarray, preset: str, rows: int = 16) -> float:
    p = PRESETS[preset]
    codec = Blosc(p["cname"], p["clevel"], SHUFFLE[p["shuffle"].value])
    return sum(len(codec.encode(np.ascontiguousarray(arr[i:i + rows]))) for i in range(0, len(arr), rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache")
    args = ap.parse_args()
    cache = TeacherCache(args.cache)
    assert not cache.manifest.compact_topk, "give a --logit-codec float16 cache: its top-k is exact"
    ids, logp, _ = cache.topk_logprobs()
    tokens = cache.input_ids()
    vocab, positions = cache.manifest.teacher.vocab_size, ids.shape[0] * ids.shape[1]
    corpus = np.bincount(tokens.ravel(), minlength=vocab)
    tables = {"first 8 sequences (extraction)": rank_table(np.bincount(ids[:8].ravel(), minlength=vocab), corpus),
              "whole cache": rank_table(np.bincount(ids.ravel(), minlength=vocab), corpus),
              "corpus frequency only": rank_table(np.zeros(vocab, np.int64), corpus)}
    print(f"{args.cache}: {positions} positions, k={ids.shape[-1]}; stored bytes per token")
    print(f"{'rank table':32} {'ids':>7} {'levels':>7}")
    for name, table in tables.items():
        slots, levels = encode(ids, logp, ranks_of(table), np.uint16)
        print(f"{name:32} {stored(slots, 'ranks') / positions:7.1f} {stored(levels, 'levels') / positions:7.1f}")
    print(f"{'ids in logit order (float16)':32} {stored(ids.astype(np.uint16), 'ids') / positions:7.1f}")


if __name__ == "__main__":
    main()
