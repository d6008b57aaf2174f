"""The one way files are written: to a temporary name beside the target, then renamed over it.

A reader (or a crash) never sees half a JSON file, half a card or half a figure.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` via a temp file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, usual_mode())  # mkstemp makes 0600; a saved file should read like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, content: Any, sort_keys: bool = False) -> Path:
    """Indented, strict JSON (NaN and infinities written as null: strict parsers reject them) with a final newline,
    written atomically."""
    text = json.dumps(_strict(content), indent=2, ensure_ascii=False, sort_keys=sort_keys, allow_nan=False)
    return write_atomic(path, text + "\n")


def _strict(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def usual_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (temp files and folders get 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask
