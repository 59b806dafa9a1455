"""Create, resume and fill a teacher cache.

A work unit (one shard of sequences) is written by one writer only, from a bounded background queue
so that the teacher never waits on compression or disk, and its `ledger/done` flag is set only after
all of its arrays are on disk. The manifest says `complete` only once every flag is set.
"""

from __future__ import annotations

import errno
import json
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
from kdpipe.storage.lock import LOCK_NAME
from kdpipe.storage.manifest import Manifest
from kdpipe.storage.codes import Codecs, write_codecs
from kdpipe.storage.schema import (CACHE_ENTRIES, LEDGER, array_specs, ledger_spec, signal_row_index, signal_row_range,
                                   tokenizer_arrays)

# fault injection for the crash-safety tests: "UNIT:mid" (some arrays written, flag not set) or "UNIT:after"
CRASH_ENV = "KDPIPE_TEST_CRASH"
_DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}


def disk_error(exc: OSError, path: str) -> UserError | None:
    """A full or unwritable disk is the user's to fix; say so in one line."""
    what = _DISK_ERRORS.get(exc.errno)
    if what is None:
        return None
    return UserError(f"{what} while writing {path}: free space or fix permissions, then rerun the same command "
                     f"with --resume (what was completed is kept)")


def read_manifest(path: str | Path) -> Manifest | None:
    """The manifest of an existing store, None if there is none, UserError if `path` is something else
    or a store whose metadata is damaged."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_dir():
        raise UserError(f"{path} exists and is a file, not a kdpipe cache: choose another --out")
    if not (path / "zarr.json").exists():
        if any(p.name != LOCK_NAME for p in path.iterdir()):
            raise UserError(f"{path} exists and is not a kdpipe cache: choose another --out (kdpipe will not delete it)")
        return None
    return Manifest.from_dict(group_attrs(path).get("kdpipe"), where=str(path))


def group_attrs(path: str | Path) -> dict:
    """The attributes of the store's root group; a damaged zarr.json is one clear error."""
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for damaged metadata
        raise UserError(f"{path} has damaged zarr metadata ({type(exc).__name__}): replace it with "
                        f"`kdpipe extract --overwrite`") from None


def check_out(path: str | Path, resume: bool, overwrite: bool) -> None:
    """Before any model loads: the output path can hold a cache, and an existing one is resumed or replaced
    only when asked (a damaged one can only be replaced)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out {path}: {parent} is a file, not a directory: choose another --out")
    if overwrite:
        clear_store(path, dry_run=True)
        return
    existing = read_manifest(path)
    if existing is not None and not resume:
        state = "a complete" if existing.complete else "an incomplete"
        raise UserError(f"{path} already holds {state} kdpipe cache: pass --resume to continue it or "
                        f"--overwrite to replace it")


def clear_store(path: Path, dry_run: bool = False) -> None:
    """Empty a store for --overwrite: only one that is recognisably a kdpipe cache (or a directory holding
    a damaged zarr.json and cache arrays), never a user's other data. The lock file stays."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"{path} exists and is a file, not a kdpipe cache: choose another --out")
    entries = [p for p in path.iterdir() if p.name != LOCK_NAME]
    if not entries:
        return
    names = {p.name for p in entries}
    ours = "zarr.json" in names and names <= CACHE_ENTRIES
    if ours:
        try:
            meta = json.loads((path / "zarr.json").read_text())
            # a readable zarr group without a kdpipe manifest is someone else's store
            ours = not (isinstance(meta, dict) and meta.get("node_type") == "group"
                        and "kdpipe" not in (meta.get("attributes") or {}))
        except (ValueError, UnicodeDecodeError):
            pass  # damaged metadata beside cache arrays: a broken kdpipe cache
    if not ours:
        raise UserError(f"{path} exists and is not a kdpipe cache: choose another --out (kdpipe will not delete it)")
    if dry_run:
        return
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


_IDENTITY_NAMES = {"teacher.weights_sha256": "the teacher's weights", "teacher.config_sha256": "the teacher's config",
                   "tokenizer.sha256": "the tokenizer", "tokenizer.vocab_sha256": "the tokenizer's vocabulary",
                   "data.fingerprint": "the token ids (--data, --seq-len, --packing or the tokenizer)"}


# the default changed in kdpipe 0.3: say which flag resumes an older store
_FLAGS = {"topk_codec": " (--logit-codec float16 resumes a float16 cache)",
          "sampler": " (--sampler multinomial resumes an older sampled cache)",
          "sampled_codec": " (--logit-codec float16 resumes a raw sampled cache)"}


def identity_difference(existing: Manifest, wanted: Manifest) -> list[str]:
    """What differs between a store and the run that would resume it, in words."""
    a, b = existing.identity(), wanted.identity()
    out = []
    for key in a:
        if a[key] == b[key]:
            continue
        if isinstance(a[key], dict):
            fields = [f"{key}.{k}: {a[key].get(k)!r} vs {b[key].get(k)!r}{_FLAGS.get(k, '')}" for k in a[key]
                      if a[key].get(k) != b[key].get(k)]
            out += fields
        elif not a[key]:
            out.append(f"{_IDENTITY_NAMES.get(key, key)} (not recorded by the kdpipe that wrote the store)")
        else:
            out.append(f"{_IDENTITY_NAMES.get(key, key)} ({key} {str(a[key])[:12]} vs {str(b[key])[:12]})")
    return out + _logprobs_difference(existing, wanted)


