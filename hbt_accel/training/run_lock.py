"""One writer per run folder: a lock held for the whole run, naming its holder.

`filelock` takes an OS lock (flock) on RUN/.hbt_run.lock; the kernel drops it when the holding process dies, so a
lock left by a killed run is stale by construction and the next run takes it. RUN/.hbt_run.owner says who holds it
(host, pid, start time) for the message a second run gets. A file system without working flock (some NFS mounts)
gives no protection here: filelock's own documentation says so.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from hbt_accel.atomic import write_atomic
from hbt_accel.errors import ConfigError

LOCK_FILE = ".hbt_run.lock"
OWNER_FILE = ".hbt_run.owner"


def lock_run_folder(folder: Path, what: str = "output_dir") -> FileLock:
    """Take RUN's lock (the folder must exist) and record the owner; ConfigError naming the holder if it is taken.
    Keep the returned lock referenced for the run's life: it is released when it is garbage-collected."""
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(
            f"{what}: {folder} is in use by {holder(folder)}; wait for it or use another folder"
        ) from None
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_atomic(folder / OWNER_FILE, json.dumps(owner))
    return lock


def folder_in_use(folder: Path, what: str = "output_dir") -> str | None:
    """The message for a folder another live process holds, or None (taking and dropping the lock at once)."""
    if not (folder / LOCK_FILE).is_file():
        return None
    try:
        lock_run_folder(folder, what).release()
    except ConfigError as error:
        return str(error)
    return None


def holder(folder: Path) -> str:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        return f"a run of pid {owner['pid']} on {owner['host']} started {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another run (its owner file is unreadable)"
