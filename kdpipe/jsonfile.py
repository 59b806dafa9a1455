"""JSON files written whole or not at all (a temporary name, then a rename), and read as input: a file
that is not JSON is one clear error, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdpipe.errors import UserError


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: Path) -> Any:
    """The file's content; None when there is no file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, OSError):
        raise UserError(f"{path} is damaged (not JSON): remove it, or start again with --overwrite") from None
