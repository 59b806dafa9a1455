"""Columnar corpora, read a batch of rows at a time and only the one column asked for, never a file whole:
parquet files, Arrow IPC files (stream or file format), and `datasets.save_to_disk` directories (whose
`state.json` lists its Arrow shards, in order)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from kdpipe.errors import UserError

PARQUET_SUFFIXES = {".parquet", ".pq"}
ARROW_SUFFIXES = {".arrow", ".feather"}
BATCH_ROWS = 1024


def _pyarrow(path: Path):
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(f"{path} is columnar data: pip install pyarrow (or kdpipe[parquet])") from None
    return pa


def dataset_files(directory: Path) -> list[Path] | None:
    """The Arrow shards of a `datasets.save_to_disk` directory in its own order; None when it is not one.
    Names come from a file, so each must be a plain file name inside the directory."""
    if (directory / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in directory.iterdir() if (p / "state.json").is_file())
        raise UserError(f"{directory} is a DatasetDict with splits {', '.join(splits) or '(none)'}: pass one of "
                        f"them to --data, e.g. {directory / (splits[0] if splits else 'train')}")
    state = directory / "state.json"
    if not state.is_file():
        return None
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{state} is not a datasets state file: re-save the dataset with save_to_disk") from None
    files = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UserError(f"{state} names a data file outside its directory ({name!r}): re-save the dataset")
        if not (directory / name).is_file():
            raise UserError(f"{directory / name}, listed in {state.name}, is missing: re-save the dataset")
        files.append(directory / name)
    return files


def iter_column(path: Path, field: str, kind: str) -> Iterator:
    """The `field` column of one parquet or Arrow file, in row order; nulls and empty values skipped.
    `kind` is "text" (strings) or "messages" (lists of {role, content})."""
    pa = _pyarrow(path)
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            source = pa.parquet.ParquetFile(path)
            schema = source.schema_arrow
            batches = lambda: source.iter_batches(batch_size=BATCH_ROWS, columns=[field])  # noqa: E731
        else:
            reader = _open_arrow(pa, path)
            schema = reader.schema
            batches = lambda: (b.select([field]) for b in _arrow_batches(reader))  # noqa: E731
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path} is not a readable {_format(path)} file ({exc}): re-create it or leave it out of "
                        f"--data") from None
    flag = "--messages-field" if kind == "messages" else "--text-field"
    if field not in schema.names:
        raise UserError(f"{path} has no column {field!r} (it has: {', '.join(schema.names)}): set {flag}")
    column_type = schema.field(field).type
    if kind == "text" and not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{path}: column {field!r} holds {column_type}, not text: set {flag}")
    if kind == "messages" and not (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)):
        raise UserError(f"{path}: column {field!r} holds {column_type}, not a list of messages: set {flag}")
    try:
        for batch in batches():
            for value in batch.column(0).to_pylist():
                if value:
                    yield value
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path} cannot be read to the end ({exc}): re-create it or leave it out of --data") from None


def _open_arrow(pa, path: Path):
    """An Arrow stream (what `datasets` writes) or an Arrow file (Feather v2), read from disk a batch at a time."""
    try:
        return pa.ipc.open_stream(pa.OSFile(str(path)))
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.OSFile(str(path)))


def _arrow_batches(reader):
    if hasattr(reader, "num_record_batches"):  # the file format: random access
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


def _format(path: Path) -> str:
    return "parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "Arrow"
