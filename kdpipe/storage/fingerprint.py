"""sha256 fingerprints: the data (all token ids), a tokenizer's vocabulary, a teacher's config."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np


def data_fingerprint(blocks: Iterable[np.ndarray], lengths: np.ndarray, seq_len: int) -> str:
    """Two caches over the same token ids get the same fingerprint, whatever the teacher."""
    h = hashlib.sha256(f"kdpipe-data-v1 seq_len={seq_len};".encode())
    for block in blocks:
        h.update(np.ascontiguousarray(block, dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(lengths, dtype="<i4").tobytes())
    return h.hexdigest()


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    payload = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def config_fingerprint(config: dict[str, Any]) -> str:
    # the config's identity, not where it was loaded from or which library version wrote it
    volatile = {"_name_or_path", "transformers_version", "_attn_implementation", "_commit_hash", "dtype", "torch_dtype"}
    stable = {k: v for k, v in config.items() if k not in volatile}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()
