"""Parquet corpora, read a row group's batch at a time (only the text column), never the file whole."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from kdpipe.errors import UserError

PARQUET_SUFFIXES = {".parquet", ".pq"}
BATCH_ROWS = 1024


def iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    """The `text_field` column of one parquet file, in row order; nulls and empty strings skipped."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path} is parquet: pip install pyarrow (or kdpipe[parquet])") from None
    try:
        source = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path} is not a readable parquet file ({exc}): re-create it or leave it out of --data") \
            from None
    schema = source.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"{path} has no column {text_field!r} (it has: {', '.join(schema.names)}): set --text-field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {text_field!r} holds {kind}, not text: set --text-field")
    try:
        for batch in source.iter_batches(batch_size=BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path} cannot be read to the end ({exc}): re-create it or leave it out of --data") from None
