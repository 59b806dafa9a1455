"""Reading a cache without trusting it.

zarr reads a missing chunk as its fill value without a word: a deleted chunk of top-k log-probabilities
reads as zeros, and a student would train on probabilities summing to k. Every chunk a done unit must
have is written (`writer.writable`), so here a missing chunk file is damage: reads check that the
chunk (or shard) files they cover exist, and a chunk that fails its checksum or does not decode is
named by array and sequences, with the command that repairs it. Array metadata is checked against
the manifest's schema (shape, dtype, codecs) before anything is read.
"""

from __future__ import annotations

import os

import numpy as np
import zarr
from zarr.core.sync import sync
from zarr.storage import LocalStore

from kdpipe.errors import UserError
from kdpipe.storage.schema import ArraySpec

# every codec a kdpipe cache uses; anything else in an array's metadata is not ours
ALLOWED_CODECS = {"bytes", "blosc", "crc32c", "sharding_indexed", "zstd", "transpose"}


class DamagedCache(UserError):
    """A chunk that is missing or does not decode."""


def open_array(group: zarr.Group, name: str, where: str) -> zarr.Array:
    try:
        arr = group[name]
    except KeyError:
        raise DamagedCache(f"{where} has no array {name}: re-extract it with --overwrite") from None
    except Exception as exc:  # noqa: BLE001 - damaged metadata surfaces as many exception types
        raise DamagedCache(f"{where}: the metadata of {name} is damaged ({type(exc).__name__}): re-extract it "
                           f"with --overwrite") from None
    if not isinstance(arr, zarr.Array):
        raise DamagedCache(f"{where}: {name} is not an array: re-extract it with --overwrite")
    return arr


def codec_names(arr: zarr.Array) -> set[str]:
    names = set()

    def walk(codecs) -> None:
        for codec in codecs:
            raw = codec.to_dict()
            names.add(raw.get("name"))
            conf = raw.get("configuration") or {}
            for key in ("codecs", "index_codecs"):
                if key in conf:
                    walk(getattr(codec, key))

    walk(arr.metadata.codecs)
    return names


def schema_problem(arr: zarr.Array, spec: ArraySpec) -> str | None:
    """Why this array does not match what the manifest says it holds, or None."""
    if tuple(arr.shape) != spec.shape or str(arr.dtype) != spec.dtype:
        return f"{spec.name}: shape {tuple(arr.shape)} {arr.dtype}, expected {spec.shape} {spec.dtype}"
    foreign = codec_names(arr) - ALLOWED_CODECS
    if foreign:
        return f"{spec.name}: codec {sorted(foreign)[0]!r} is not one kdpipe writes"
    rows = arr.shards[0] if arr.shards else arr.chunks[0]
    if rows < 1 or tuple(arr.chunks[1:]) != spec.shape[1:]:
        return f"{spec.name}: chunks {arr.chunks} do not run along the sequence axis"
    return None


def objects(arr: zarr.Array, start: int, stop: int) -> list[tuple[int, int, str]]:
    """(first row, end row, store key) of each chunk file (shard file, if sharded) covering rows [start, stop)."""
    rows = arr.shards[0] if arr.shards else arr.chunks[0]
    rest = (0,) * (arr.ndim - 1)
    out = []
    for i in range(start // rows, (max(stop, start + 1) - 1) // rows + 1):
        key = arr.metadata.encode_chunk_key((i, *rest))
        out.append((i * rows, min((i + 1) * rows, arr.shape[0]), key))
    return out


def missing_rows(arr: zarr.Array, start: int, stop: int) -> list[tuple[int, int]]:
    """The row ranges within [start, stop) whose chunk file is not in the store."""
    store, base = arr.store_path.store, arr.store_path.path
    keys = [(a, b, f"{base}/{key}" if base else key) for a, b, key in objects(arr, start, stop)]
    if isinstance(store, LocalStore):  # a stat, not a round trip through zarr's event loop
        return [(a, b) for a, b, key in keys if not os.path.exists(os.path.join(store.root, key))]
    return [(a, b) for a, b, key in keys if not sync(store.exists(key))]


def read_rows(arr: zarr.Array, name: str, index, where: str) -> np.ndarray:
    """Rows of one array (a contiguous slice or an index array), refusing missing and damaged chunks."""
    if isinstance(index, slice):
        lo, hi, _ = index.indices(arr.shape[0])
        rows = None
    else:
        rows = np.asarray(index, dtype=np.int64)
        lo, hi = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
    if hi > lo:
        for a, b in missing_rows(arr, lo, hi):
            if rows is None or ((rows >= a) & (rows < b)).any():
                raise DamagedCache(damage(where, name, a, b, "is missing"))
    try:
        return np.asarray(arr[index] if rows is None else arr.get_orthogonal_selection((rows,)))
    except Exception as exc:  # noqa: BLE001 - a checksum or decode failure: find the chunk and name it
        for a, b, _ in objects(arr, lo, hi) if hi > lo else []:
            try:
                arr[a:b]
            except Exception:  # noqa: BLE001
                raise DamagedCache(damage(where, name, a, b, f"is damaged ({type(exc).__name__})")) from None
        raise DamagedCache(f"{where}: reading {name} failed ({type(exc).__name__}: {exc})") from None


def damage(where: str, name: str, a: int, b: int, what: str) -> str:
    return (f"{where}: {name}, chunk of sequences {a}..{b - 1}, {what}: run `kdpipe verify --repair {where}`, "
            f"then `kdpipe extract --resume` to re-extract it")
