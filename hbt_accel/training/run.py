"""The hybrid-batch training run, callable from Python: `train(cfg) -> TrainResult` (training.session holds its state).

    train(cfg)
      setup(cfg)             accelerate's canonical order, one function per phase:
        start                  Accelerator, set_seed, checks that must fail before any work (Hub access, metric,
                               num_layers against the model's config)
        load_data              corpora (main process first), the global-batch sampler, the step budget
        build_model            DualEncoder (first num_layers layers, + LoRA, frozen word embeddings), collator,
                               DataLoader; its parameter counts logged and kept for the summary
        build_optimizer        AdamW (fused on CPU) or DeepSpeedCPUAdam; build_loss: InfoNCE or cached InfoNCE
        prepare                ONE accelerator.prepare(model, optimizer); the LR schedule on the prepared optimizer
        open_run_folder        output folder, resolved config, trackers, resume from a checkpoint
        start_negatives        hard_negative_mining (training.mining): mine with the starting weights, or load
                               the resumed step's
      run_loop(session)      train_step per micro-batch; logging; periodic checkpoint + evaluation; re-mining; all
                             it measures goes into session.progress (TrainingProgress), which every checkpoint saves
      finalize(session)      final model, full-grid evaluation, train_summary.json, model card, Hub push

The DataLoader is NOT passed to `prepare`: `HybridBatchSampler` already gives each rank its slice of a global batch
that every rank agreed on, which accelerate's re-sharding would break.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed

from hbt_accel.atomic import write_json
from hbt_accel.config import HbtConfig, check_resume_config, save_config
from hbt_accel.data import (
    CorpusStore,
    is_lareqa_name,
    load_training_corpus,
    resolve_data_dir,
)
from hbt_accel.data.collate import PairCollator, build_loader
from hbt_accel.data.sampling import HybridBatchSampler, PairBudget
from hbt_accel.distributed import (
    StopRequested,
    StopRequests,
    accelerator_state_is_set,
    all_ranks_agree,
    bound_onednn_kernel_cache,
    configure_cpu_threads,
    forget_accelerator_state,
    make_accelerator,
    process_memory_mb,
)
from hbt_accel.errors import ConfigError, TrainingDiverged, fault_point
from hbt_accel.evaluation.encoding import between_batches
from hbt_accel.evaluation.evaluator import EvaluationSpec, is_published, open_evaluator
from hbt_accel.evaluation.schema import check_selection_metric
from hbt_accel.models import cpu_attention
from hbt_accel.models.bundled_e5 import check_hub_model_reachable, check_model_name
from hbt_accel.models.dual_encoder import (
    DualEncoder,
    EncoderSettings,
    LoraSettings,
    check_num_layers,
    describe_parameters,
    stale_save_folders,
)
from hbt_accel.models.precision import choose_precision, cpu_description, device_capabilities, eval_choice
from hbt_accel.run_record import (
    CONFIG_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    BatchArithmetic,
    TrainSummary,
    checkpoint_name,
    code_version,
    find_checkpoints,
)
from hbt_accel.training.checkpoints import (
    TrainingProgress,
    latest_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_model,
    stale_staging_folders,
)
from hbt_accel.training.console import TrainingProgressBar, make_console
from hbt_accel.training.embedding_gradient import sparse_embedding_gradient
from hbt_accel.training.losses import CachedInfoNCELoss, InfoNCELoss, TrainingStep
from hbt_accel.training.mining import refresh_negatives, start_negatives
from hbt_accel.training.run_lock import folder_in_use, lock_run_folder
from hbt_accel.training.session import LoopClock, Session, StepPlan, TrainResult


def train(cfg: HbtConfig) -> TrainResult:
    """Train, save, evaluate; returns the summary, the final evaluation results and the output paths.

    A stop signal (`preemption_signals`, Ctrl-C) is agreed on by every rank at the next step boundary or encoder
    batch; they save checkpoint-<step> together and `StopRequested` ends the run (the CLI exits 75, or 130).
    accelerate's process-wide settings, when this call fixed them, are cleared at the end, so a next call in the same
    process may use another precision."""
    owns_accelerator_state = not accelerator_state_is_set()  # a caller's own Accelerator keeps its state
    session = None
    try:
        session = setup(cfg)
        with StopRequests(cfg.preemption_signals, session.accelerator.device) as stops, between_batches(stops.check):
            session.stops = stops
            try:
                run_loop(session)
                return finalize(session)
            except StopRequested as stop:
                save_for_resume(session, stop)
                raise
    finally:
        if session is not None:
            release_run_folder(session)
        if owns_accelerator_state:
            forget_accelerator_state()  # a second train(cfg) in this process may choose another precision


def save_for_resume(session: Session, stop: StopRequested) -> None:
    """Every rank saves the current step's checkpoint together (unless it was just saved); the main process's
    exception says where and how to resume."""
    started, step = time.perf_counter(), session.progress.global_step
    checkpoint = session.output_dir / checkpoint_name(step)
    if session.saved_step != step:
        checkpoint = save_checkpoint(
            session.accelerator, session.model, session.progress, session.output_dir, session.cfg.save_total_limit
        )
    if session.accelerator.is_main_process:
        resume = (
            "the same command as it is (--resume_from_checkpoint auto finds this checkpoint)"
            if session.cfg.resume_from_checkpoint == "auto"
            else "the same command with --resume_from_checkpoint latest"
        )
        stop.message = (
            f"{stop.describe()} at step {step} of {session.plan.max_steps}: saved {checkpoint} "
            f"({time.perf_counter() - started:.1f} s); resume: {resume}"
        )


main = train  # the recipes' entry point


def setup(cfg: HbtConfig) -> Session:
    """Everything before the first step, in accelerate's canonical order; the speed benchmark starts from here too."""
    # ---- 0. Accelerator, seed, and the checks that must fail before hours of work
    cfg = with_data_dir(cfg)
    cfg, accelerator, start_lines, resume = start(cfg)
    console = make_console(accelerator)
    for line in start_lines:
        console.print(line)
    if cfg.data_dir:
        console.print(f"LAReQA data from {cfg.data_dir}")
    for warning in cfg.warnings():
        console.print(f"warning: {warning}")
    # ---- 1. Data
    corpora, sampler, evaluator = load_data(cfg, accelerator, console)
    plan = plan_steps(cfg, sampler, accelerator.num_processes)
    # ---- 2. Model, collator, DataLoader
    on_cpu = accelerator.device.type == "cpu"
    model = build_model(cfg, on_cpu)
    parameters = model.parameter_counts()  # before prepare: wrapped or partitioned models count differently
    console.print(describe_parameters(parameters))
    collator = build_collator(cfg, corpora, model, sampler)
    loader = build_loader(sampler, collator, cfg.dataloader_num_workers, cfg.seed)
    # ---- 3. Optimization
    single_cpu_process = on_cpu and accelerator.distributed_type == DistributedType.NO
    embedding_gradient = sparse_embedding_gradient(model, cfg.sparse_embedding_gradient, single_cpu_process)
    optimizer = build_optimizer(model, cfg, accelerator)
    loss_fn = build_loss(cfg)
    # ---- 4. ONE prepare
    model, optimizer, scheduler = prepare(accelerator, model, optimizer, cfg, plan.max_steps)
    session = Session(cfg, accelerator, console, corpora, sampler, loader, model, optimizer, scheduler, loss_fn, plan,
                      parameters, code_version(), embedding_gradient=embedding_gradient,
                      evaluator=evaluator)  # fmt: skip
    try:
        # ---- 5. The run folder, and resume
        open_run_folder(session, resume)
        # ---- 6. Hard negatives mined with the model (docs/beyond_paper.md)
        start_negatives(session)
    except BaseException:
        release_run_folder(session)  # `train` never gets the session: free the folder for the next try here
        raise
    session.model.train()
    return session