def _logprobs_difference(existing: Manifest, wanted: Manifest) -> list[str]:
    """The draws' log-probabilities are left out of the identity, so that a store from before kdpipe 0.2 (which
    had none) resumes in its own format; a store made with or without them since (--no-sample-logprobs, 0.6)
    resumes only as it was made."""
    e, w = existing.signals, wanted.signals
    if not e.sample_count or e.sampled_logprobs == w.sampled_logprobs:
        return []
    if e.sampled_logprobs:
        return ["signals.sampled_logprobs: True vs False (the store holds the draws' log-probabilities: drop "
                "--no-sample-logprobs to resume it)"]
    made_by = tuple(int(x) if x.isdigit() else 0 for x in str(existing.kdpipe_version).split(".")[:2])
    if made_by >= (0, 6):
        return ["signals.sampled_logprobs: False vs True (--no-sample-logprobs resumes a cache made without them)"]
    return []


def prepare_store(path: str | Path, manifest: Manifest, tokens: np.ndarray, lengths: np.ndarray,
                  resume: bool = False, overwrite: bool = False,
                  tokenizer_files: dict[str, bytes] | None = None, loss_mask=None,
                  codecs: Codecs | None = None) -> zarr.Group:
    """Create the store (or reopen it for `--resume`), with every array created and the token ids (and chat
    data's loss mask), which sequences carry hidden states and attention, the tokenizer files and the codes
    (storage.codes) written. `tokens` and `loss_mask` are read by row ranges, a few shards at a time: the
    corpus need not fit in memory. The caller holds the store's lock."""
    path = Path(path)
    existing = None
    if overwrite:
        clear_store(path)
    else:
        check_out(path, resume, overwrite)
        existing = read_manifest(path)
    if existing is not None:
        diff = identity_difference(existing, manifest)
        if diff:
            raise UserError(f"{path} was extracted with a different configuration ({'; '.join(diff)}): "
                            f"use the same teacher and settings to --resume, or --overwrite to start again")
        manifest = existing
    try:
        group = zarr.open_group(str(path), mode="a")
        if existing is None:
            group.attrs["kdpipe"] = manifest.to_dict()
        _create_arrays(group, manifest)
        n, per_unit = manifest.data.num_sequences, manifest.layout.sequences_per_unit
        step = per_unit * max(1, (1 << 20) // (per_unit * manifest.data.seq_len))  # whole shards, ~1M tokens
        for name, rows in (("tokens/input_ids", tokens), ("tokens/loss_mask", loss_mask)):
            if rows is not None:
                array = writable(group, name)
                for start in range(0, n, step):
                    array[start:start + step] = rows[start:start + step]
        writable(group, "tokens/length")[:] = lengths
        if manifest.subsampled:
            writable(group, "tokens/signal_row")[:] = signal_row_index(manifest)
        if existing is None:  # a resumed store keeps the files it was made with (the tokenizer's hash matched)
            for name, file_name, _ in tokenizer_arrays(manifest):
                writable(group, name)[:] = np.frombuffer((tokenizer_files or {})[file_name], dtype=np.uint8)
            if codecs is not None:  # a resumed store keeps its codes: units already written use them
                write_codecs(group, manifest, codecs, writable)
    except OSError as exc:
        raise disk_error(exc, str(path)) or exc
    return group


def open_store(path: str | Path) -> zarr.Group:
    """An existing store, for a rank other than the one that created it."""
    return zarr.open_group(str(path), mode="r+")


def writable(group: zarr.Group, name: str) -> zarr.Array:
    """An array opened to write every chunk, even one equal to the fill value: a chunk a done unit must
    have is then always on disk, so a missing chunk file is damage, never data (zarr would read it as zeros)."""
    return group[name].with_config({"write_empty_chunks": True})


def _create_arrays(group: zarr.Group, m: Manifest) -> None:
    for spec in array_specs(m):
        if spec.name in group:
            continue
        # signal rows of a subsampled cache: one chunk a work unit; else chunks of sequences in unit shards
        chunk, shard = (spec.unit_rows, spec.unit_rows) if spec.unit_rows else \
            (m.layout.sequences_per_chunk, m.layout.sequences_per_unit)
        inner = (chunk,) + spec.shape[1:] if spec.per_sequence else spec.shape
        outer = (shard,) + spec.shape[1:]
        group.create_array(
            spec.name, shape=spec.shape, dtype=spec.dtype, fill_value=0,
            chunks=inner, shards=outer if shard != chunk and spec.per_sequence else None,
            compressors=compressors(spec.preset),
            attributes={"logical_dtype": spec.logical_dtype} if spec.logical_dtype else None,
        )
    if LEDGER not in group:
        spec = ledger_spec(m)
        group.create_array(LEDGER, shape=spec.shape, chunks=(1,), dtype=spec.dtype, fill_value=0,
                           compressors=compressors(spec.preset))


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

    def __init__(self, group: zarr.Group, path: str, depth: int = 2, manifest: Manifest | None = None):
        self.group, self.path = group, path
        # arrays whose rows are not the unit's sequences (signal rows): where each unit's rows start
        self.manifest = manifest
        self.signal_arrays = {spec.name for spec in array_specs(manifest) if spec.unit_rows} if manifest else set()
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
                    at = signal_row_range(self.manifest, unit)[0] if name in self.signal_arrays else start
                    writable(self.group, name)[at:at + len(data)] = data
                    if i == 0:
                        _crash_point(unit, "mid")
                writable(self.group, LEDGER)[unit] = 1  # last: the unit counts only once all its arrays are written
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
