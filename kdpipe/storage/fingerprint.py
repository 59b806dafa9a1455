"""sha256 fingerprints: the data (all token ids), a tokenizer, a teacher's config and weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np


class DataHasher:
    """The data fingerprint, fed rows of token ids in order (a corpus need not be in memory at once)."""

    def __init__(self, seq_len: int):
        self._h = hashlib.sha256(f"kdpipe-data-v1 seq_len={seq_len};".encode())

    def update(self, block: np.ndarray) -> None:
        self._h.update(np.ascontiguousarray(block, dtype="<i4").tobytes())

    def finish(self, lengths: np.ndarray) -> str:
        self._h.update(np.ascontiguousarray(lengths, dtype="<i4").tobytes())
        return self._h.hexdigest()


def data_fingerprint(blocks: Iterable[np.ndarray], lengths: np.ndarray, seq_len: int) -> str:
    """Two caches over the same token ids get the same fingerprint, whatever the teacher."""
    hasher = DataHasher(seq_len)
    for block in blocks:
        hasher.update(block)
    return hasher.finish(lengths)


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    payload = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def config_fingerprint(config: dict[str, Any]) -> str:
    # the config's identity, not where it was loaded from or which library version wrote it
    volatile = {"_name_or_path", "transformers_version", "_attn_implementation", "_commit_hash", "dtype", "torch_dtype"}
    stable = {k: v for k, v in config.items() if k not in volatile}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5", ".safetensors.index.json",
                   ".bin.index.json")


def weight_files(directory: Path, gguf_file: str | None = None) -> list[Path]:
    """The files that hold a model's weights: its GGUF file, or every weight file of a model directory."""
    if gguf_file:
        return [directory / gguf_file]
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def files_fingerprint(files: list[Path], root: Path) -> str:
    """sha256 over each file's name, size and content sha256. Weight files are hashed whole (a teacher
    with the same config and other weights must not pass for the same teacher), in parallel threads:
    hashlib releases the GIL, so this runs at disk speed."""
    from concurrent.futures import ThreadPoolExecutor

    def digest(path: Path) -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(files)))) as pool:
        digests = list(pool.map(digest, files))
    h = hashlib.sha256(b"kdpipe-files-v1;")
    for path, d in zip(files, digests):
        h.update(f"{path.relative_to(root)}:{path.stat().st_size}:{d};".encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything that maps text to ids: vocabulary, merges, normalizer, pre-tokenizer, special tokens and
    whether BOS/EOS are added (the fast tokenizer's serialized form holds all of it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str() if backend is not None else None,
        "vocab": None if backend is not None else sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "add_bos": getattr(tokenizer, "add_bos_token", None), "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()
