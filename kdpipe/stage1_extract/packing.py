"""Token documents -> blocks of `seq_len` ids, spooled to disk as they are made.

A 10 GB corpus is ~2.5 billion tokens, 10 GB as int32 blocks: holding them in memory would make
extraction need as much RAM as the corpus is big. `TokenBlocks` writes full rows to an anonymous file
(deleted when closed, or when the process dies) and reads any range back; the data fingerprint is
hashed on the way in, so no pass needs every row at once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from kdpipe.errors import UserError
from kdpipe.storage.fingerprint import DataHasher

FLUSH_ROWS = 1024


class Piece(NamedTuple):
    """Token ids of a document, or of the next part of one (`continued`: no separator before it).
    `learn` (chat) marks the ids a student learns, one per id."""
    ids: list[int]
    continued: bool = False
    learn: list[int] | None = None


class TokenBlocks:
    """Rows of `seq_len` int32 ids (and, for chat data, uint8 loss masks) in a spool file; `lengths` in memory."""

    def __init__(self, seq_len: int, spool_dir: str | Path | None = None, unk_id: int | None = None):
        self.seq_len = seq_len
        self._dir = spool_dir
        self._file = tempfile.TemporaryFile(prefix="kdpipe-tokens-", dir=spool_dir)
        self._masks = None  # a second spool, opened by the first row that carries a loss mask
        self._rows: list[np.ndarray] = []
        self._mask_rows: list[np.ndarray] = []
        self._lengths: list[int] = []
        self._hasher = DataHasher(seq_len)
        self._unk_id = unk_id
        self.unknown_tokens = 0
        self.learned_tokens = 0
        self.fingerprint: str | None = None

    # -- writing -----------------------------------------------------------------------------------
    def append(self, ids: list[int], length: int, pad_id: int, learn: list[int] | None) -> None:
        row = np.full(self.seq_len, pad_id, dtype=np.int32)
        row[:length] = ids[:length]
        if self._unk_id is not None:
            self.unknown_tokens += int((row[:length] == self._unk_id).sum())
        self._rows.append(row)
        self._lengths.append(length)
        if learn is not None and self._masks is None:
            self._masks = tempfile.TemporaryFile(prefix="kdpipe-mask-", dir=self._dir)
            self._masks.write(bytes(self.seq_len * (len(self._lengths) - 1)))  # rows before it learn nothing
        if self._masks is not None:
            mask = np.zeros(self.seq_len, dtype=np.uint8)
            mask[:length] = (learn or [0] * length)[:length]
            self.learned_tokens += int(mask.sum())
            self._mask_rows.append(mask)
        if len(self._rows) >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            block = np.stack(self._rows)
            self._hasher.update(block)
            self._file.write(block.tobytes())
            self._rows = []
        if self._mask_rows:
            self._masks.write(np.stack(self._mask_rows).tobytes())
            self._mask_rows = []

    def finish(self) -> "TokenBlocks":
        self._flush()
        self._file.flush()
        if self._masks is not None:
            self._masks.flush()
        self.lengths = np.asarray(self._lengths, dtype=np.int32)
        self.fingerprint = self._hasher.finish(self.lengths)
        return self

    # -- reading -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def has_loss_mask(self) -> bool:
        return self._masks is not None

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self[int(index):int(index) + 1][0]
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("TokenBlocks reads contiguous ranges")
        return self._read(self._file, start, max(stop, start), np.int32)

    @property
    def masks(self) -> "_Masks":
        """The loss masks, read by range like the rows (`blocks.masks[a:b]`)."""
        return _Masks(self)

    def _read(self, f, start: int, stop: int, dtype) -> np.ndarray:
        width = self.seq_len * np.dtype(dtype).itemsize
        data = os.pread(f.fileno(), (stop - start) * width, start * width)
        return np.frombuffer(data, dtype=dtype).reshape(stop - start, self.seq_len).copy()

    def close(self) -> None:
        self._file.close()
        if self._masks is not None:
            self._masks.close()


class _Masks:
    def __init__(self, blocks: TokenBlocks):
        self._blocks = blocks

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(len(self._blocks))
        return self._blocks._read(self._blocks._masks, start, max(start, stop), np.uint8)


def pack(pieces: Iterator[Piece], seq_len: int, separator: int | None, packing: str, pad_id: int,
         max_sequences: int | None = None, keep_tail: bool = False, spool_dir: str | Path | None = None,
         unk_id: int | None = None) -> tuple[TokenBlocks, int]:
    """Blocks of the corpus and the number of tokens dropped.

    `packed`: documents joined with `separator` (EOS) after each, cut into full blocks; the last partial
    block is dropped, or kept padded with its length stored (`keep_tail`). A chat conversation (a piece
    with `learn`) that fits in a block is never cut: the block before it is closed, padded, instead.
    `padded`: each document split into blocks of its own, the last one padded.
    """
    blocks = TokenBlocks(seq_len, spool_dir, unk_id)
    buffer: list[int] = []
    learn: list[int] | None = None
    pending_separator = False
    try:
        for piece in pieces:
            starts = not piece.continued
            if piece.learn is not None and learn is None:
                learn = [0] * len(buffer)
            if starts and packing == "padded" and buffer:
                _emit(blocks, buffer, learn, seq_len, pad_id, len(buffer))
                buffer, learn = [], ([] if learn is not None else None)
            if starts and pending_separator:
                buffer.append(separator)
                if learn is not None:
                    learn.append(0)
            if (piece.learn is not None and packing == "packed" and buffer
                    and len(buffer) + len(piece.ids) + 1 > seq_len >= len(piece.ids) + 1):
                _emit(blocks, buffer, learn, seq_len, pad_id, len(buffer))  # the row closes early, padded
                buffer, learn = [], []
                if _full(blocks, max_sequences):
                    break
            buffer += piece.ids
            if learn is not None:
                learn += piece.learn if piece.learn is not None else [0] * len(piece.ids)
            pending_separator = separator is not None and packing == "packed"
            while len(buffer) >= seq_len and not _full(blocks, max_sequences):
                _emit(blocks, buffer, learn, seq_len, pad_id, seq_len)
                buffer = buffer[seq_len:]
                learn = learn[seq_len:] if learn is not None else None
            if _full(blocks, max_sequences):
                buffer = []
                break
        if pending_separator and not _full(blocks, max_sequences):
            buffer.append(separator)
            if learn is not None:
                learn.append(0)
            if len(buffer) == seq_len:
                _emit(blocks, buffer, learn, seq_len, pad_id, seq_len)
                buffer = []
        dropped = 0
        if buffer and (packing == "padded" or keep_tail):
            _emit(blocks, buffer, learn, seq_len, pad_id, len(buffer))
        elif buffer:
            dropped = len(buffer)
        if not len(blocks):
            raise UserError(f"the corpus holds fewer than {seq_len} tokens, not one block: add data or lower --seq-len")
        return blocks.finish(), dropped
    except BaseException:
        blocks.close()
        raise


def _emit(blocks: TokenBlocks, buffer: list[int], learn: list[int] | None, seq_len: int, pad_id: int,
          length: int) -> None:
    blocks.append(buffer[:seq_len], min(length, seq_len), pad_id, learn[:seq_len] if learn is not None else None)


def _full(blocks: TokenBlocks, max_sequences: int | None) -> bool:
    return bool(max_sequences) and len(blocks) >= max_sequences
