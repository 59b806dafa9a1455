"""Corpus ingestion and packing: text files, jsonl with a text field (plain, .gz or .zst: streams.py),
parquet files (columnar.py), directories and globs -> blocks of `seq_len` token ids."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from kdpipe.errors import UserError
from kdpipe.stage1_extract.columnar import PARQUET_SUFFIXES, iter_parquet
from kdpipe.stage1_extract.streams import JSONL_SUFFIXES, is_jsonl, open_jsonl

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


def expand_sources(patterns: Sequence[str]) -> list[Path]:
    """Files named by paths, directories (searched recursively for text and jsonl files) and globs, sorted."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches or not Path(matches[0]).exists():
            raise UserError(f"corpus path {pattern} matches nothing: check --data")
        for match in map(Path, matches):
            if match.is_dir():
                found = sorted(p for p in match.rglob("*") if p.is_file())
                readable = [p for p in found if p.suffix.lower() in TEXT_SUFFIXES | PARQUET_SUFFIXES or is_jsonl(p)]
                if not readable:
                    skipped = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
                    raise UserError(f"no text or jsonl files under {match}" + (f" (skipped: {skipped})" if found else
                                                                               " (it is empty)")
                                    + f": kdpipe reads "
                                      f"{', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES))} "
                                      f"(jsonl also as .gz or .zst)")
                files += readable
            else:
                files.append(match)
    return files


def iter_documents(files: Sequence[Path], text_field: str = "text") -> Iterator[str]:
    """One document per text file, one per jsonl line, one per parquet row."""
    for path in files:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            yield from iter_parquet(path, text_field)
        elif is_jsonl(path):
            with open_jsonl(path) as f:
                for lineno, line in _lines(f, path):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{lineno} is not valid JSON") from None
                    if not isinstance(record, dict) or text_field not in record:
                        raise UserError(f"{path}:{lineno} has no field {text_field!r}: set --text-field")
                    if not isinstance(record[text_field], str):
                        raise UserError(f"{path}:{lineno}: field {text_field!r} holds a "
                                        f"{type(record[text_field]).__name__}, not text: set --text-field")
                    yield record[text_field]
        else:
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path} is not UTF-8 text: convert it, or leave it out of --data") from None


def _lines(f, path: Path):
    """Numbered lines of a (possibly compressed) stream; a damaged or non-UTF-8 stream is one clear error."""
    try:
        yield from enumerate(f, 1)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:  # gzip/zstd damage, bad bytes
        raise UserError(f"{path} cannot be read to the end ({type(exc).__name__}: {exc}): re-create or leave it "
                        f"out of --data") from None


def starts_with_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer begins every text with it (Gemma's, Llama 2's), else None: a teacher
    trained that way expects it, so each document is given one, as the tokenizer itself would."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def tokenize_documents(docs: Iterator[str], tokenizer, batch: int = 64) -> Iterator[list[int]]:
    """Token ids of each non-empty document, with the BOS its tokenizer adds (but no EOS: packing adds it)."""
    bos = starts_with_bos(tokenizer)
    pending: list[str] = []
    for doc in docs:
        if doc.strip():
            pending.append(doc)
        if len(pending) == batch:
            for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
                yield [bos, *ids] if bos is not None else ids
            pending = []
    if pending:
        for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
            yield [bos, *ids] if bos is not None else ids


def pack(token_docs: Iterator[list[int]], seq_len: int, separator: int | None, packing: str,
         pad_id: int, max_sequences: int | None = None, keep_tail: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Blocks [N, seq_len] int32, valid lengths [N], and the number of tokens dropped.

    `packed`: documents joined with `separator` (EOS) between them, cut into full blocks; the last
    partial block is dropped, or kept padded with its length stored (`keep_tail`). `padded`: each
    document split into blocks of its own, the last one padded.
    """
    rows: list[np.ndarray] = []
    lengths: list[int] = []
    buffer: list[int] = []
    dropped = 0
    full = False
    for doc in token_docs:
        if packing == "packed":
            buffer += doc + ([separator] if separator is not None else [])
            while len(buffer) >= seq_len:
                rows.append(np.asarray(buffer[:seq_len], dtype=np.int32))
                lengths.append(seq_len)
                buffer = buffer[seq_len:]
                if max_sequences and len(rows) >= max_sequences:
                    full = True
                    break
        else:
            for start in range(0, len(doc), seq_len):
                piece = doc[start:start + seq_len]
                row = np.full(seq_len, pad_id, dtype=np.int32)
                row[:len(piece)] = piece
                rows.append(row)
                lengths.append(len(piece))
                if max_sequences and len(rows) >= max_sequences:
                    full = True
                    break
        if full:
            break
    if packing == "packed" and not full and buffer:
        if keep_tail:
            row = np.full(seq_len, pad_id, dtype=np.int32)
            row[:len(buffer)] = buffer
            rows.append(row)
            lengths.append(len(buffer))
        else:
            dropped = len(buffer)
    if not rows:
        raise UserError(f"the corpus holds fewer than {seq_len} tokens, not one block: add data or lower --seq-len")
    return np.stack(rows), np.asarray(lengths, dtype=np.int32), dropped