def release_run_folder(session: Session) -> None:
    """Give up the run folder's lock now, not when a traceback that holds the session is collected."""
    if session.run_lock is not None:
        session.run_lock.release()


# ==================================================================================================================
# Phases of setup
# ==================================================================================================================
def with_data_dir(cfg: HbtConfig) -> HbtConfig:
    """The config with `data_dir` set to the LAReQA folder actually used (looked up when the recipe leaves it empty
    and reads LAReQA data), so the log and the saved hbt_config.yaml say where the data came from."""
    lareqa = [cfg.eval_benchmark, *cfg.train_data]
    if cfg.data_dir or not any(is_lareqa_name(source) for source in lareqa):
        return cfg
    return dataclasses.replace(cfg, data_dir=str(resolve_data_dir()))


def start(cfg: HbtConfig):
    """-> (the config with its precisions chosen, the accelerator, log lines (CPU threads and precisions, and why),
    the checkpoint to resume from with the incomplete ones skipped: `resolve_resume`)."""
    threads = configure_cpu_threads()  # before any work: accelerate launch would leave one core per process
    bound_onednn_kernel_cache()  # before the first bf16 kernel (the precision probe's)
    cfg, precision_lines = with_precision(cfg)  # after the threads: the bf16 probe runs on them
    accelerator = make_accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(cfg.output_dir),
    )
    set_seed(cfg.seed)
    check_output_dir(cfg)
    check_model_name(cfg.model_name_or_path)
    check_hub_model_reachable(cfg.model_name_or_path)  # a config's few kB now, not a traceback after the data
    resume = resolve_resume(cfg.resume_from_checkpoint, Path(cfg.output_dir))
    if resume[0] is not None:
        check_resume_config(cfg, resume[0].parent / CONFIG_FILE)
    refuse_if_in_use(
        accelerator, cfg.output_dir, folder_in_use(Path(cfg.output_dir)) if accelerator.is_main_process else None
    )
    if not is_published(cfg.eval_benchmark):  # a published benchmark's metrics are known once it is read
        check_selection_metric(cfg.metric_for_best_model)
    check_num_layers(cfg.model_name_or_path, cfg.num_layers)  # the model's config only, not its weights
    if cfg.push_to_hub:
        from hbt_accel.publishing.hub import check_hub_access

        check_hub_access(cfg)
    return cfg, accelerator, [threads, *precision_lines], resume


