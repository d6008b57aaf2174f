"""Where stores live, and the one way a store is made: converted once into a temporary folder, then renamed.

A source is converted the first time it is used, into `<cache root>/<name>-<fingerprint>/`. The fingerprint is a
hash of what the store is built from (the source's files with their sizes and modification times, the options that
change its content, and the store format), so a changed file or option gives a new store and an unchanged one is
re-opened in well under a second. The cache root follows the Hugging Face convention: `data_cache_dir` if set, else
$HBT_CORPUS_CACHE, else `hbt_accel_corpora/` under the `datasets` cache ($HF_DATASETS_CACHE, else
$HF_HOME/datasets, else ~/.cache/huggingface/datasets).

Conversion writes `.<name>.partial-<host>-<pid>/` and renames it when complete (`meta.json` is its last file). A
killed conversion leaves a partial folder that is never opened (the next conversion on that host removes it); a
store whose files do not match the sizes in its meta.json is moved aside and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from hbt_accel.data.store import FORMAT, CorpusStore, StoreWriter, is_complete

CACHE_SUBFOLDER = "hbt_accel_corpora"


def cache_root(override: str | os.PathLike = "") -> Path:
    """The folder stores are kept in (module docstring)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("HBT_CORPUS_CACHE"):
        return Path(os.environ["HBT_CORPUS_CACHE"]).expanduser()
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser() / CACHE_SUBFOLDER
    hf_home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(hf_home).expanduser() / "datasets" / CACHE_SUBFOLDER


def file_fingerprint(path: Path) -> dict:
    """What identifies a source file without reading it: its resolved path, size and modification time (the
    `datasets` library fingerprints local files the same way)."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(description: dict) -> str:
    text = json.dumps({"format": FORMAT, **description}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_or_build(
    name: str, description: dict, write: Callable[[StoreWriter], None], cache_dir: str | os.PathLike = ""
) -> CorpusStore:
    """The store of a source: re-opened when its fingerprint is in the cache, else built by `write(writer)`.

    `description` is JSON-able and holds everything the content depends on (it also goes into meta.json)."""

    def build(partial: Path) -> None:
        writer = StoreWriter(partial, name)
        write(writer)
        writer.finish(description)

    return CorpusStore(build_once(cache_root(cache_dir), name, description, build, is_complete))


def build_once(
    root: Path, name: str, description: dict, build: Callable[[Path], None], complete: Callable[[Path], bool]
) -> Path:
    """`root/<name>-<fingerprint>`: returned as it is when `complete`, else built by `build(partial folder)` and
    renamed into place. The one way a cached folder is made (corpus stores, passage stores, embeddings)."""
    folder = root / f"{_slug(name)}-{fingerprint(description)}"
    if complete(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # half-written or damaged: keep it out of the way, then remove it
        stale = folder.with_name(f".{folder.name}.stale-{_owner()}")
        os.rename(folder, stale)
        shutil.rmtree(stale, ignore_errors=True)
    _remove_dead_partials(folder)
    partial = folder.with_name(f".{folder.name}.partial-{_owner()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        build(partial)
        try:
            os.rename(partial, folder)
        except OSError:  # another machine sharing this file system finished first: use theirs
            if not complete(folder):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_dead_partials(folder: Path) -> None:
    """Partial folders of this store left by killed conversions on this host (their process is gone)."""
    host = socket.gethostname()
    for partial in folder.parent.glob(f".{folder.name}.partial-{host}-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)
    for stale in folder.parent.glob(f".{folder.name}.stale-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "corpus"
