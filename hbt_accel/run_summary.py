"""What a finished training run was: built once at the end of training, written as train_summary.json, and the
only source the model card is rendered from."""

from __future__ import annotations

from dataclasses import dataclass, field

from hbt_accel.config import HbtConfig

SUMMARY_FILE = "train_summary.json"  # written last by a finished run
CONFIG_FILE = "hbt_config.yaml"  # the run's whole config, written at its start


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


@dataclass
class TrainSummary:
    config: HbtConfig
    batch: BatchArithmetic
    steps: int = 0
    train_seconds: float | None = None  # periodic evaluation excluded
    eval_seconds: float = 0.0
    batch_counts: dict = field(default_factory=dict)  # {"X-X": n, "X-Y": m}
    corpora: list = field(default_factory=list)  # [{name, ids, pairs, languages}]
    train_languages: list = field(default_factory=list)
    device: str = ""
    history: list = field(default_factory=list)  # one record per logging step
    evaluations: list = field(default_factory=list)  # periodic scores by step
    parameters: dict = field(default_factory=dict)  # DualEncoder.parameter_counts() of the model as trained
    peak_rss_mb: float | None = None  # the main process's peak resident memory, evaluation included

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
        }
