"""The two errors a user can cause. Entry points turn either into one line on stderr and exit code 2."""

from __future__ import annotations

import difflib


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