def refuse_if_in_use(accelerator, output_dir, in_use: str | None) -> None:
    """Every rank raises together when the main process found the run folder held by another run (`in_use`: its
    message there, None elsewhere and when free)."""
    if not all_ranks_agree(accelerator, in_use is None):
        raise ConfigError(in_use or f"output_dir: {output_dir} is in use by another run")


def with_precision(cfg: HbtConfig) -> tuple[HbtConfig, list[str]]:
    """The config with `auto` precisions replaced by what this device runs best (hbt_accel.models.precision), so the
    saved hbt_config.yaml and a resume say what was run; and the log lines that say why."""
    needs_probe = {cfg.mixed_precision, cfg.eval_precision} & {"auto", "bf16"}
    caps = device_capabilities(probe=bool(needs_probe))
    training = choose_precision(cfg.mixed_precision, caps)
    evaluation = eval_choice(cfg.eval_precision, caps)
    cfg = dataclasses.replace(cfg, mixed_precision=training.precision, eval_precision=evaluation.precision)
    return cfg, [f"training precision: {training.reason}", f"evaluation precision: {evaluation.reason}"]


def check_output_dir(cfg: HbtConfig) -> None:
    """A run never silently lands on another one: a finished or started run in output_dir needs resume or
    overwrite_output_dir; a file or an unwritable place fails now, not after training."""
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir: {output_dir} is a file, expected a folder")
    existing = next(p for p in [output_dir, *output_dir.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: cannot write to {existing} (for {output_dir})")
    summary = output_dir / SUMMARY_FILE
    resuming = cfg.resume_from_checkpoint and (cfg.resume_from_checkpoint != "auto" or find_checkpoints(output_dir))
    if resuming:  # `auto` without a checkpoint is a fresh start: the fresh-run checks below apply
        steps = json.loads(summary.read_text()).get("steps", 0) if summary.is_file() else 0
        if cfg.max_steps > 0 and steps >= cfg.max_steps:
            raise ConfigError(
                f"resume_from_checkpoint: the run in {output_dir} already finished ({steps} steps, {SUMMARY_FILE}); "
                "raise max_steps to train further"
            )
        return
    previous = [name for name in (SUMMARY_FILE, WEIGHTS_FILE) if (output_dir / name).exists()]
    previous += [p.name for p in find_checkpoints(output_dir)][-1:]
    if previous and not cfg.overwrite_output_dir:
        raise ConfigError(
            f"output_dir: {output_dir} already holds a run ({', '.join(previous)}); choose another output_dir, "
            "resume it with --resume_from_checkpoint latest, or pass --overwrite_output_dir true"
        )


def load_data(cfg: HbtConfig, accelerator, console) -> tuple[list[CorpusStore], HybridBatchSampler, object]:
    """The training corpora, the sampler, and the evaluator (its benchmark read now: a bad file fails before
    training, not at step 500 or after the last)."""
    # One process per machine converts a new source into the cache; the others wait, then every rank memory-maps
    # the same files (hbt_accel.data.cache).
    with accelerator.local_main_process_first():
        corpora = [
            load_training_corpus(
                source, cfg.data_dir, cfg.num_hard_negatives > 0, cfg.train_data_columns, cfg.data_cache_dir
            )
            for source in cfg.train_data
        ]
        evaluator = open_evaluator(evaluation_spec(cfg), cfg.metric_for_best_model) if cfg.eval_benchmark else None
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
        id_fraction=cfg.train_id_fraction,
        pair_budget=PairBudget(cfg.train_pairs, cfg.train_xy_ids) if cfg.train_pairs else None,
        en_en_language=cfg.en_en_language,
        answers_per_query=cfg.answers_per_query,
    )
    return corpora, sampler, evaluator


def evaluation_spec(cfg: HbtConfig) -> EvaluationSpec:
    return EvaluationSpec(
        benchmark=cfg.eval_benchmark,
        languages=tuple(cfg.eval_languages),
        max_queries=cfg.eval_max_queries,
        final_max_queries=cfg.final_eval_max_queries,
        split=cfg.eval_split,
        corpus=cfg.eval_corpus,
        corpus_passages=cfg.eval_corpus_passages,
        data_dir=cfg.data_dir,
        cache_dir=cfg.data_cache_dir,
        bf16=cfg.eval_precision == "bf16",
    )


def plan_steps(cfg: HbtConfig, sampler: HybridBatchSampler, world_size: int) -> StepPlan:
    """The batch arithmetic, optimizer steps per epoch and optimizer steps of the run."""
    steps_per_epoch = max(1, sampler.batches_per_epoch // cfg.gradient_accumulation_steps)
    max_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    return StepPlan(BatchArithmetic.of(cfg, world_size, sampler.answers_per_row), steps_per_epoch, max_steps)


def build_model(cfg: HbtConfig, on_cpu: bool = False) -> DualEncoder:
    settings = EncoderSettings(
        pooling=cfg.pooling,
        normalize=cfg.normalize,
        query_prefix=cfg.query_prefix,
        passage_prefix=cfg.passage_prefix,
        query_max_length=cfg.query_max_length,
        passage_max_length=cfg.passage_max_length,
    )
    lora = None
    if cfg.lora:
        targets = cfg.lora_target_modules or None
        lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets)
    model = DualEncoder.from_pretrained(
        cfg.model_name_or_path,
        settings=settings,
        lora=lora,
        gradient_checkpointing=cfg.gradient_checkpointing,
        num_layers=cfg.num_layers,
        attn_implementation=cpu_attention.register() if on_cpu and cfg.cpu_training_attention else None,
    )
    model.length_buckets = cfg.length_buckets
    model.pack_sequences = cfg.pack_sequences and cpu_attention.can_pack(model.backbone.config)
    if on_cpu and cfg.cpu_training_attention:
        cpu_attention.use_cheap_dropout(model.backbone)
    if cfg.freeze_word_embeddings:
        model.backbone.get_input_embeddings().weight.requires_grad_(False)
    return model


def build_collator(cfg: HbtConfig, corpora, model: DualEncoder, sampler: HybridBatchSampler) -> PairCollator:
    """Passage ids in the batch whenever a passage can be the query's answer in another language: mined negatives
    (translations of another row's answer), multilingual rows, the multi-positive and alignment terms."""
    by_id = cfg.hard_negative_mining or cfg.multi_positive or cfg.passage_alignment_weight > 0
    answers = sampler.answers_per_row
    return PairCollator(corpora, model, cfg.num_hard_negatives, answers, with_passage_ids=by_id or answers > 1)


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


def build_loss(cfg: HbtConfig) -> TrainingStep:
    by_id = {"multi_positive": cfg.multi_positive, "alignment_weight": cfg.passage_alignment_weight}
    if cfg.cached_loss:
        return CachedInfoNCELoss(
            cfg.temperature, cfg.symmetric_loss, mini_batch_size=cfg.cache_mini_batch_size, **by_id
        )
    return InfoNCELoss(cfg.temperature, cfg.symmetric_loss, **by_id)


def prepare(accelerator, model, optimizer, cfg: HbtConfig, max_steps: int):
    """-> (prepared model, prepared optimizer, prepared LR scheduler)."""
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
    from transformers import get_scheduler  # here, not at the top: it imports peft (~2 s before a config error)

    ticks = 1 if accelerator.split_batches else accelerator.num_processes
    schedule = get_scheduler(
        cfg.lr_scheduler_type if cfg.lr_scheduler_type != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * max_steps) * ticks,
        num_training_steps=max_steps * ticks,
    )
    return model, optimizer, accelerator.prepare_scheduler(schedule)


