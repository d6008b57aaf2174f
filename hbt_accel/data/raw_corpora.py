"""mMARCO, MIRACL train, Mr. TyDi and MLDR train rows, read from their published raw files (being written)."""

from __future__ import annotations

RAW_KINDS = ("mmarco", "miracl", "mrtydi", "mldr")


def is_raw_spec(source: str) -> bool:
    return source.split(":", 1)[0] in RAW_KINDS and ":" in source


def load(source: str, cache_dir: str = ""):
    raise NotImplementedError(source)
