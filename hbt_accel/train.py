"""The hybrid-batch training loop, in accelerate's canonical order.

Accelerator -> set_seed -> data (main process first) -> model -> optimizer -> scheduler -> ONE prepare -> steps
inside `accelerator.accumulate` -> save_state / evaluate -> final model, reports, card, push -> end_training.

The DataLoader is NOT passed to `prepare`: `HybridBatchSampler` already gives each rank its slice of a global batch
that every rank agreed on, which accelerate's re-sharding would break.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from hbt_accel.config import HbtConfig, save_config
from hbt_accel.data import (
    DataError,
    ParallelCorpus,
    lareqa_files,
    lareqa_training_corpus,
    load_lareqa_benchmark,
    read_hf_corpus,
    read_jsonl_corpus,
)
from hbt_accel.distributed import make_accelerator
from hbt_accel.losses import CachedInfoNCELoss, InfoNCELoss
from hbt_accel.modeling import DualEncoder, EncoderSettings, LoraSettings
from hbt_accel.sampling import BatchRow, HybridBatchSampler, is_monolingual_batch

CHECKPOINT_PREFIX = "checkpoint-"


# ==================================================================================================================
# Data
# ==================================================================================================================
def load_training_corpus(source: str, cfg: HbtConfig) -> ParallelCorpus:
    """One `train_data` entry -> ParallelCorpus: a LAReQA name/folder, a .jsonl file, or a datasets id/path."""
    path = Path(source).expanduser()
    if source in ("mlqa-r", "xquad-r") or (path.is_dir() and any(path.glob("*.json"))):
        benchmark = load_lareqa_benchmark(source, data_dir=cfg.data_dir or None)
        return lareqa_training_corpus(benchmark, hard_negatives=cfg.num_hard_negatives > 0)
    if path.suffix == ".jsonl" and path.is_file():
        return read_jsonl_corpus(path)
    return read_hf_corpus(source, cfg.train_data_columns)


def passage_key(text: str) -> int:
    """A process-independent 64-bit id of a passage text (Python's hash() differs between ranks)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class _RowIdentity(torch.utils.data.Dataset):
    """The sampler yields whole `BatchRow`s; the collator looks their texts up, so the dataset passes them through."""

    def __getitem__(self, row: BatchRow) -> BatchRow:
        return row


class PairCollator:
    """Turns a rank's `BatchRow`s into tokenised queries and passages laid out as [positives; hard negatives]."""

    def __init__(self, corpora: list[ParallelCorpus], encoder: DualEncoder, num_hard_negatives: int):
        self.corpora, self.encoder, self.num_hard_negatives = corpora, encoder, num_hard_negatives
        self._passages_by_language: dict[tuple[int, str], list[str]] = {}

    def __call__(self, rows: list[BatchRow]) -> dict:
        queries, positives, negatives = [], [], []
        for row in rows:
            by_language = self.corpora[row.corpus_index].examples[row.example_id]
            queries.append(by_language[row.query_language].query)
            passage = by_language[row.passage_language]
            positives.append(passage.positive)
            negatives += self._hard_negatives(passage.negatives, row)
        passages = positives + negatives
        return {
            "query": self.encoder.tokenize(queries, "query"),
            "passage": self.encoder.tokenize(passages, "passage"),
            "passage_keys": torch.tensor([passage_key(text) for text in passages], dtype=torch.long),
            "monolingual": is_monolingual_batch(rows),
        }

    def _hard_negatives(self, available: tuple[str, ...], row: BatchRow) -> list[str]:
        """`num_hard_negatives` of the example's own negatives; random same-language passages when it has none."""
        if not self.num_hard_negatives:
            return []
        rng = np.random.default_rng(row.draw)
        if not available:  # e.g. a one-sentence LAReQA paragraph
            available = tuple(self._language_passages(row.corpus_index, row.passage_language))
        picks = rng.choice(
            len(available), size=self.num_hard_negatives, replace=len(available) < self.num_hard_negatives
        )
        return [available[k] for k in picks]

    def _language_passages(self, corpus_index: int, language: str) -> list[str]:
        key = (corpus_index, language)
        if key not in self._passages_by_language:
            corpus = self.corpora[corpus_index]
            self._passages_by_language[key] = [
                by_language[language].positive for by_language in corpus.examples.values() if language in by_language
            ]
        return self._passages_by_language[key]


# ==================================================================================================================
# Checkpoints
# ==================================================================================================================
EVALUATION_KEYS = ("mono_map", "cross_map", "multi_map", "rank_distance", "recall_at_1", "n_queries")


def evaluation_record(step: int, results: dict) -> dict:
    """One point of the metric-by-step curve kept in TrainingProgress.evaluations."""
    return {"step": step, **{key: results[key] for key in EVALUATION_KEYS}}


@dataclasses.dataclass
class TrainingProgress:
    """What save_state must carry besides model/optimizer/scheduler/RNG: where the run is and its best checkpoint."""

    global_step: int = 0
    best_metric: float = -math.inf
    best_checkpoint: str = ""
    evaluations: list = dataclasses.field(default_factory=list)  # periodic scores by step: the metric-by-step plot

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints (temp folders excluded), oldest first."""
    found = [
        p
        for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume(value: str, output_dir: Path) -> Path | None:
    if not value:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise DataError(f"resume_from_checkpoint: 'latest' but {output_dir} has no {CHECKPOINT_PREFIX}* folder")
        return checkpoints[-1]
    path = Path(value).expanduser()
    if not (path / "training_progress.json").is_file():
        raise DataError(f"resume_from_checkpoint: {path} is not a checkpoint folder (no training_progress.json)")
    return path


def save_model(accelerator, model, directory: Path) -> None:
    """Save the encoder (HF files + settings) from any setup; ZeRO-3 needs the state dict gathered on all ranks."""
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3: every rank must call it
    if accelerator.is_main_process:
        encoder = accelerator.unwrap_model(model)
        encoder.save_pretrained(directory, state_dict=state_dict)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, model, progress: TrainingProgress, cfg: HbtConfig, output_dir: Path) -> Path:
    """save_state + model into checkpoint-<step>, written to a temp folder and renamed, keeping the last K."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{progress.global_step}"
    tmp = output_dir / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    save_model(accelerator, model, tmp / "model")
    if accelerator.is_main_process:
        (tmp / "training_progress.json").write_text(json.dumps(progress.state_dict(), indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        rotate_checkpoints(output_dir, cfg.save_total_limit, keep=progress.best_checkpoint)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: Path, limit: int, keep: str = "") -> None:
    if limit <= 0:
        return
    checkpoints = [p for p in list_checkpoints(output_dir) if p.name != Path(keep).name]
    for old in checkpoints[: max(0, len(checkpoints) - limit)]:
        shutil.rmtree(old, ignore_errors=True)


# ==================================================================================================================
# Evaluation during training
# ==================================================================================================================
def primary_metric(results: dict, name: str) -> float:
    if name == "mean_map":
        return (results["mono_map"] + results["cross_map"] + results["multi_map"]) / 3
    if name not in results:
        raise DataError(f"metric_for_best_model: {name!r} is not an evaluation result (e.g. mean_map, multi_map)")
    value = results[name]
    return -value if name == "rank_distance" else value  # lower rank distance is better


def run_evaluation(accelerator, model, cfg: HbtConfig, full: bool, output_dir: Path | None) -> dict | None:
    """Score the model on the LAReQA grid (a subset during training, the full grid at the end)."""
    from hbt_accel.evaluation import evaluate_grid, print_report, write_reports

    benchmark = load_lareqa_benchmark(
        cfg.eval_benchmark, languages=None if full else (cfg.eval_languages or None), data_dir=cfg.data_dir or None
    )
    encoder = accelerator.unwrap_model(model)
    was_training = encoder.training
    results = evaluate_grid(
        encoder,
        benchmark,
        max_queries=None if full else (cfg.eval_max_queries or None),
        bf16=cfg.eval_bf16,
        accelerator=accelerator,
    )
    encoder.train(was_training)
    if accelerator.is_main_process and output_dir is not None:
        write_reports(results, output_dir)
        if full:
            print_report(results)
    return results


# ==================================================================================================================
# The loop
# ==================================================================================================================
def build_optimizer(model: torch.nn.Module, cfg: HbtConfig, accelerator) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorms; DeepSpeedCPUAdam when ZeRO offloads the optimizer."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(
                parameter
            )
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    plugin = accelerator.state.deepspeed_plugin
    offload = plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {})
    if offload and offload.get("device", "none") != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.learning_rate)
    # The fused kernel: identical updates, ~10x faster than the default foreach AdamW on CPU for e5-small's
    # 96M-parameter embedding matrix. DeepSpeed and non-float32 parameters keep the default implementation.
    fused = plugin is None and all(p.dtype == torch.float32 for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused or None)