def open_run_folder(session: Session, resume: tuple[Path | None, list[str]]) -> None:
    """Take the folder's lock, clear what a killed run left, write the config, resume. The resume point was
    resolved (and checked) in `start`: a bad one never touches the folder."""
    cfg, accelerator, output_dir = session.cfg, session.accelerator, session.output_dir
    resume, skipped = resume
    lost = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        try:  # before anything is deleted: two runs that passed the early check at once must not clean each other up
            session.run_lock = lock_run_folder(output_dir)
        except ConfigError as error:
            lost = str(error)
    refuse_if_in_use(accelerator, output_dir, lost)
    if accelerator.is_main_process:
        stale = stale_staging_folders(output_dir) + stale_save_folders(output_dir)
        if cfg.overwrite_output_dir and resume is None:
            stale += find_checkpoints(output_dir)  # the user asked: a new run must not resume these later
            if (output_dir / SUMMARY_FILE).exists():  # its "finished" mark: a stopped new run would pass for it
                stale.append(output_dir / SUMMARY_FILE)
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        if stale:
            session.console.print(f"removed what an earlier run left: {', '.join(p.name for p in stale)}")
        if skipped:
            session.console.print(f"skipped incomplete checkpoint(s): {'; '.join(skipped)}")
        save_config(cfg, output_dir / CONFIG_FILE)
    if cfg.report_to != "none":
        accelerator.init_trackers("hbt", config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})
    if resume is not None:
        session.resumed_from = resume
        accelerator.load_state(str(resume))  # model, optimizer, scheduler, RNG
        session.progress = TrainingProgress.load(resume)
        session.console.print(f"resumed from {resume} at step {session.progress.global_step}")
    session.sampler.set_position(session.progress.global_step * cfg.gradient_accumulation_steps)
    session.console.print(
        f"world size {accelerator.num_processes} | distributed {accelerator.distributed_type.value} | "
        f"mixed precision {accelerator.mixed_precision}\n{session.plan.batch.describe()}\n"
        f"sampling {cfg.sampling} (alpha {cfg.alpha}); {session.plan.steps_per_epoch} steps per epoch; "
        f"{session.plan.max_steps} steps"
    )


