"""What a run folder holds: every file name, the checkpoint naming, and the summary of a finished run.

    RUN/hbt_config.yaml            CONFIG_FILE: the run's whole config, written at its start
    RUN/model.safetensors ...      WEIGHTS_FILE and the rest of a loadable Hugging Face folder: the final model
    RUN/README.md                  MODEL_CARD_FILE (hbt_accel.publishing.model_card)
    RUN/train_summary.json         SUMMARY_FILE, written last by a finished run: `TrainSummary`, read by `read_summary`
    RUN/checkpoint-<step>/         `checkpoint_name`; saved, rotated and resumed by hbt_accel.training.checkpoints
    RUN/checkpoint-<step>/model/   MODEL_DIR: the checkpoint's encoder as a loadable folder (`model_folder`)

The summary is built once at the end of training and is the only source the model card is rendered from;
`BatchArithmetic` is the batch arithmetic start-up prints and the summary keeps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from hbt_accel.config import CHECKOUT, HbtConfig
from hbt_accel.errors import DataError

SUMMARY_FILE = "train_summary.json"
CONFIG_FILE = "hbt_config.yaml"
MODEL_CARD_FILE = "README.md"
WEIGHTS_FILE = "model.safetensors"
PREFIX = "checkpoint-"
PATTERN = re.compile(rf"^{PREFIX}(\d+)$")
MODEL_DIR = "model"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def is_checkpoint_name(name: str) -> bool:
    return PATTERN.match(name) is not None


def checkpoint_step(folder: str | os.PathLike) -> int:
    match = PATTERN.match(Path(folder).name)
    if match is None:
        raise DataError(f"{folder}: not a checkpoint folder (expected {PREFIX}<step>)")
    return int(match.group(1))


def find_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Finished `checkpoint-<step>` folders of a run, oldest first ([] when the run folder does not exist)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and is_checkpoint_name(p.name)]
    return sorted(found, key=checkpoint_step)


def model_folder(checkpoint: str | os.PathLike) -> Path | None:
    """The folder holding the saved model (HF config.json): `checkpoint/model/` or `checkpoint/` itself."""
    checkpoint = Path(checkpoint)
    for candidate in (checkpoint / MODEL_DIR, checkpoint):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def read_summary(run_dir: str | os.PathLike) -> dict:
    """A finished run's train_summary.json (`TrainSummary.to_json`); one DataError line when missing or damaged."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found (a finished run writes it last)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: damaged ({error}); train the run again or resume it") from None


@dataclass(frozen=True)
class BatchArithmetic:
    """The batch arithmetic said out loud: how many queries a step sees and how many negatives each query has."""

    per_device: int
    world_size: int
    hard_negatives_per_query: int = 0
    gradient_accumulation_steps: int = 1
    answers_per_query: int = 1  # multilingual sampling: a row's answer in up to this many languages

    @classmethod
    def of(cls, cfg: HbtConfig, world_size: int, answers_per_query: int = 1) -> BatchArithmetic:
        return cls(
            cfg.per_device_train_batch_size,
            world_size,
            cfg.num_hard_negatives,
            cfg.gradient_accumulation_steps,
            answers_per_query,
        )

    @property
    def global_batch(self) -> int:
        return self.per_device * self.world_size

    @property
    def in_batch_negatives(self) -> int:
        """The other rows' answers (up to: an id with fewer languages leaves empty slots)."""
        return (self.global_batch - 1) * self.answers_per_query

    @property
    def hard_negatives(self) -> int:
        return self.global_batch * self.hard_negatives_per_query

    @property
    def negatives_per_query(self) -> int:
        return self.in_batch_negatives + self.hard_negatives

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} queries = {self.per_device} per device x {self.world_size} "
            f"process(es); negatives per query {self.negatives_per_query} ({self.in_batch_negatives} in-batch + "
            f"{self.hard_negatives} hard, gathered across devices); gradient accumulation "
            f"{self.gradient_accumulation_steps} (does not enlarge the negative pool)"
            + (
                f"; each query's answer in up to {self.answers_per_query} languages"
                if self.answers_per_query > 1
                else ""
            )
        )


def code_version() -> str:
    """hbt-accel's version and, run from a git checkout, its commit: a run's numbers depend on the code as well as on
    its config and seed (on 2026-12-03 the packed rows' filler sequences changed the CPU dropout draws, so the same
    seed trains differently before and after)."""
    try:
        version = metadata.version("hbt-accel")
    except metadata.PackageNotFoundError:
        version = "unknown version"
    top_and_commit = (_git("rev-parse", "--show-toplevel", "--short=12", "HEAD") or "").splitlines()  # one a line
    if len(top_and_commit) != 2 or Path(top_and_commit[0]).resolve() != CHECKOUT.resolve():
        return version  # an installed package, not a checkout (or one inside another repository)
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", "hbt_accel", "recipes")
    edits = " with uncommitted changes to hbt_accel/ or recipes/" if changed else ""
    return f"{version}, git {top_and_commit[1]}{edits}"


def _git(*args: str) -> str | None:
    """`git -C CHECKOUT args...`'s output, or None where git is missing or fails (not a repository)."""
    try:
        done = subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@dataclass
class TrainSummary:
    config: HbtConfig
    batch: BatchArithmetic
    steps: int = 0
    train_seconds: float | None = None  # periodic evaluation excluded
    eval_seconds: float = 0.0
    batch_counts: dict = field(default_factory=dict)  # {"X-X": n, "X-Y": m}
    corpora: list = field(default_factory=list)  # [{name, ids, pairs, languages, trained_on: {ids, pairs, xy_ids}}]
    train_languages: list = field(default_factory=list)
    device: str = ""
    history: list = field(default_factory=list)  # one record per logging step
    evaluations: list = field(default_factory=list)  # periodic scores by step
    parameters: dict = field(default_factory=dict)  # DualEncoder.parameter_counts() of the model as trained
    peak_rss_mb: float | None = None  # the main process's peak resident memory, evaluation included
    code: str = ""  # `code_version()` when the run started: the code that trained it

    def to_json(self) -> dict:
        """The train_summary.json content (the config itself is saved beside it as hbt_config.yaml)."""
        return {
            "train_seconds": self.train_seconds,
            "steps": self.steps,
            "global_batch_size": self.batch.global_batch,
            "world_size": self.batch.world_size,
            "negatives_per_query": self.batch.negatives_per_query,
            "batch_counts": self.batch_counts,
            "corpora": self.corpora,
            "train_languages": self.train_languages,
            "device": self.device,
            "history": self.history,
            "evaluations": self.evaluations,
            "eval_seconds": self.eval_seconds,
            "parameters": self.parameters,
            "peak_rss_mb": self.peak_rss_mb,
            # as run: `auto` resolved by the device (accelerate's names: bf16, fp16, no = fp32)
            "precision": {"training": self.config.mixed_precision, "evaluation": self.config.eval_precision},
            "code": self.code,
        }
