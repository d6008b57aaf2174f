"""The errors a run can meet, and the points where the reliability tests inject faults.

ConfigError and DataError are the two a user can cause: entry points turn either into one line on stderr and exit
code 2. `fault_point` is where HBT_FAULT makes a real run meet a signal or a full disk.
"""

from __future__ import annotations

import difflib
import errno
import os
import signal


def did_you_mean(word: str, options: list[str]) -> str:
    """ "; did you mean 'x'?" for the closest of `options`, or "" when none is close: the tail of an error line."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def require_file(path, expected: str):
    """`path` if it is a file, else a DataError naming it and what belongs there."""
    from pathlib import Path

    if not Path(path).is_file():
        raise DataError(f"{path}: not found (expected {expected})")
    return path


class ConfigError(ValueError):
    """A bad key or value; the message is one line naming the field and what was expected."""


class DataError(ValueError):
    """Bad or missing data; the message names the file, field or language."""


class DiskFull(DataError):
    """No space left while saving: the message names the folder, the space needed and free, and the last good
    checkpoint; nothing half-written is left to be picked up later."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops at once; the message names the step, the value, the likely
    cause and the last good checkpoint. Entry points end it as one line with exit code 3."""


class PushFailed(RuntimeError):
    """The Hub upload after training failed; the run itself is complete on disk. The message says so, why, and the
    command that retries the upload alone. Entry points end it as one line with exit code 4."""


_passes: dict[str, int] = {}


def fault_point(point: str) -> None:
    """A named point where the reliability tests inject a fault (HBT_FAULT=point:n:action[:rank]: the n-th pass, on
    `rank` only if given, sends the signal `action` to this process or raises a full disk's ENOSPC). Points:
    `train_step` (between the backward and the optimizer step), `evaluation` (the start of a periodic evaluation),
    `evaluation_encode` (after each encoder batch of any evaluation) and `save_checkpoint` (after the optimizer
    states are written, before the model). Without HBT_FAULT this is one environment lookup: a signal or a full
    disk at an exact place, which timing from outside cannot give."""
    spec = os.environ.get("HBT_FAULT")
    if not spec:
        return
    where, count, action, *rank = spec.split(":")
    if where != point or (rank and rank[0] != os.environ.get("RANK", "0")):
        return
    _passes[point] = _passes.get(point, 0) + 1
    if _passes[point] != int(count):
        return
    if action == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), getattr(signal, action))