# ==================================================================================================================
# The loop
# ==================================================================================================================
def train_step(session: Session, batch: dict) -> torch.Tensor:
    """One micro-batch: the loss's forward + backward, then (at the end of an accumulation window) clip the
    gradients, step the optimizer and the schedule. Returns the micro-batch loss (detached, float32).

    A NaN/inf loss or gradient norm never reaches the weights: the step is skipped (up to `skip_nonfinite_steps`
    times) or the run stops with `TrainingDiverged`."""
    accelerator, model, cfg = session.accelerator, session.model, session.cfg
    with accelerator.accumulate(model):
        loss = session.loss_fn.training_step(model, batch, accelerator)
        fault_point("train_step")
        if accelerator.sync_gradients:
            if session.embedding_gradient is not None:
                session.embedding_gradient.densify()
            # max_norm inf when clipping is off: the norm is still measured (for the guard), the gradients unchanged
            norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
            if not _all_finite(accelerator, loss, norm):
                _skip_or_stop(session, loss, norm)
                session.optimizer.zero_grad()
                return loss.float()
        session.optimizer.step()
        session.scheduler.step()
        session.optimizer.zero_grad()
    return loss.float()


def _all_finite(accelerator, loss: torch.Tensor, norm) -> bool:
    """True when the loss and the gradient norm are finite on every rank (DeepSpeed gives no norm: loss only)."""
    values = [loss.detach().float().reshape(1)] + ([] if norm is None else [torch.as_tensor(norm).float().reshape(1)])
    finite = torch.isfinite(torch.cat(values)).all().float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite.to(accelerator.device), "sum") / accelerator.num_processes
    return bool(finite.item() == 1.0)


