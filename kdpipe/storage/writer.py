"""Create, resume and fill a teacher cache.

A work unit (one shard of sequences) is written by one writer only, from a bounded background queue
so that the teacher never waits on compression or disk, and its `ledger/done` flag is set only after
all of its arrays are on disk. The manifest says `complete` only once every flag is set.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import zarr

from kdpipe.errors import UserError
from kdpipe.storage.codecs import compressors
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.schema import array_specs

LEDGER = "ledger/done"
# fault injection for the crash-safety tests: "UNIT:mid" (some arrays written, flag not set) or "UNIT:after"
CRASH_ENV = "KDPIPE_TEST_CRASH"
_DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}


def disk_error(exc: OSError, path: str) -> UserError | None:
    """A full or unwritable disk is the user's to fix; say so in one line."""
    what = _DISK_ERRORS.get(exc.errno)
    if what is None:
        return None
    return UserError(f"{what} while writing {path}: free space or fix permissions, then rerun with --resume "
                     f"(completed work units stay valid)")


def read_manifest(path: str | Path) -> Manifest | None:
    """The manifest of an existing store, None if there is none, UserError if `path` is something else."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_dir():
        raise UserError(f"{path} exists and is a file, not a kdpipe cache: choose another --out")
    if not (path / "zarr.json").exists():
        if any(path.iterdir()):
            raise UserError(f"{path} exists and is not a kdpipe cache: choose another --out (kdpipe will not delete it)")
        return None
    group = zarr.open_group(str(path), mode="r")
    return Manifest.from_dict(group.attrs.get("kdpipe"), where=str(path))


def prepare_store(path: str | Path, manifest: Manifest, tokens: np.ndarray, lengths: np.ndarray,
                  resume: bool = False, overwrite: bool = False) -> zarr.Group:
    """Create the store (or reopen it for `--resume`), with every array and the token ids written."""
    path = Path(path)
    existing = read_manifest(path)
    if existing is not None:
        if overwrite:
            shutil.rmtree(path)
        elif not resume:
            state = "a complete" if existing.complete else "an incomplete"
            raise UserError(f"{path} already holds {state} kdpipe cache: pass --resume to continue it or "
                            f"--overwrite to replace it")
        else:
            diff = [k for k, v in manifest.identity().items() if existing.identity()[k] != v]
            if diff:
                raise UserError(f"{path} was extracted with a different configuration ({', '.join(diff)} differ): "
                                f"use the same settings to --resume, or --overwrite to start again")
            manifest = existing
    try:
        group = zarr.open_group(str(path), mode="a")
        if existing is None or overwrite:
            group.attrs["kdpipe"] = manifest.to_dict()
        _create_arrays(group, manifest)
        group["tokens/input_ids"][:] = tokens
        group["tokens/length"][:] = lengths
    except OSError as exc:
        raise disk_error(exc, str(path)) or exc
    return group


def open_store(path: str | Path) -> zarr.Group:
    """An existing store, for a rank other than the one that created it."""
    return zarr.open_group(str(path), mode="r+")


def _create_arrays(group: zarr.Group, m: Manifest) -> None:
    chunk, shard = m.layout.sequences_per_chunk, m.layout.sequences_per_unit
    for spec in array_specs(m):
        if spec.name in group:
            continue
        inner = (chunk,) + spec.shape[1:]
        outer = (shard,) + spec.shape[1:]
        group.create_array(
            spec.name, shape=spec.shape, dtype=spec.dtype, fill_value=0,
            chunks=inner, shards=outer if shard != chunk else None,
            compressors=compressors(spec.preset),
            attributes={"logical_dtype": spec.logical_dtype} if spec.logical_dtype else None,
        )
    if LEDGER not in group:
        group.create_array(LEDGER, shape=(m.layout.num_units,), chunks=(1,), dtype="uint8", fill_value=0,
                           compressors=compressors("raw"))


def units_done(group: zarr.Group) -> np.ndarray:
    return np.asarray(group[LEDGER][:]).astype(bool)


def finalize(group: zarr.Group) -> bool:
    """Mark the manifest complete if every work unit is done; return whether it is."""
    raw = dict(group.attrs["kdpipe"])
    done = bool(units_done(group).all())
    if raw.get("complete") != done:
        raw["complete"] = done
        group.attrs["kdpipe"] = raw
    return done


class UnitWriter:
    """Writes work units from a bounded queue on a background thread.

    `submit` blocks only when `depth` units are already waiting, which bounds memory; an error in the
    writer thread is raised in the caller at the next `submit` or at `close`.
    """

    def __init__(self, group: zarr.Group, path: str, depth: int = 2):
        self.group, self.path = group, path
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kdpipe-writer", daemon=True)
        self._thread.start()

    def submit(self, unit: int, start: int, arrays: dict[str, np.ndarray]) -> None:
        self._raise_if_failed()
        self._queue.put((unit, start, arrays))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain: after a failure nothing more is written
            unit, start, arrays = item
            try:
                for i, (name, data) in enumerate(arrays.items()):
                    self.group[name][start:start + len(data)] = data
                    if i == 0:
                        _crash_point(unit, "mid")
                self.group[LEDGER][unit] = 1  # last: the unit counts only once all its arrays are written
                _crash_point(unit, "after")
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        exc = self._error
        if isinstance(exc, OSError):
            raise disk_error(exc, self.path) or exc
        raise exc


def _crash_point(unit: int, stage: str) -> None:
    if os.environ.get(CRASH_ENV) == f"{unit}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def store_bytes(path: str | Path, name: str) -> int:
    """Bytes on disk of one array of a local store."""
    total = 0
    for root, _, files in os.walk(Path(path) / name):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
