"""Uniform weight averaging of finished runs of one model (a "model soup", Wortsman et al., ICML 2022).

Runs of the same recipe with different seeds start from the same pretrained weights and stay in one basin, so the
mean of their weights is a model too, often better than each run alone. Everything is checked before any weights are
averaged: the same encoder settings (pooling, prefixes, lengths), the same tensors with the same shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hbt_accel.atomic import write_json
from hbt_accel.errors import ConfigError, DataError
from hbt_accel.models.dual_encoder import SETTINGS_FILE, DualEncoder
from hbt_accel.run_record import CONFIG_FILE

SOURCES_FILE = "averaged_from.json"  # which runs the weights are the mean of


def check_runs(runs: list[str | os.PathLike]) -> list[Path]:
    """The run folders as paths; one line naming the folder and what is wrong, before any weights are read."""
    if len(runs) < 2:
        raise ConfigError(f"--runs: give two or more model folders to average (got {len(runs)})")
    folders = [Path(run) for run in runs]
    repeated = {str(f) for f in folders if sum(f.resolve() == g.resolve() for g in folders) > 1}
    if repeated:
        raise ConfigError(f"--runs: {', '.join(sorted(repeated))} is listed twice (each run once, for a uniform mean)")
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
    check_same_recipe(folders)
    return folders


# A soup averages seeds of one recipe: these may differ between its runs, nothing else.
MAY_DIFFER = {"seed", "output_dir"}


def check_same_recipe(folders: list[Path]) -> None:
    """The runs' training configs (hbt_config.yaml) agree in everything but MAY_DIFFER; a folder without one (a
    model not trained here) is checked by its encoder settings and tensors only."""
    import yaml

    configs = {f: yaml.safe_load((f / CONFIG_FILE).read_text()) or {} for f in folders if (f / CONFIG_FILE).is_file()}
    if len(configs) < 2:
        return
    (first, reference), *others = configs.items()
    for folder, config in others:
        differing = sorted(
            k for k in (reference.keys() | config.keys()) - MAY_DIFFER if reference.get(k) != config.get(k)
        )
        if differing:
            changes = ", ".join(f"{k} {reference.get(k)!r} -> {config.get(k)!r}" for k in differing)
            raise DataError(
                f"{folder}: trained with another recipe than {first} ({changes}); only runs differing in "
                f"{' and '.join(sorted(MAY_DIFFER))} can be averaged"
            )


def average_models(runs: list[str | os.PathLike], output_dir: str | os.PathLike) -> Path:
    """Write the uniform average of the runs' weights to `output_dir` (a complete model folder, written atomically,
    with `averaged_from.json`); the first run provides the tokenizer and the settings."""
    folders = check_runs(runs)
    output_dir = Path(output_dir)
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir())):
        raise ConfigError(f"--output_dir: {output_dir} is not an empty folder (averaging writes a new model folder)")
    model = DualEncoder.from_pretrained(folders[0])
    reference = model.state_dict()
    total = {name: tensor.detach().to(torch.float64, copy=True) for name, tensor in reference.items()}
    for folder in folders[1:]:
        state = DualEncoder.from_pretrained(folder, tokenizer=model.tokenizer).state_dict()  # only its weights count
        check_same_tensors(reference, state, folders[0], folder)
        for name, tensor in total.items():
            tensor += state[name].double()
    model.load_state_dict({name: (tensor / len(folders)).to(reference[name].dtype) for name, tensor in total.items()})
    model.save_pretrained(output_dir)
    sources = {"runs": [str(folder.resolve()) for folder in folders], "weights": "uniform"}
    write_json(output_dir / SOURCES_FILE, sources)
    return output_dir


def check_same_tensors(reference: dict, state: dict, reference_folder: Path, folder: Path) -> None:
    """The same tensor names and shapes both ways; integer buffers (ids, not weights) must be equal: no mean of ids."""
    for name in sorted(reference.keys() ^ state.keys()):
        where = "here" if name in state else f"in {reference_folder}"
        raise DataError(f"{folder}: tensor {name} is only {where} (a different model from {reference_folder})")
    for name, tensor in reference.items():
        other = state[name]
        if other.shape != tensor.shape:
            raise DataError(
                f"{folder}: tensor {name} has shape {tuple(other.shape)} here but {tuple(tensor.shape)} in "
                f"{reference_folder} (a different model)"
            )
        if not tensor.is_floating_point() and not torch.equal(tensor, other):
            raise DataError(f"{folder}: integer tensor {name} differs from {reference_folder} (cannot be averaged)")