def _skip_or_stop(session: Session, loss: torch.Tensor, norm) -> None:
    cfg, step = session.cfg, session.progress.global_step + 1
    session.nonfinite_steps += 1
    what = f"loss {loss.item():.4g}" + ("" if norm is None else f", gradient norm {float(norm):.4g}")
    if session.nonfinite_steps <= cfg.skip_nonfinite_steps:
        session.console.print(
            f"step {step}: {what}: step skipped ({session.nonfinite_steps}/{cfg.skip_nonfinite_steps})"
        )
        return
    good = latest_checkpoint(session.output_dir)
    raise TrainingDiverged(
        f"step {step}: {what}: training diverged (learning_rate {cfg.learning_rate:g}, temperature "
        f"{cfg.temperature:g}: lower the learning rate or raise the temperature); nothing of this step was saved; "
        f"last good checkpoint: {good or 'none'}"
    )


def run_loop(session: Session) -> None:
    """Optimizer steps until max_steps; epochs advance the sampler. Periodic evaluation is not training time.
    Everything measured goes into `session.progress`, which every checkpoint saves."""
    progress = session.progress
    if session.cfg.eval_benchmark and session.cfg.eval_steps and progress.global_step == 0:
        add_curve_point(session)  # step 0
    bar = TrainingProgressBar(session.accelerator, session.plan.max_steps, progress.global_step)
    clock, losses = LoopClock(progress), []
    try:  # a stopped or failed run closes its bar too: the stop's message, not a live bar, ends the terminal
        while progress.global_step < session.plan.max_steps:
            for batch in session.loader:
                progress.batch_counts["X-X" if batch["monolingual"] else "X-Y"] += 1
                losses.append(train_step(session, batch))
                clock.window_samples += session.plan.batch.global_batch
                if not session.accelerator.sync_gradients:
                    continue
                progress.global_step += 1
                log_step(session, clock, bar, losses)
                clock.update_train_seconds()
                if session.stops is not None:
                    session.stops.check()
                checkpoint_and_evaluate(session)
                refresh_negatives(session)
                if progress.global_step >= session.plan.max_steps:
                    break
            session.sampler.set_epoch(session.sampler.epoch + 1)
    finally:
        bar.close()
    clock.update_train_seconds()


