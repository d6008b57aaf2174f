"""Training throughput: hbt_accel against sentence-transformers, measured side by side in ONE run.

    python benchmarks/train_speed.py                       # fp32 + bf16, both tools, then hbt_accel's CPU settings
    python benchmarks/train_speed.py --steps 10 --skip_distributed --profile

Same model (the embedded multilingual-e5-small), same data (MLQA-R query/positive pairs, prefixed), same batch
(32 pairs, no hard negatives), same max length (128 tokens both sides), full fine-tuning (equal trainable
parameters: the word embeddings train too, unlike the default recipe). The peer is sentence-transformers' current
release: MultipleNegativesRankingLoss through SentenceTransformerTrainer. Both clip gradients at norm 1.0.
Per-step wall times are taken after `--warmup` steps; samples/s = batch / median step.

hbt_accel is timed two ways at each precision, both on the users' code path:
- in-process: `hbt_accel.training.run.setup(cfg)` then the library's `train_step` on the DataLoader's batches
  (collation included), in a fresh Python process with torch's default threads;
- the README's command: `accelerate launch recipes/train_hybrid.py ...` with the same flags, its per-step times
  read from its own log (train_summary.json), and the whole command's wall time (start-up and save included).
Then hbt_accel with the settings recommended for CPUs, and hbt_accel under 2-process DDP and DeepSpeed ZeRO-2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from report import invocation, machine_line, run_benchmark, write_section

from hbt_accel.atomic import write_atomic
from hbt_accel.run_record import read_summary

REPO = Path(__file__).resolve().parents[1]
BATCH = 32
MAX_LENGTH = 128


def mlqa_pairs(n: int) -> list[tuple[str, str]]:
    """The first n (query, positive) pairs of hbt_accel's own hybrid sampler over MLQA-R, e5 prefixes applied."""
    from hbt_accel.data import load_training_corpus
    from hbt_accel.data.sampling import HybridBatchSampler

    corpus = load_training_corpus("mlqa-r")
    sampler = HybridBatchSampler(corpus, "hybrid", BATCH, seed=0)
    pairs = []
    for rows in sampler:
        queries = corpus.queries([corpus.row(row.example_index, row.query_language) for row in rows])
        positives = corpus.positives([corpus.row(row.example_index, row.passage_language) for row in rows])
        pairs += [("query: " + query, "passage: " + positive) for query, positive in zip(queries, positives)]
        if len(pairs) >= n:
            break
    return pairs[:n]


def time_sentence_transformers(
    pairs, steps: int, bf16: bool, model_path: str = "", device: str = "cpu"
) -> list[float]:
    """Per-step seconds of SentenceTransformerTrainer + MultipleNegativesRankingLoss (the embedded model unless
    `model_path` names another)."""
    import datasets
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from hbt_accel.models.bundled_e5 import embedded_model_path

    model = SentenceTransformer(model_path or str(embedded_model_path()), device=device)
    model.max_seq_length = MAX_LENGTH
    dataset = datasets.Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    stamps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output_dir:
        args = SentenceTransformerTrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            learning_rate=2e-5,
            warmup_steps=0,
            bf16=bf16,
            use_cpu=device == "cpu",
            save_strategy="no",
            report_to="none",
            logging_steps=10_000,
            dataloader_drop_last=True,
            seed=0,
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            loss=MultipleNegativesRankingLoss(model),
            callbacks=[StepTimer()],
        )
        stamps.append(time.perf_counter())
        trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def in_fresh_process(task: str, *arguments: str):
    """The JSON result of `task` (a name in `TASKS`) run in a fresh `python` process: every timed row, the peer's
    too, gets a process of its own, and accelerate keeps one mixed precision per process."""
    command = [sys.executable, __file__, "--task", task, *arguments]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_quiet_env())
    if result.returncode != 0:
        raise RuntimeError(f"{task} failed ({' '.join(arguments)}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_peer(pairs_path: Path, steps: int, bf16: bool) -> dict:
    return in_fresh_process("time_peer", str(pairs_path), str(steps), str(int(bf16)))


def read_pairs(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(row["query"], row["positive"]) for row in rows]


def hbt_flags(pairs_path: Path, steps: int, output_dir: str, extra: list[str]) -> list[str]:
    """The recipe flags of every hbt_accel row: the same pairs, batch and lengths as the peer."""
    return [
        *("--train_data", str(pairs_path), "--max_steps", str(steps), "--output_dir", output_dir),
        *("--per_device_train_batch_size", str(BATCH), "--num_hard_negatives", "0", "--sampling", "xx"),
        *("--query_prefix", "", "--passage_prefix", ""),  # the pairs carry their prefixes already
        *("--query_max_length", str(MAX_LENGTH), "--passage_max_length", str(MAX_LENGTH)),
        *("--logging_steps", "1", "--final_eval", "false", "--eval_benchmark", ""),
        *("--learning_rate", "2e-5", "--warmup_ratio", "0", "--freeze_word_embeddings", "false"),
        *extra,
    ]


README_LAUNCHER = ["accelerate", "launch"]  # the README's first command, no accelerate config


def time_command(pairs_path: Path, steps: int, extra: list[str], launcher: list[str], env: dict) -> dict:
    """{seconds: per-step seconds from the run's own log, wall: seconds of the whole command, peak_rss_mb: the main
    training process's peak memory from its summary} of recipes/train_hybrid.py."""
    with tempfile.TemporaryDirectory() as output_dir:
        script = str(REPO / "recipes" / "train_hybrid.py")
        command = [*launcher, script, *hbt_flags(pairs_path, steps, output_dir, extra)]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"hbt_accel run failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
        summary = read_summary(output_dir)
    seconds = [BATCH / record["samples_per_second"] for record in summary["history"]]
    return {"seconds": seconds, "wall": wall, "peak_rss_mb": summary.get("peak_rss_mb")}


def time_in_process(pairs_path: Path, steps: int, extra: list[str]) -> dict:
    """Per-step seconds of the library's train_step (see `_time_steps_here`)."""
    return in_fresh_process("time_steps", str(pairs_path), str(steps), *extra)


@contextmanager
def library_steps(pairs_path: Path, steps: int, extra: list[str]):
    """A callable making one step of the library: the next batch of the session's DataLoader, then `train_step`, on
    a session built by `hbt_accel.training.run.setup` from the same flags as the timed rows (the users' code path)."""
    from hbt_accel.config import parse_config
    from hbt_accel.training.run import setup, train_step

    with tempfile.TemporaryDirectory() as output_dir:
        session = setup(parse_config(hbt_flags(pairs_path, steps, output_dir, extra)))
        batches = iter(session.loader)
        yield lambda: train_step(session, next(batches))


def _time_steps_here(pairs_path: Path, steps: int, extra: list[str]) -> list[float]:
    """The seconds of each of `steps` steps: next batch + train_step."""
    seconds = []
    with library_steps(pairs_path, steps, extra) as step:
        for _ in range(steps):
            started = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - started)
    return seconds


