"""The checkpoints of a training run: `RUN/checkpoint-<step>/` holding a saved model in `model/` or directly."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hbt_accel.data import DataError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(folder: str | os.PathLike) -> int:
    match = CHECKPOINT_PATTERN.match(Path(folder).name)
    if match is None:
        raise DataError(f"{folder}: not a checkpoint folder (expected checkpoint-<step>)")
    return int(match.group(1))


def find_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-<step>` folders of a run, by step; temp folders of a save in progress are not matched."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    found = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=checkpoint_step)


def model_folder(checkpoint: str | os.PathLike) -> Path | None:
    """The folder holding the saved model (HF config.json): `checkpoint/model/` or `checkpoint/` itself."""
    checkpoint = Path(checkpoint)
    for candidate in (checkpoint / "model", checkpoint):
        if (candidate / "config.json").is_file():
            return candidate
    return None