def log_step(session: Session, clock: LoopClock, bar: TrainingProgressBar, losses: list[torch.Tensor]) -> None:
    """The step's loss (mean over micro-batches and ranks), lr and samples/s to the bar; at a logging step the mean
    finite loss of the steps since the last one (`TrainingProgress.take_window_loss`) to the bar's line, the history
    and trackers."""
    progress, accelerator = session.progress, session.accelerator
    step, counts = progress.global_step, progress.batch_counts
    step_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
    losses.clear()
    progress.add_step_loss(step_loss)
    lr = session.scheduler.get_last_lr()[0]
    throughput = clock.throughput()
    log_now = step % session.cfg.logging_steps == 0 or step == session.plan.max_steps
    logged = progress.take_window_loss() if log_now else {"loss": step_loss}
    bar.update(step, loss=logged["loss"], lr=lr, throughput=throughput, counts=counts, log_line=log_now)
    if log_now:
        entry = {"step": step, **logged, "lr": lr, "samples_per_second": throughput, **counts}
        entry["rss_mb"] = round(process_memory_mb().get("rss", 0.0))  # memory must stay flat over the steps
        progress.history.append(entry)
        accelerator.log(
            {"train/loss": logged["loss"], "train/lr": lr, "train/samples_per_second": throughput}, step=step
        )
        clock.new_window()


def checkpoint_and_evaluate(session: Session) -> None:
    """At a save or evaluation step: evaluate (on the subset), then save the checkpoint with that score in its
    progress, then its reports. The last step is evaluated on the subset too (the curve's end, against which
    convergence is read) but saves no checkpoint: `finalize` saves the final model. Evaluation seconds go to
    progress.eval_seconds."""
    cfg, step, accelerator = session.cfg, session.progress.global_step, session.accelerator
    last = step == session.plan.max_steps
    periodic_save = cfg.save_steps and step % cfg.save_steps == 0 and not last
    periodic_eval = cfg.eval_benchmark and cfg.eval_steps and (step % cfg.eval_steps == 0 or last)
    if periodic_eval and last:
        evaluate_last_step(session)
        return
    if not (periodic_save or periodic_eval):
        return
    eval_started, results = time.perf_counter(), None
    if periodic_eval:
        results = run_evaluation(session, full=False)
        session.progress.record_evaluation(results, cfg.metric_for_best_model)
        accelerator.log(session.evaluator.logged(results), step=step)
    session.progress.eval_seconds += time.perf_counter() - eval_started
    progress, limit = session.progress, cfg.save_total_limit
    checkpoint = save_checkpoint(accelerator, session.model, progress, session.output_dir, limit)
    session.saved_step = step
    if results is not None:
        _report_periodic(session, results, checkpoint)
    if cfg.hub_push_checkpoints and cfg.push_to_hub:
        from hbt_accel.publishing.hub import hub_failure, push_folder

        try:
            push_folder(accelerator, cfg, checkpoint / "model", f"checkpoint {step}")
        except Exception as error:  # the Hub's trouble must not end the training; the final push sends it all
            session.console.print(
                f"warning: checkpoint {step} was not pushed ({hub_failure(error)}); training goes on"
            )


def add_curve_point(session: Session) -> dict:
    """A point of the metric-by-step curve that is no checkpoint, on the periodic subset, with no best-model record:
    step 0 (the model before any update) and the last step. Its seconds go to progress.eval_seconds."""
    started = time.perf_counter()
    results = run_evaluation(session, full=False)
    session.progress.add_point(results)
    session.progress.eval_seconds += time.perf_counter() - started
    return results