def profile_step(pairs_path: Path, precision: str) -> tuple[float, list[tuple[str, float]]]:
    total, ops = in_fresh_process("profile", str(pairs_path), precision)
    return total, [tuple(op) for op in ops]


def _profile_here(pairs_path: Path, precision: str, steps: int = 3, top: int = 12) -> list:
    """Where one step of hbt_accel at `precision` goes: [op seconds per step, the top ops by self CPU time]
    (torch.profiler), averaged over `steps` steps after one warm-up step of the library's own `train_step`."""
    from torch.profiler import ProfilerActivity, profile

    flags = ["--mixed_precision", "no" if precision == "fp32" else precision]
    with library_steps(pairs_path, steps + 1, flags) as step:
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / steps
    return [total, [(e.key, e.self_cpu_time_total / 1e6 / steps) for e in events[:top]]]


# What `in_fresh_process` runs: name -> function of the command-line arguments after the name.
TASKS = {
    "time_peer": lambda args: with_peak_memory(
        time_sentence_transformers(read_pairs(Path(args[0])), int(args[1]), args[2] == "1")
    ),
    "time_steps": lambda args: with_peak_memory(_time_steps_here(Path(args[0]), int(args[1]), args[2:])),
    "profile": lambda args: _profile_here(Path(args[0]), args[1]),
}


def with_peak_memory(seconds: list[float]) -> dict:
    """A fresh process's step times with its peak resident memory (VmHWM), for the table's memory column."""
    from hbt_accel.distributed import process_memory_mb

    return {"seconds": seconds, "peak_rss_mb": process_memory_mb().get("peak")}


def _quiet_env() -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false")


def write_pairs(pairs, path: Path) -> None:
    """The same pairs as JSONL for hbt_accel; one language per id keeps the sampler's order = the file's pairs."""
    with path.open("w") as handle:
        for index, (query, positive) in enumerate(pairs):
            handle.write(json.dumps({"id": str(index), "lang": "en", "query": query, "positive": positive}) + "\n")


def steady(seconds: list[float], warmup: int) -> float:
    return statistics.median(seconds[warmup:])


def row(name: str, timed: dict, warmup: int, peer: float | None) -> tuple:
    """(setup, seconds per step, the peer's seconds per step at the same precision or None, peak memory MB)."""
    return name, steady(timed["seconds"], warmup), peer, timed.get("peak_rss_mb")


