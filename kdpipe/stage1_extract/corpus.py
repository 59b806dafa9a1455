"""Corpus ingestion: text files, jsonl with a text or messages field (plain, .gz or .zst: streams.py), parquet
and Arrow files and `datasets` directories (columnar.py), directories and globs -> token pieces for packing.py.
Everything streams: a text file is read in pieces, a columnar file a batch of rows at a time."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

from kdpipe.errors import UserError
from kdpipe.stage1_extract.chat import render_conversation
from kdpipe.stage1_extract.columnar import ARROW_SUFFIXES, PARQUET_SUFFIXES, dataset_files, iter_column
from kdpipe.stage1_extract.packing import Piece
from kdpipe.stage1_extract.streams import JSONL_SUFFIXES, is_jsonl, open_jsonl

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}
COLUMNAR_SUFFIXES = PARQUET_SUFFIXES | ARROW_SUFFIXES
PIECE_CHARS = 1 << 20  # a text file above 4 pieces is read and tokenized a piece at a time
# a piece ends at a newline between two non-blank characters: BPE pre-tokenizers split there anyway, so the
# pieces tokenize to the ids of the whole text (a blank line could merge with the next one's newline)
PIECE_END = re.compile(r"(?<=\S)\n(?=\S)")


class Continued(str):
    """The next piece of the document before it: no separator, no BOS between them."""


def expand_sources(patterns: Sequence[str]) -> list[Path]:
    """Files named by paths, directories (searched recursively; a `datasets` directory gives its own shards in
    order) and globs, sorted."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches or not Path(matches[0]).exists():
            raise UserError(f"corpus path {pattern} matches nothing: check --data")
        for match in map(Path, matches):
            if match.is_dir():
                files += _directory_files(match)
            else:
                files.append(match)
    return files


def _directory_files(directory: Path) -> list[Path]:
    shards = dataset_files(directory)
    if shards is not None:
        return shards
    found = sorted(p for p in directory.rglob("*") if p.is_file())
    readable = [p for p in found if p.suffix.lower() in TEXT_SUFFIXES | COLUMNAR_SUFFIXES or is_jsonl(p)]
    if not readable:
        skipped = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(f"no corpus files under {directory}" + (f" (skipped: {skipped})" if found else " (it is empty)")
                        + f": kdpipe reads {', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES | COLUMNAR_SUFFIXES))} "
                          f"(jsonl also as .gz or .zst) and datasets.save_to_disk directories")
    return readable


def iter_documents(files: Sequence[Path], field: str = "text", kind: str = "text") -> Iterator:
    """One document per text file (in `Continued` pieces when large), per jsonl line, per columnar row.
    `kind` "text": strings from `field`; "messages": chat conversations (lists of {role, content})."""
    for path in files:
        if path.suffix.lower() in COLUMNAR_SUFFIXES:
            for value in iter_column(path, field, kind):
                yield _checked(value, f"{path} (a row)", kind, field) if kind == "messages" else value
        elif is_jsonl(path):
            with open_jsonl(path) as f:
                for lineno, line in _lines(f, path):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{lineno} is not valid JSON") from None
                    flag = "--messages-field" if kind == "messages" else "--text-field"
                    if not isinstance(record, dict) or field not in record:
                        raise UserError(f"{path}:{lineno} has no field {field!r}: set {flag}")
                    yield _checked(record[field], f"{path}:{lineno}", kind, field)
        elif kind == "messages":
            raise UserError(f"{path} is plain text, not chat records: chat data is jsonl, parquet or Arrow with a "
                            f"messages field")
        else:
            yield from _text_pieces(path)


def _checked(value, where: str, kind: str, field: str):
    """The record's value, if it is what `kind` reads; `where` names the record (path:line, or a row)."""
    if kind == "text":
        if not isinstance(value, str):
            raise UserError(f"{where}: field {field!r} holds a {type(value).__name__}, not text: set --text-field")
        return value
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in value):
        raise UserError(f"{where}: field {field!r} is not a list of {{role, content}} messages: set "
                        f"--messages-field, or drop --messages-field for plain text")
    return value


def _text_pieces(path: Path) -> Iterator[str]:
    try:
        if path.stat().st_size <= 4 * PIECE_CHARS:
            yield path.read_text(encoding="utf-8")
            return
        with open(path, encoding="utf-8") as f:
            carry, first = "", True
            while chunk := f.read(PIECE_CHARS):
                carry += chunk
                ends = [m.end() for m in PIECE_END.finditer(carry, max(0, len(carry) - PIECE_CHARS))]
                if ends and ends[-1] < len(carry):
                    yield carry[:ends[-1]] if first else Continued(carry[:ends[-1]])
                    carry, first = carry[ends[-1]:], False
            if carry:
                yield carry if first else Continued(carry)
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


def tokenize_documents(docs: Iterator, tokenizer, batch: int = 64, learn_all: bool = False) -> Iterator[Piece]:
    """Token ids of each non-empty document, with the BOS its tokenizer adds (but no EOS: packing adds it).
    A conversation is rendered with the tokenizer's chat template; its pieces say which ids are learned."""
    bos = starts_with_bos(tokenizer)
    pending: list[str] = []

    def encoded():
        if not pending:
            return
        for text, ids in zip(pending, tokenizer(pending, add_special_tokens=False)["input_ids"]):
            continued = isinstance(text, Continued)
            yield Piece([bos, *ids] if bos is not None and not continued else ids, continued)

    for doc in docs:
        if isinstance(doc, list):
            yield from encoded()
            pending = []
            yield render_conversation(doc, tokenizer, learn_all)
            continue
        if doc.strip():
            pending.append(doc)
        if len(pending) == batch:
            yield from encoded()
            pending = []
    yield from encoded()
