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


SEAL_FILE = "meta.json"


def seal_folder(folder: str | os.PathLike, format_name: str, meta: dict) -> Path:
    """Write `folder`/meta.json LAST, recording the format and the size of every other file in the folder: a
    folder without it, or whose files no longer have those sizes, is unfinished or damaged (`is_sealed`)."""
    folder = Path(folder)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != SEAL_FILE}
    return write_json(folder / SEAL_FILE, {"format": format_name, **meta, "files": files})


def is_sealed(folder: str | os.PathLike, format_name: str) -> bool:
    """Whether `seal_folder` finished this folder and every file still has its recorded size. Contents are not
    checksummed: reading gigabytes at every start would defeat a cache."""
    try:
        meta = json.loads((Path(folder) / SEAL_FILE).read_text(encoding="utf-8"))
        return meta.get("format") == format_name and all(
            (Path(folder) / name).stat().st_size == size for name, size in meta["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
