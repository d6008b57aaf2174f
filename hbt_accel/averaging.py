"""Uniform weight averaging of finished runs of one model (a "model soup", Wortsman et al., ICML 2022).

Runs of the same recipe with different seeds start from the same pretrained weights and stay in one basin, so the
mean of their weights is a model too, often better than each run alone. Everything is checked before any weights are
averaged: the same encoder settings (pooling, prefixes, lengths), the same tensors with the same shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hbt_accel.atomic import write_json
from hbt_accel.errors import ConfigError, DataError
from hbt_accel.modeling import SETTINGS_FILE, DualEncoder

SOURCES_FILE = "averaged_from.json"  # which runs the weights are the mean of


def check_runs(runs: list[str | os.PathLike]) -> list[Path]:
    """The run folders as paths; one line naming the folder and what is wrong, before any weights are read."""
    if len(runs) < 2:
        raise ConfigError(f"--runs: give two or more model folders to average (got {len(runs)})")
    folders = [Path(run) for run in runs]
    for folder in folders:
        if not (folder / SETTINGS_FILE).is_file() or not (folder / "config.json").is_file():
            raise DataError(f"{folder}: not a saved hbt_accel model (expected {SETTINGS_FILE} and config.json)")
    reference = json.loads((folders[0] / SETTINGS_FILE).read_text())
    for folder in folders[1:]:
        settings = json.loads((folder / SETTINGS_FILE).read_text())
        differing = sorted(k for k in reference.keys() | settings.keys() if reference.get(k) != settings.get(k))
        if differing:
            raise DataError(
                f"{folder}: encoder settings differ from {folders[0]} in {', '.join(differing)} (only runs of one "
                "model and recipe can be averaged)"
            )
    return folders


def average_models(runs: list[str | os.PathLike], output_dir: str | os.PathLike) -> Path:
    """Write the uniform average of the runs' weights to `output_dir` (a complete model folder, written atomically,
    with `averaged_from.json`); the first run provides the tokenizer and the settings."""
    folders = check_runs(runs)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ConfigError(f"--output_dir: {output_dir} is not empty (averaging writes a new model folder)")
    model = DualEncoder.from_pretrained(folders[0])
    total = {name: tensor.detach().clone().double() for name, tensor in model.state_dict().items()}
    for folder in folders[1:]:
        state = DualEncoder.from_pretrained(folder).state_dict()
        for name, tensor in total.items():
            other = state.get(name)
            if other is None or other.shape != tensor.shape:
                found = "missing" if other is None else f"shape {tuple(other.shape)}"
                expected = f"{tuple(tensor.shape)} in {folders[0]}"
                raise DataError(f"{folder}: tensor {name} is {found} here but {expected} (a different model)")
            tensor += other.double()
    reference = model.state_dict()
    model.load_state_dict({name: (tensor / len(folders)).to(reference[name].dtype) for name, tensor in total.items()})
    model.save_pretrained(output_dir)
    sources = {"runs": [str(folder.resolve()) for folder in folders], "weights": "uniform"}
    write_json(output_dir / SOURCES_FILE, sources)
    return output_dir
