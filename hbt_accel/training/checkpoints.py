"""The checkpoints of a training run: where they live, how they are named, found, saved, rotated and resumed.

    RUN/checkpoint-<step>/              accelerate's save_state (model, optimizer, scheduler, RNG)
    RUN/checkpoint-<step>/model/        the encoder as a loadable Hugging Face + sentence-transformers folder
    RUN/checkpoint-<step>/training_progress.json   step, history, periodic evaluations, best checkpoint
    RUN/checkpoint-<step>/checkpoint_manifest.json every other file's size, written last: a complete checkpoint
    RUN/.tmp-checkpoint-<step>/         a save in progress; renamed to checkpoint-<step> when complete

The names come from hbt_accel.run_record, which owns the run folder's layout; this module saves, checks, rotates
and resumes.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
from pathlib import Path

from hbt_accel.atomic import write_json
from hbt_accel.distributed import all_ranks_agree
from hbt_accel.errors import DataError, DiskFull, fault_point
from hbt_accel.evaluation.schema import selection_score, summary_of
from hbt_accel.run_record import (
    MODEL_DIR,
    PREFIX,
    checkpoint_name,
    find_checkpoints,
)

PROGRESS_FILE = "training_progress.json"
MANIFEST_FILE = "checkpoint_manifest.json"
STAGING_PREFIX = ".tmp-"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest COMPLETE checkpoint (see `checkpoint_problem`), or None."""
    return latest_complete_checkpoint(run_dir)[0]


