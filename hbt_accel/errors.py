"""The two errors a user can cause. Entry points turn either into one line on stderr and exit code 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad key or value; the message is one line naming the field and what was expected."""


class DataError(ValueError):
    """Bad or missing data; the message names the file, field or language."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops at once; the message names the step, the value, the likely
    cause and the last good checkpoint. Entry points end it as one line with exit code 3."""
