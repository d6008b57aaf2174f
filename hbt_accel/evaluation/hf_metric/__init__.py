"""`evaluate` metric modules shipped with the package; load them by path, e.g.

import evaluate
from hbt_accel.evaluation.hf_metric import lareqa_grid_path

grid = evaluate.load(lareqa_grid_path())
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


def lareqa_grid_path() -> str:
    """Path of the LAReQA grid metric script (`evaluate.load` accepts it, or its folder)."""
    return str(METRICS_DIR / "lareqa_grid" / "lareqa_grid.py")