def main(cfg: HbtConfig) -> dict:
    """Train, save, evaluate; returns the final evaluation results (empty when evaluation is off)."""
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(output_dir),
    )
    set_seed(cfg.seed)
    console = _console(accelerator)
    if cfg.push_to_hub:  # fail before hours of training, not after
        from hbt_accel.hub import check_hub_access

        check_hub_access(cfg)

    # ---- 1. data ----------------------------------------------------------------------------------------------------
    with accelerator.main_process_first():
        corpora = [load_training_corpus(source, cfg) for source in cfg.train_data]
        if cfg.eval_benchmark:
            lareqa_files(cfg.eval_benchmark, cfg.data_dir or None)  # a missing benchmark fails now, not at step 500
    for corpus in corpora:
        console.print(corpus.summary_table())
    sampler = HybridBatchSampler(
        corpora,
        cfg.sampling,
        cfg.per_device_train_batch_size,
        alpha=cfg.alpha,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        language_weights=cfg.language_weights or None,
        language_temperature=cfg.language_temperature,
        corpus_weights=[float(w) for w in cfg.train_data_weights] or None,
        languages=cfg.train_languages or None,
        en_en_language=cfg.en_en_language,
    )
    micro_steps_per_epoch = sampler.batches_per_epoch
    steps_per_epoch = max(1, micro_steps_per_epoch // cfg.gradient_accumulation_steps)
    max_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    # ---- 2. model ---------------------------------------------------------------------------------------------------
    settings = EncoderSettings(
        pooling=cfg.pooling,
        normalize=cfg.normalize,
        query_prefix=cfg.query_prefix,
        passage_prefix=cfg.passage_prefix,
        query_max_length=cfg.query_max_length,
        passage_max_length=cfg.passage_max_length,
    )
    lora = (
        LoraSettings(
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules or None,
        )
        if cfg.lora
        else None
    )
    model = DualEncoder.from_pretrained(
        cfg.model_name_or_path, settings=settings, lora=lora, gradient_checkpointing=cfg.gradient_checkpointing
    )
    model.length_buckets = cfg.length_buckets
    if cfg.freeze_word_embeddings:
        model.backbone.get_input_embeddings().weight.requires_grad_(False)
    collator = PairCollator(corpora, model, cfg.num_hard_negatives)
    # Its own generator: creating an iterator draws a seed, which must not consume the global RNG that dropout uses
    # (a resumed run creates its iterator at a different point than an uninterrupted one).
    loader = DataLoader(
        _RowIdentity(),
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=cfg.dataloader_num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    # ---- 3. optimizer, prepare, scheduler ---------------------------------------------------------------------------
    optimizer = build_optimizer(model, cfg, accelerator)
    if accelerator.state.deepspeed_plugin is not None:
        # DeepSpeed wants its micro-batch size; without a prepared DataLoader we must tell it.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
            cfg.per_device_train_batch_size
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is built on the PREPARED optimizer: ZeRO-3 regroups parameters, and a scheduler made for the
    # original groups fails on its first step. accelerate's prepared scheduler advances num_processes times per
    # optimizer step (it assumes per-process dataloader lengths); max_steps counts global optimizer steps, so the
    # schedule is laid out in those ticks, giving every world size the same learning rate at the same step.
    ticks = 1 if accelerator.split_batches else accelerator.num_processes
    scheduler = accelerator.prepare_scheduler(
        get_scheduler(
            cfg.lr_scheduler_type if cfg.lr_scheduler_type != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=int(cfg.warmup_ratio * max_steps) * ticks,
            num_training_steps=max_steps * ticks,
        )
    )
    loss_fn = (
        CachedInfoNCELoss(cfg.temperature, cfg.symmetric_loss, mini_batch_size=cfg.cache_mini_batch_size)
        if cfg.cached_loss
        else InfoNCELoss(cfg.temperature, cfg.symmetric_loss)
    )
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "hbt_config.yaml")
    if cfg.report_to != "none":
        accelerator.init_trackers("hbt", config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})

    resume = resolve_resume(cfg.resume_from_checkpoint, output_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        console.print(f"resumed from {resume} at step {progress.global_step}")
    sampler.set_position(progress.global_step * cfg.gradient_accumulation_steps)

    global_batch = cfg.per_device_train_batch_size * accelerator.num_processes
    negatives = global_batch * (1 + cfg.num_hard_negatives) - 1
    console.print(
        f"world size {accelerator.num_processes} | distributed {accelerator.distributed_type.value} | "
        f"mixed precision {accelerator.mixed_precision}\n"
        f"global batch {global_batch} queries = {cfg.per_device_train_batch_size} per device x "
        f"{accelerator.num_processes} processes; negatives per query {negatives} "
        f"({global_batch - 1} in-batch + {global_batch * cfg.num_hard_negatives} hard, gathered across devices); "
        f"gradient accumulation {cfg.gradient_accumulation_steps} (does not enlarge the negative pool)\n"
        f"sampling {cfg.sampling} (alpha {cfg.alpha}); {steps_per_epoch} steps per epoch; {max_steps} steps"
    )

    # ---- 4. train ---------------------------------------------------------------------------------------------------
    model.train()
    batch_counts = {"X-X": 0, "X-Y": 0}
    history: list[dict] = []
    eval_seconds = 0.0
    if cfg.eval_benchmark and cfg.eval_steps and progress.global_step == 0:
        # The step-0 point of the metric-by-step curve: the model before any update, on the same subset.
        eval_started = time.perf_counter()
        results = run_evaluation(accelerator, model, cfg, full=False, output_dir=None)
        progress.evaluations.append(evaluation_record(0, results))
        eval_seconds += time.perf_counter() - eval_started
    started, window_start, window_samples = time.perf_counter(), time.perf_counter(), 0
    bar = TrainingProgressBar(accelerator, max_steps, progress.global_step)
    running_loss = []
    while progress.global_step < max_steps:
        for batch in loader:
            batch_counts["X-X" if batch["monolingual"] else "X-Y"] += 1
            with accelerator.accumulate(model):
                if cfg.cached_loss:
                    loss = loss_fn.step(model, batch["query"], batch["passage"], batch["passage_keys"], accelerator)
                else:
                    query = model(batch["query"]["input_ids"], batch["query"]["attention_mask"])  # (B, d)
                    passage = model(batch["passage"]["input_ids"], batch["passage"]["attention_mask"])  # (B(1+k), d)
                    loss = loss_fn(query, passage, batch["passage_keys"])
                    accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running_loss.append(loss.detach().float())
            window_samples += global_batch
            if not accelerator.sync_gradients:
                continue
            progress.global_step += 1
            step = progress.global_step
            mean_loss = accelerator.reduce(torch.stack(running_loss).mean(), "mean").item()
            running_loss.clear()
            lr = scheduler.get_last_lr()[0]
            throughput = window_samples / max(time.perf_counter() - window_start, 1e-9)
            log_now = step % cfg.logging_steps == 0 or step == max_steps
            bar.update(step, loss=mean_loss, lr=lr, throughput=throughput, counts=batch_counts, log_line=log_now)
            if log_now:
                record = {"step": step, "loss": mean_loss, "lr": lr, "samples_per_second": throughput, **batch_counts}
                history.append(record)
                accelerator.log(
                    {"train/loss": mean_loss, "train/lr": lr, "train/samples_per_second": throughput}, step=step
                )
                window_start, window_samples = time.perf_counter(), 0
            periodic_save = cfg.save_steps and step % cfg.save_steps == 0 and step < max_steps
            periodic_eval = cfg.eval_benchmark and cfg.eval_steps and step % cfg.eval_steps == 0 and step < max_steps
            if periodic_save or periodic_eval:
                checkpoint = save_checkpoint(accelerator, model, progress, cfg, output_dir)
                if periodic_eval:
                    eval_started = time.perf_counter()
                    results = run_evaluation(accelerator, model, cfg, full=False, output_dir=checkpoint)
                    _record_evaluation(accelerator, progress, cfg, results, checkpoint, console)
                    accelerator.log(
                        {f"eval/{k}": results[k] for k in ("mono_map", "cross_map", "multi_map")}, step=step
                    )
                    eval_seconds += time.perf_counter() - eval_started
                if cfg.hub_push_checkpoints and cfg.push_to_hub:
                    from hbt_accel.hub import push_folder

                    push_folder(accelerator, cfg, checkpoint / "model", f"checkpoint {step}")
            if step >= max_steps:
                break
        sampler.set_epoch(sampler.epoch + 1)
    bar.close()
    train_seconds = time.perf_counter() - started - eval_seconds  # periodic evaluation is not training time

    # ---- 5. save, evaluate, card, push ------------------------------------------------------------------------------
    save_model(accelerator, model, output_dir)
    results: dict = {}
    if cfg.eval_benchmark and cfg.final_eval:
        results = run_evaluation(accelerator, model, cfg, full=True, output_dir=output_dir)
    if accelerator.is_main_process:
        summary = {
            "train_seconds": train_seconds,
            "steps": progress.global_step,
            "global_batch_size": global_batch,
            "world_size": accelerator.num_processes,
            "negatives_per_query": negatives,
            "batch_counts": batch_counts,
            "corpora": [
                {"name": source, "ids": len(c.examples), "pairs": c.num_pairs, "languages": c.languages}
                for source, c in zip(cfg.train_data, corpora)
            ],
            "train_languages": sorted(sampler.target_share),
            "device": f"{accelerator.device.type} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads per process)",
            "history": history,
            "evaluations": progress.evaluations,
            "eval_seconds": eval_seconds,
        }
        _write_json(output_dir / "train_summary.json", summary)
        from hbt_accel.export import write_model_card

        write_model_card(output_dir, cfg, summary, results or None)
    accelerator.wait_for_everyone()
    if cfg.push_to_hub:
        from hbt_accel.hub import push_folder

        push_folder(accelerator, cfg, output_dir, "final model")
    accelerator.end_training()
    return results


def _record_evaluation(
    accelerator, progress: TrainingProgress, cfg: HbtConfig, results: dict, checkpoint: Path, console
) -> None:
    """Add a periodic score to the progress (and the checkpoint's copy of it); track the best checkpoint."""
    progress.evaluations.append(evaluation_record(progress.global_step, results))
    value = primary_metric(results, cfg.metric_for_best_model)
    if value > progress.best_metric:
        progress.best_metric, progress.best_checkpoint = value, checkpoint.name
    if accelerator.is_main_process:  # the checkpoint was saved before this evaluation: its progress must include it
        (checkpoint / "training_progress.json").write_text(json.dumps(progress.state_dict(), indent=2))
    console.print(
        f"step {progress.global_step}: mono {results['mono_map']:.3f} cross {results['cross_map']:.3f} "
        f"multi {results['multi_map']:.3f} rank distance {results['rank_distance']:.1f} "
        f"| best {progress.best_checkpoint}"
    )


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, indent=2))
    tmp.replace(path)


def _console(accelerator):
    from rich.console import Console

    return Console(quiet=not accelerator.is_main_process)


class TrainingProgressBar:
    """A rich progress bar on the main process: loss, lr, samples/s and how many X-X / X-Y batches so far."""

    def __init__(self, accelerator, total: int, completed: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            disable=not accelerator.is_main_process,
        )
        self.task = self.progress.add_task("train", total=total, completed=completed, info="")
        self.progress.start()

    def update(self, step: int, loss: float, lr: float, throughput: float, counts: dict, log_line: bool) -> None:
        info = f"loss {loss:.4f} lr {lr:.2e} {throughput:.1f} samples/s X-X {counts['X-X']} X-Y {counts['X-Y']}"
        self.progress.update(self.task, completed=step, info=info)
        if log_line and not self.progress.console.is_terminal and not self.progress.disable:
            self.progress.console.print(f"step {step}: {info}")  # a bar is invisible in a log file

    def close(self) -> None:
        self.progress.stop()
