"""JSON lines, read row by row with errors that name the file and line (.jsonl and .jsonl.gz)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from hbt_accel.errors import DataError


def iter_jsonl(path: str | Path) -> Iterator[tuple[dict, str]]:
    """(row, "file:line") for each non-blank line of a JSON-lines file (.jsonl or .jsonl.gz); bad JSON names the
    file and line."""
    import gzip

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:  # bytes, so a bad encoding is reported with its line
        for line_no, raw in enumerate(handle, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object per line")
            yield row, where