def latest_complete_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """-> (the newest checkpoint that passes `checkpoint_problem`, one line per newer checkpoint skipped)."""
    skipped = []
    for checkpoint in reversed(find_checkpoints(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append(f"{checkpoint.name} ({problem})")
    return None, skipped


def write_manifest(folder: Path) -> Path:
    """Record every file's size under `folder`; written LAST, so its presence means the save completed."""
    sizes = {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    return write_json(folder / MANIFEST_FILE, {"files": sizes})


def checkpoint_problem(checkpoint: Path) -> str | None:
    """None when the checkpoint is complete, else what is wrong with it (one phrase naming the file).

    A manifest's files must all be there with their sizes (a truncated optimizer.bin or model.safetensors shows as
    a size mismatch). Checkpoints from before manifests only need their progress file."""
    if not (checkpoint / PROGRESS_FILE).is_file():
        return f"no {PROGRESS_FILE}"
    manifest = checkpoint / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        sizes = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, UnicodeDecodeError):
        return f"{MANIFEST_FILE} is unreadable"
    for name, size in sizes.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were saved"
    return None


def stale_staging_folders(run_dir: Path) -> list[Path]:
    """Checkpoint saves a killed run left behind (RUN/.tmp-checkpoint-<step>)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name.startswith(STAGING_PREFIX + PREFIX) and p.is_dir())


def rotate_checkpoints(run_dir: Path, limit: int, keep: str = "") -> None:
    """Delete all but the newest `limit` checkpoints (0 = keep all); the one named `keep` is never deleted."""
    if limit <= 0:
        return
    checkpoints = [p for p in find_checkpoints(run_dir) if p.name != Path(keep).name]
    for old in checkpoints[: max(0, len(checkpoints) - limit)]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(value: str, output_dir: Path) -> tuple[Path | None, list[str]]:
    """`resume_from_checkpoint` -> (the checkpoint folder, the newer incomplete checkpoints skipped on the way):
    '' = none, 'latest' = the newest complete one in output_dir, 'auto' = 'latest' when output_dir has a checkpoint,
    else none (a requeued job's one command for its first start and every restart), else a path that must be
    complete."""
    if not value or (value == "auto" and not find_checkpoints(output_dir)):
        return None, []
    if value == "auto":
        value = "latest"
    if value == "latest":
        latest, skipped = latest_complete_checkpoint(output_dir)
        if latest is None:
            found = f"only incomplete ones: {'; '.join(skipped)}" if skipped else f"no {PREFIX}* folder"
            raise DataError(f"resume_from_checkpoint: 'latest' but {output_dir} has {found}")
        return latest, skipped
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"resume_from_checkpoint: {path} not found (expected a {PREFIX}<step> folder)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DataError(f"resume_from_checkpoint: {path} is not a complete checkpoint ({problem})")
    return path, []


# =====================================================================================================================
# What a checkpoint carries besides accelerate's state
# =====================================================================================================================
@dataclasses.dataclass
class TrainingProgress:
    """Where the run is, what it did so far and its best checkpoint; saved as training_progress.json in every
    checkpoint, so a resumed run's summary covers the whole run."""

    global_step: int = 0
    best_metric: float | None = None  # selection score of the best checkpoint (higher is better); None = none yet
    best_checkpoint: str = ""
    evaluations: list = dataclasses.field(default_factory=list)  # periodic scores by step: the metric-by-step plot
    history: list = dataclasses.field(default_factory=list)  # logged steps: loss, lr, samples/s, batch counts
    # the step losses since the last logged step: a logged loss is their mean, and a resumed run keeps its window
    loss_window: list = dataclasses.field(default_factory=list)
    batch_counts: dict = dataclasses.field(default_factory=lambda: {"X-X": 0, "X-Y": 0})  # micro-batches by kind
    train_seconds: float = 0.0  # training time so far, evaluation excluded
    eval_seconds: float = 0.0  # periodic evaluation time so far

    def add_step_loss(self, loss: float) -> None:
        """One step's loss into the logging window; a NaN/inf is kept as None (JSON would write it as null, which a
        resumed run could not add up)."""
        self.loss_window.append(loss if math.isfinite(loss) else None)

    def take_window_loss(self) -> dict:
        """The window's mean finite loss (as the HF Trainer logs it), how many steps it averages and, where any, how
        many were NaN/inf and left out; the window starts again empty."""
        finite = [loss for loss in self.loss_window if loss is not None]
        logged = {"loss": math.fsum(finite) / len(finite) if finite else math.nan, "steps_in_loss": len(finite)}
        if len(finite) < len(self.loss_window):
            logged["nonfinite_steps_in_window"] = len(self.loss_window) - len(finite)
        self.loss_window.clear()
        return logged

    def add_point(self, results: dict) -> None:
        """The metric-by-step curve's point at the current step."""
        self.evaluations.append({"step": self.global_step, **summary_of(results)})

    def record_evaluation(self, results: dict, metric_for_best_model: str) -> bool:
        """Add a periodic score at the current step; True when it makes this step's checkpoint the best."""
        self.add_point(results)
        score = selection_score(results, metric_for_best_model)
        if self.best_metric is not None and score <= self.best_metric:
            return False
        self.best_metric, self.best_checkpoint = score, checkpoint_name(self.global_step)
        return True

    def save(self, checkpoint: Path) -> Path:
        return write_json(checkpoint / PROGRESS_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, checkpoint: Path) -> TrainingProgress:
        state = json.loads((checkpoint / PROGRESS_FILE).read_text(encoding="utf-8"))
        if state.get("best_metric") in (float("-inf"), None):  # older runs wrote -Infinity for "none yet"
            state["best_metric"] = None
        return cls(**state)


# =====================================================================================================================
# Saving (every process calls these: ZeRO-3 gathers the weights collectively)
# =====================================================================================================================
def save_model(accelerator, model, directory: Path) -> None:
    """Save the encoder (HF files + settings) from any setup; ZeRO-3 needs the state dict gathered on all ranks."""
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3: every rank must call it
    if accelerator.is_main_process:
        encoder = accelerator.unwrap_model(model)
        encoder.save_pretrained(directory, state_dict=state_dict)
    accelerator.wait_for_everyone()


def disk_full(output_dir: Path, staging: Path, name: str, remove: bool = True) -> DiskFull:
    """Remove the half-written checkpoint (`remove`: the main process); the error names the folder, the space a
    checkpoint takes against what is free, and the checkpoint a resume would use."""
    previous = latest_checkpoint(output_dir)
    needed = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous else None
    if remove:
        shutil.rmtree(staging, ignore_errors=True)
    free = shutil.disk_usage(output_dir).free
    size = f"a checkpoint takes {needed / 2**20:,.0f} MB, " if needed else ""
    return DiskFull(
        f"{output_dir}: no space left on the device while saving {name} ({size}{free / 2**20:,.0f} MB free); the "
        f"half-written {name} was removed; last good checkpoint: {previous or 'none'}"
    )


def save_checkpoint(accelerator, model, progress: TrainingProgress, output_dir: Path, total_limit: int) -> Path:
    """save_state + model + progress into checkpoint-<step> via a temp folder and a rename; keep the last
    `total_limit` (and the best)."""
    final = output_dir / checkpoint_name(progress.global_step)
    tmp = output_dir / f"{STAGING_PREFIX}{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    full = False
    try:
        accelerator.save_state(str(tmp))
        fault_point("save_checkpoint")
        save_model(accelerator, model, tmp / MODEL_DIR)
        if accelerator.is_main_process:
            progress.save(tmp)
            write_manifest(tmp)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = True
    if not all_ranks_agree(accelerator, not full):  # every rank stops together: none waits on a collective
        raise disk_full(output_dir, tmp, final.name, remove=accelerator.is_main_process)
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        rotate_checkpoints(output_dir, total_limit, keep=progress.best_checkpoint)
    accelerator.wait_for_everyone()
    return final
