"""Compressed jsonl, read as a stream: `.jsonl.gz` (stdlib) and `.jsonl.zst` (zstandard), never whole.

A compressed file cut short must not read as a shorter corpus: gzip raises at its end, and the zstd reader
here checks that the last frame ended (zstandard's own stream reader just stops)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

from kdpipe.errors import UserError

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
COMPRESSED = (".gz", ".zst")
CHUNK = 1 << 16


def is_jsonl(path: Path) -> bool:
    """`.jsonl`/`.ndjson`, plain or compressed (`.jsonl.gz`, `.jsonl.zst`)."""
    name = path.name.lower()
    for ending in COMPRESSED:
        if name.endswith(ending):
            name = name[: -len(ending)]
    return Path(name).suffix in JSONL_SUFFIXES


def open_jsonl(path: Path):
    """A text stream over a jsonl file, decompressed on the fly."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".zst"):
        return io.TextIOWrapper(io.BufferedReader(ZstdReader(path)), encoding="utf-8")
    return open(path, encoding="utf-8")


class ZstdReader(io.RawIOBase):
    """Raw bytes of a (multi-frame) zstd file; damage or a truncated last frame raise OSError/EOFError."""

    def __init__(self, path: Path):
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{path} is zstd-compressed: pip install zstandard (or kdpipe[zstd])") from None
        self._zstd = zstandard
        self._file = open(path, "rb")
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            data = self._file.read(CHUNK)
            if not data:
                if not self._frame.eof:
                    raise EOFError("the compressed stream ends inside a frame")
                return 0
            while data:
                if self._frame.eof:  # the next frame of a multi-frame file
                    self._frame = self._zstd.ZstdDecompressor().decompressobj()
                try:
                    self._pending += self._frame.decompress(data)
                except self._zstd.ZstdError as exc:
                    raise OSError(str(exc)) from None
                data = self._frame.unused_data if self._frame.eof else b""
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()