def evaluate_last_step(session: Session) -> None:
    results = add_curve_point(session)
    session.accelerator.log(session.evaluator.logged(results), step=session.progress.global_step)
    session.console.print(f"step {session.progress.global_step}: {session.evaluator.headline(results)} (last step)")


def run_evaluation(session: Session, full: bool, per_query: list | None = None) -> dict:
    """Score the model with the run's evaluator: the periodic subset (a capped corpus for a published benchmark)
    during training, the whole benchmark at the end. `per_query` receives the LAReQA per-query ranks."""
    if not full:
        fault_point("evaluation")
    encoder = session.accelerator.unwrap_model(session.model)
    was_training = encoder.training
    results = session.evaluator.score(
        encoder,
        session.accelerator,
        final=full,
        per_query=per_query,
        model_dir=session.output_dir,  # the final model is saved there before its evaluation
        scratch_dir=session.output_dir,
        step=session.progress.global_step,
    )
    encoder.train(was_training)
    return results


def _report_periodic(session: Session, results: dict, checkpoint: Path) -> None:
    from hbt_accel.evaluation import write_reports

    if session.accelerator.is_main_process:
        write_reports(results, checkpoint)
    session.console.print(
        f"step {session.progress.global_step}: {session.evaluator.headline(results)} "
        f"| best {session.progress.best_checkpoint}"
    )


# ==================================================================================================================
# Finalize
# ==================================================================================================================
def finalize(session: Session) -> TrainResult:
    """Save the final model, score it on the full grid, write the summary and the card, push, end."""
    cfg, accelerator, output_dir = session.cfg, session.accelerator, session.output_dir
    save_model(accelerator, session.model, output_dir)
    results, per_query = {}, []
    if cfg.eval_benchmark and cfg.final_eval:
        results = run_evaluation(session, full=True, per_query=per_query)
    summary = build_summary(session)
    if accelerator.is_main_process:
        from hbt_accel.evaluation import print_report, write_reports
        from hbt_accel.evaluation.grid import PER_QUERY_FILE
        from hbt_accel.publishing.model_card import write_model_card

        if results:
            write_reports(results, output_dir)
            if per_query:
                per_query[0].save(output_dir / PER_QUERY_FILE)  # for confidence intervals and paired tests later
            print_report(results)
        write_json(output_dir / SUMMARY_FILE, summary.to_json())
        write_model_card(output_dir, summary, results or None)
    accelerator.wait_for_everyone()
    try:
        if cfg.push_to_hub:
            from hbt_accel.publishing.hub import push_finished_run

            push_finished_run(accelerator, cfg, output_dir)
    finally:
        accelerator.end_training()
    return TrainResult(summary, results, output_dir, find_checkpoints(output_dir))


def build_summary(session: Session) -> TrainSummary:
    progress = session.progress
    corpora = [
        {
            "name": source,
            "ids": c.num_ids,
            "pairs": c.num_pairs,
            "languages": c.languages,
            "trained_on": session.sampler.training_set(index),
        }
        for index, (source, c) in enumerate(zip(session.cfg.train_data, session.corpora))
    ]
    device = (
        f"{session.accelerator.device.type} ({cpu_description()[0]}, {torch.get_num_threads()} threads per process)"
    )
    return TrainSummary(
        config=session.cfg,
        batch=session.plan.batch,
        steps=progress.global_step,
        train_seconds=progress.train_seconds,
        eval_seconds=progress.eval_seconds,
        batch_counts=progress.batch_counts,
        corpora=corpora,
        train_languages=sorted(session.sampler.target_share),
        device=device,
        history=progress.history,
        evaluations=progress.evaluations,
        parameters=session.parameters,
        peak_rss_mb=process_memory_mb().get("peak"),
        code=session.code,
    )