def measure(pairs_path: Path, args) -> list[tuple]:
    """A `row` for every setup."""
    rows, steps, warmup = [], args.steps, args.warmup
    for precision in ("fp32", "bf16"):
        flags = ["--mixed_precision", "no" if precision == "fp32" else "bf16"]
        rows.append(row(f"sentence-transformers, {precision}", time_peer(pairs_path, steps, precision == "bf16"),
                        warmup, None))  # fmt: skip
        peer = rows[-1][1]
        in_process = time_in_process(pairs_path, steps, flags)
        rows.append(row(f"hbt_accel, {precision}, in-process train_step", in_process, warmup, peer))
        launched = time_command(pairs_path, steps, flags, README_LAUNCHER, _quiet_env())
        wall = f"{launched['wall']:.0f} s for {steps} steps"
        name = f"hbt_accel, {precision}, the README's `accelerate launch` command ({wall})"
        rows.append(row(name, launched, warmup, peer))
    peer_fp32, peer_bf16 = rows[0][1], rows[3][1]
    speed_paths_off = ["--cpu_training_attention", "false", "--sparse_embedding_gradient", "false"]
    variants = [
        ("hbt_accel, bf16, padded rows in 4 length buckets (pack_sequences off)", ["--pack_sequences", "false"]),
        ("hbt_accel, bf16, padded rows (no padding savings)", ["--pack_sequences", "false", "--length_buckets", "1"]),
        ("hbt_accel, bf16, CPU speed paths off (sdpa attention, dense embedding gradient)", speed_paths_off),
        ("hbt_accel, bf16 + frozen word embeddings (the default recipe)", ["--freeze_word_embeddings", "true"]),
    ]
    for name, flags in variants:
        rows.append(
            row(name, time_in_process(pairs_path, steps, ["--mixed_precision", "bf16", *flags]), warmup, peer_bf16)
        )
    if not args.skip_distributed:
        for name, config in (("DDP 2 processes", "cpu_ddp.yaml"), ("ZeRO-2 2 processes", "deepspeed_zero2.yaml")):
            launcher = ["accelerate", "launch", "--config_file", str(REPO / "accelerate_configs" / config)]
            # global batch 32 = 16 per process, so the work per step equals the single-process runs
            flags = ["--mixed_precision", "no", "--per_device_train_batch_size", str(BATCH // 2)]
            launched = time_command(pairs_path, steps, flags, launcher, _quiet_env())
            rows.append(row(f"hbt_accel, fp32, {name}", launched, warmup, peer_fp32))
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--task":
        print(json.dumps(TASKS[sys.argv[2]](sys.argv[3:])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip_distributed", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="also break a bf16 and an fp32 step down by op (torch.profiler)"
    )
    parser.add_argument("--docs_dir", default=str(REPO / "docs"), help="write the table here ('' = print only)")
    args = parser.parse_args()

    import torch

    pairs = mlqa_pairs(BATCH * args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        pairs_path = Path(tmp) / "pairs.jsonl"
        write_pairs(pairs, pairs_path)
        rows = measure(pairs_path, args)
        profiles = {precision: profile_step(pairs_path, precision) for precision in ("bf16", "fp32") if args.profile}
    for precision, (_, ops) in profiles.items():
        for name, seconds in ops:
            print(f"profile {precision}: {name:50s} {seconds:.3f} s/step")
    setup = (
        f"{machine_line()}; torch {torch.__version__}, batch {BATCH} pairs, max length {MAX_LENGTH}, "
        f"{args.steps} steps (median after {args.warmup})"
    )
    table = ["| setup | s/step | samples/s | vs peer | peak memory MB |", "|---|---|---|---|---|"]
    print(f"\n{setup}")
    for name, seconds, peer, peak in rows:
        ratio = f"{peer / seconds:.2f}x" if peer else ""
        memory = f"{peak:,.0f}" if peak else ""
        print(f"{name:90s} {seconds:8.3f} s/step {BATCH / seconds:8.1f} samples/s {ratio:>7s} {memory:>8s} MB")
        table.append(f"| {name} | {seconds:.3f} | {BATCH / seconds:.1f} | {ratio} | {memory} |")
    if args.docs_dir:
        write_docs(Path(args.docs_dir), setup, rows, table, profiles)


def write_docs(docs: Path, setup: str, rows, table: list[str], profiles: dict) -> None:
    records = [
        {"setup": n, "seconds_per_step": s, "samples_per_second": BATCH / s, "peak_rss_mb": m} for n, s, _, m in rows
    ]
    write_atomic(docs / "train_speed.json", json.dumps({"setup": setup, "rows": records}, indent=2) + "\n")
    command = invocation()
    body = [
        "## Training speed against sentence-transformers",
        "",
        f"`{command.strip()}` on {time.strftime('%Y-%m-%d')}, {setup}. The peer is sentence-transformers "
        f"{_version('sentence-transformers')} (MultipleNegativesRankingLoss through SentenceTransformerTrainer). "
        "Ratios are the peer's seconds per step over ours at the same precision (the DDP and ZeRO-2 rows: "
        "against the peer's fp32). Every hbt_accel row trains all weights like the peer, except the one marked "
        "frozen word embeddings.",
        "",
        *table,
    ]
    for precision, (total, ops) in profiles.items():
        body += [
            "",
            f"Where a {precision} step of hbt_accel goes (`--profile`: torch.profiler over the library's "
            f"`train_step`, top ops by self CPU time, in seconds per step, of {total:.2f} s of op time per step):",
            "",
            "| op | s/step |",
            "|---|---|",
            *[f"| `{name}` | {seconds:.3f} |" for name, seconds in ops],
        ]
    write_section(docs / "results.md", "train_speed", "\n".join(body))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    run_benchmark(main)
