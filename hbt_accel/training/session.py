"""The state of one training run, as `training.run` builds and the loop and its helpers use it.

`Session` is everything the loop needs after the one `prepare` (and a resume); `StepPlan` how big a step is and how
many there are; `LoopClock` training time without evaluation time; `TrainResult` what `train(cfg)` returns.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from hbt_accel.config import HbtConfig
from hbt_accel.data import CorpusStore
from hbt_accel.data.sampling import HybridBatchSampler
from hbt_accel.distributed import StopRequests
from hbt_accel.run_record import MODEL_CARD_FILE, SUMMARY_FILE, BatchArithmetic, TrainSummary
from hbt_accel.training.checkpoints import TrainingProgress
from hbt_accel.training.embedding_gradient import SparseEmbeddingGradient
from hbt_accel.training.losses import TrainingStep


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the run's summary, the final evaluation ({} when off) and where things were written."""

    summary: TrainSummary
    results: dict
    output_dir: Path
    checkpoints: list[Path]

    @property
    def summary_path(self) -> Path:
        return self.output_dir / SUMMARY_FILE

    @property
    def model_card_path(self) -> Path:
        return self.output_dir / MODEL_CARD_FILE


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How big a step is and how many there are."""

    batch: BatchArithmetic
    steps_per_epoch: int
    max_steps: int


@dataclasses.dataclass
class Session:
    """Everything the loop needs, as it stands after the one `prepare` (and a resume)."""

    cfg: HbtConfig
    accelerator: object
    console: object
    corpora: list[CorpusStore]
    sampler: HybridBatchSampler
    loader: torch.utils.data.DataLoader
    model: torch.nn.Module  # prepared: plain, DDP or a DeepSpeed engine
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: TrainingStep
    plan: StepPlan
    parameters: dict = dataclasses.field(default_factory=dict)  # DualEncoder.parameter_counts(), before prepare
    code: str = ""  # run_record.code_version() at start: the checkout may move while the run trains
    progress: TrainingProgress = dataclasses.field(default_factory=TrainingProgress)
    embedding_gradient: SparseEmbeddingGradient | None = None  # sparse_embedding_gradient, where it applies
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss or gradient (skip_nonfinite_steps)
    resumed_from: Path | None = None  # the checkpoint this run continues
    stops: StopRequests | None = None  # preemption signals and Ctrl-C, while the loop runs
    saved_step: int = -1  # the step of the newest checkpoint this process saved
    run_lock: object = None  # the run folder's lock (hbt_accel.training.run_lock), held while the session lives
    evaluator: object = None  # hbt_accel.evaluation.evaluator's, its benchmark read once; None = no eval_benchmark

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)


@dataclasses.dataclass
class LoopClock:
    """Training time without evaluation time, added to what the run had before a resume; and the samples/s window."""

    progress: TrainingProgress
    started: float = dataclasses.field(default_factory=time.perf_counter)
    window_start: float = dataclasses.field(default_factory=time.perf_counter)
    window_samples: int = 0

    def __post_init__(self):
        self.train_seconds_before, self.eval_seconds_before = self.progress.train_seconds, self.progress.eval_seconds

    def update_train_seconds(self) -> None:
        """progress.train_seconds as of now (called before every checkpoint and at the end)."""
        evaluating = self.progress.eval_seconds - self.eval_seconds_before
        self.progress.train_seconds = self.train_seconds_before + time.perf_counter() - self.started - evaluating

    def throughput(self) -> float:
        return self.window_samples / max(time.perf_counter() - self.window_start, 1e-9)

    def new_window(self) -> None:
        self.window_start, self.window_samples = time.perf_counter(), 0
