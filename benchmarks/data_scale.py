"""Training data at scale: the Arrow store against today's in-memory corpus, on synthetic corpora users bring.

    python benchmarks/data_scale.py                          # 1M and 10M rows (Arrow), 1M rows in memory
    python benchmarks/data_scale.py --rows 1000000 --in_memory_rows 0 --skip_launch    # a quick look
    python benchmarks/data_scale.py --rows 45000000          # the paper's size, measured (~16 GB of JSONL)

The corpus is written as users bring it: JSON lines `{id, lang, query, positive}`, 7 languages per id, 10-word
queries, 40-word passages (random words from a fixed vocabulary, the id appended so no two texts repeat). Per row
count it measures, each in a fresh process:
- `convert_seconds`: the one-time conversion into the store (in memory: the load, paid by every run and rank);
- `reopen_seconds`: opening the converted store again (in memory: the same load again);
- `sampler_batches_per_s`: hybrid global batches of 32 (one epoch's set-up included in `sampler_setup_seconds`);
- `collate_rows_per_s`: rows through `PairCollator` with the texts fetched but not tokenised (the data layer's part
  of a step), and `collate_rows_per_s_tokenized` with the real XLM-R tokenizer of the default model;
- `first_step_seconds`, `peak_rss_mb_per_process`, `peak_rss_mb_after_data`: a 2-process `accelerate launch
  --config_file accelerate_configs/cpu_ddp.yaml` running 5 steps of the training loop with a tiny random 2-layer
  model on the real tokenizer (so the model does not hide the data layer); seconds from the launch to the end of
  the first step on the slower rank, the larger of the two ranks' peak RSS (VmHWM) at the end, and once the data is
  loaded; the median of 3 seeds (the steps' peak moves with the texts drawn). The same launch on MLQA-R is the
  baseline.

"in_memory" runs the same measurements on the code before the store (commit IN_MEMORY_COMMIT, checked out as a git
worktree under --work_dir), whose `load_training_corpus`, sampler and collator take the same arguments.
Results: docs/benchmarks/data_scale.json and a table printed (and pasted into docs/results.md by hand).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IN_MEMORY_COMMIT = "66a1b86"  # the last commit that kept every text as a Python object in every process
LANGUAGES = ("ar", "de", "en", "es", "hi", "vi", "zh")
LAUNCH_STEPS = 5
LAUNCH_SEEDS = (42, 1, 2)
SAMPLER_BATCHES = 300
COLLATE_BATCHES = 100
GLOBAL_BATCH = 32
# The workers (`--measure`) run on the code under measurement, and IN_MEMORY_COMMIT predates the package layout:
# where a module has moved since, they import it from whichever of its two places that code has.
MOVED_MODULES = {
    "hbt_accel.data.sampling": "hbt_accel.sampling",
    "hbt_accel.data.collate": "hbt_accel.batches",
    "hbt_accel.models.bundled_e5": "hbt_accel.embedded",
    "hbt_accel.training.run": "hbt_accel.train",
}


# =====================================================================================================================
# The corpus
# =====================================================================================================================
def write_corpus(path: Path, rows: int, seed: int = 0) -> Path:
    """`rows` JSONL rows, 7 languages per id (written once; re-used while its row count matches)."""
    import numpy as np

    marker = path.with_suffix(".rows")  # written last: the file is complete
    if path.is_file() and marker.is_file() and marker.read_text() == str(rows):
        return path
    marker.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    vocabulary = [
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(5000)
    ]
    queries = [" ".join(rng.choice(vocabulary, size=9)) for _ in range(4096)]
    passages = [" ".join(rng.choice(vocabulary, size=39)) for _ in range(4096)]
    with path.open("w", buffering=1 << 24) as handle:
        for row in range(rows):
            example, language = divmod(row, len(LANGUAGES))
            pick = (example * 7919 + language * 104729) % 4096
            handle.write(
                f'{{"id": "q{example}", "lang": "{LANGUAGES[language]}", "query": "{queries[pick]} {example}", '
                f'"positive": "{passages[pick]} {example}"}}\n'
            )
    marker.write_text(str(rows))
    return path


# =====================================================================================================================
# Measurements, each in its own process (`--measure`), API-compatible with the in-memory code
# =====================================================================================================================
def moved_module(name: str):
    """The module `name` of the code under measurement, or where IN_MEMORY_COMMIT kept it. Decided by the files of
    the `hbt_accel` imported (PYTHONPATH's), not by trying the import: an editable install of this checkout would
    supply a module the old code lacks."""
    import importlib

    import hbt_accel

    path = Path(hbt_accel.__file__).parent.joinpath(*name.split(".")[1:]).with_suffix(".py")
    return importlib.import_module(name if path.is_file() else MOVED_MODULES[name])


def memory_now_mb(wanted=("RssAnon", "RssFile", "RssShmem")) -> dict:
    """Fields of /proc/self/status in MB; by default resident memory now, split into anonymous (this process's own)
    and file-backed (mapped files: shared). Read here, not with hbt_accel's helper, which the in-memory code lacks."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in lines if line.startswith(wanted)}


def peak_rss_mb() -> float:
    return memory_now_mb(("VmHWM",))["VmHWM"]  # not ru_maxrss: Linux carries it across exec from the parent


def measure_load(source: str) -> dict:
    from hbt_accel.data import load_training_corpus

    started = time.perf_counter()
    corpus = load_training_corpus(source)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "pairs": corpus.num_pairs}


class TextsOnly:
    """Stands in for the encoder: the collator's output is the fetched texts, untokenised."""

    def tokenize(self, texts, kind):
        return list(texts)


class RealTokenizer:
    """The default model's tokenizer, at the default recipe's max lengths."""

    def __init__(self):
        from transformers import XLMRobertaTokenizerFast

        bundled_e5 = moved_module("hbt_accel.models.bundled_e5")
        self.tokenizer = XLMRobertaTokenizerFast(tokenizer_file=str(bundled_e5.reference_tokenizer_file()))

    def tokenize(self, texts, kind):
        length = 64 if kind == "query" else 96
        return self.tokenizer(list(texts), truncation=True, max_length=length, padding=True, return_tensors="pt")


def measure_loop(source: str) -> dict:
    """Sampler batches/s and collated rows/s on an already converted (or in-memory) corpus."""
    from hbt_accel.data import load_training_corpus

    PairCollator = moved_module("hbt_accel.data.collate").PairCollator
    HybridBatchSampler = moved_module("hbt_accel.data.sampling").HybridBatchSampler

    corpus = load_training_corpus(source)
    started = time.perf_counter()
    sampler = HybridBatchSampler(corpus, "hybrid", GLOBAL_BATCH, seed=1)
    batches = sampler.global_batches(0)
    first = next(batches)  # the epoch's permutation and eligibility lists are built here
    setup = time.perf_counter() - started
    started = time.perf_counter()
    drawn = [first, *itertools.islice(batches, SAMPLER_BATCHES - 1)]  # fewer where one epoch is shorter
    sampling = time.perf_counter() - started
    out = {"sampler_setup_seconds": setup, "sampler_batches_per_s": (len(drawn) - 1) / sampling}
    for key, encoder in (("collate_rows_per_s", TextsOnly()), ("collate_rows_per_s_tokenized", RealTokenizer())):
        collator = PairCollator([corpus], encoder, 0)
        started = time.perf_counter()
        collated = drawn[:COLLATE_BATCHES]
        for rows in collated:
            collator(rows)
        out[key] = len(collated) * GLOBAL_BATCH / (time.perf_counter() - started)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def launch_worker(source: str, model: str, out_dir: str, seed: int) -> None:
    """One rank of the 2-process launch: 5 training steps; writes its first-step time and peak RSS."""
    from hbt_accel.config import HbtConfig

    train = moved_module("hbt_accel.training.run")

    launched = float(os.environ["DATA_SCALE_LAUNCHED_AT"])
    first_step_end: list[float] = []
    step = train.train_step

    def timed_step(session, batch):
        loss = step(session, batch)
        if not first_step_end:
            first_step_end.append(time.time())
            stages["peak_rss_mb_after_first_step"] = peak_rss_mb()
        stages["peak_rss_mb_after_last_step"] = peak_rss_mb()
        return loss

    train.train_step = timed_step
    stages: dict[str, float] = {}
    load_data = train.load_data

    def measured_load_data(*args, **kwargs):
        stages["peak_rss_mb_before_data"] = peak_rss_mb()
        loaded = load_data(*args, **kwargs)
        stages["peak_rss_mb_after_data"] = peak_rss_mb()
        return loaded

    train.load_data = measured_load_data
    cfg = HbtConfig(
        model_name_or_path=model,
        train_data=[source],
        max_steps=LAUNCH_STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // 2,
        num_hard_negatives=0,
        eval_benchmark="",
        final_eval=False,
        mixed_precision="no",
        output_dir=str(Path(out_dir) / "run"),
        overwrite_output_dir=True,
        seed=seed,
    )
    train.train(cfg)
    rank = int(os.environ.get("RANK", 0))
    record = {"first_step_seconds": first_step_end[0] - launched, "peak_rss_mb": peak_rss_mb(), **memory_now_mb()}
    record |= stages
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


# =====================================================================================================================
# The driver
# =====================================================================================================================
def run_measure(kind: str, args: list[str], code: Path, cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code), HBT_CORPUS_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", kind, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=code)
    if result.returncode != 0:
        raise SystemExit(f"error: {kind} measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_launch(source: str, code: Path, cache: Path, work: Path, model: Path) -> dict:
    """The 2-process launch once per seed of LAUNCH_SEEDS: the step tensors' shapes follow the texts drawn, and
    with them the allocator's peak (+-100 MB between seeds on the same corpus), so the median is reported."""
    launches = [_launch_once(source, code, cache, work, model, seed) for seed in LAUNCH_SEEDS]
    by_seed = {seed: launch for seed, launch in zip(LAUNCH_SEEDS, launches)}
    return {
        "first_step_seconds": statistics.median(launch["first_step_seconds"] for launch in launches),
        "peak_rss_mb_per_process": statistics.median(launch["peak_rss_mb_per_process"] for launch in launches),
        "peak_rss_mb_after_data": statistics.median(launch["peak_rss_mb_after_data"] for launch in launches),
        "by_seed": by_seed,
    }


def _launch_once(source: str, code: Path, cache: Path, work: Path, model: Path, seed: int) -> dict:
    out_dir = work / "launch"
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    env = dict(
        os.environ,
        PYTHONPATH=str(code),
        HBT_CORPUS_CACHE=str(cache),
        OMP_NUM_THREADS="1",
        DATA_SCALE_LAUNCHED_AT=str(time.time()),
        TOKENIZERS_PARALLELISM="false",
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
        str(Path(__file__).resolve()), "--measure", "launch", "--source", source, "--model", str(model),
        "--out", str(out_dir), "--seed", str(seed),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=code)
    if result.returncode != 0:
        raise SystemExit(f"error: the 2-process launch failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return {
        "first_step_seconds": max(r["first_step_seconds"] for r in ranks),
        "peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in ranks),
        "peak_rss_mb_after_data": max(r["peak_rss_mb_after_data"] for r in ranks),
        "peak_rss_mb_by_rank": [round(r["peak_rss_mb"], 1) for r in ranks],
        "rss_at_end_mb_by_rank": [{key: round(r[key], 1) for key in ("RssAnon", "RssFile")} for r in ranks],
        "peak_rss_mb_by_stage_by_rank": [
            {key: round(r[key], 1) for key in r if key.startswith("peak_rss_mb_")} for r in ranks
        ],
    }


def tiny_model(folder: Path) -> Path:
    """A random 2-layer, 32-wide BERT with the real XLM-R tokenizer (the data layer, not the model, is measured)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import BertConfig, BertModel, XLMRobertaTokenizerFast

    from hbt_accel.models.bundled_e5 import reference_tokenizer_file

    tokenizer = XLMRobertaTokenizerFast(tokenizer_file=str(reference_tokenizer_file()))
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def in_memory_code(work: Path) -> Path:
    folder = work / f"in_memory_{IN_MEMORY_COMMIT}"
    if not folder.is_dir():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), IN_MEMORY_COMMIT], check=True
        )
    return folder


def measure_layer(kind: str, source: str, code: Path, work: Path, model: Path, launch: bool) -> dict:
    """Every figure of one (layer, corpus)."""
    import shutil

    cache = work / f"cache_{kind}"
    shutil.rmtree(cache, ignore_errors=True)
    converted = run_measure("load", ["--source", source], code, cache)
    reopened = run_measure("load", ["--source", source], code, cache)
    figures = {
        "convert_seconds": converted["seconds"],
        "convert_rows_per_s": converted["pairs"] / converted["seconds"],
        "convert_peak_rss_mb": converted["peak_rss_mb"],
        "reopen_seconds": reopened["seconds"],
        "reopen_peak_rss_mb": reopened["peak_rss_mb"],
    }
    figures |= run_measure("loop", ["--source", source], code, cache)
    figures.pop("peak_rss_mb", None)
    if launch:
        figures |= run_launch(source, code, cache, work, model)
    shutil.rmtree(cache, ignore_errors=True)
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in figures.items()}


def fit_45m(rows: list[dict]) -> dict:
    """Linear extrapolation to 45M rows from the two largest measured sizes (when 45M was not measured). The
    data layer's own share is the peak once the data is loaded (`peak_rss_mb_after_data`)."""
    (a, b) = sorted(rows, key=lambda r: r["rows"])[-2:]
    out = {"rows": 45_000_000, "extrapolated_from": [a["rows"], b["rows"]], "method": "linear in rows"}
    keys = ("convert_seconds", "reopen_seconds", "peak_rss_mb_per_process", "peak_rss_mb_after_data")
    for key in (*keys, "first_step_seconds"):
        if key in a and key in b:
            slope = (b[key] - a[key]) / (b["rows"] - a["rows"])
            out[key] = round(b[key] + slope * (45_000_000 - b["rows"]), 1)
    return out


def print_table(results: dict) -> None:
    keys = (
        "convert_seconds", "reopen_seconds", "first_step_seconds", "peak_rss_mb_per_process",
        "sampler_batches_per_s", "collate_rows_per_s",
    )  # fmt: skip
    print("| layer | rows | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for layer in ("arrow", "in_memory"):
        for row in results.get(layer, []):
            values = " | ".join(f"{row[key]:,.1f}" if key in row else "-" for key in keys)
            print(f"| {layer} | {row['rows']:,} | {values} |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--in_memory_rows", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--work_dir", default="/tmp/hbt_data_scale", help="corpora, caches, worktree (GBs)")
    parser.add_argument("--skip_launch", action="store_true", help="no 2-process launches")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks" / "data_scale.json"))
    # one measurement, in a child process
    parser.add_argument("--measure", choices=("load", "loop", "launch"), help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure == "launch":
        return launch_worker(args.source, args.model, args.out, args.seed)
    if args.measure:
        print(json.dumps(measure_load(args.source) if args.measure == "load" else measure_loop(args.source)))
        return
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "tiny_model")
    from hbt_accel.models.precision import machine_description

    results: dict = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d"), "arrow": [], "in_memory": []}
    if not args.skip_launch:
        results["mlqa_r_launch"] = {"arrow": run_launch("mlqa-r", REPO, work / "cache_mlqa", work, model)}
    for layer, sizes, code in (
        ("arrow", args.rows, REPO),
        ("in_memory", args.in_memory_rows, in_memory_code(work) if args.in_memory_rows else None),
    ):
        for rows in sizes:
            corpus = str(write_corpus(work / f"synthetic_{rows}.jsonl", rows))
            figures = measure_layer(layer, corpus, code, work, model, not args.skip_launch)
            results[layer].append({"rows": rows, **figures})
            print(f"{layer} {rows:,} rows: {json.dumps(figures)}", flush=True)
    if 45_000_000 not in args.rows and len(args.rows) >= 2:
        results["arrow_45m_extrapolated"] = fit_45m(results["arrow"])
    print_table(results)
    from hbt_accel.atomic import write_json

    write_json(args.output, results)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
