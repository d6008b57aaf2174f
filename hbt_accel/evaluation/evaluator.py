"""What a training run is scored on, read once per run: the LAReQA grid, or a benchmark in its published layout.

`open_evaluator(spec)` reads the benchmark's files at once (a bad file, language or metric fails before training)
and returns an evaluator with

    metrics                                     the keys `metric_for_best_model` may name
    score(encoder, accelerator, final, ...)     the periodic subset (final=False) or the whole benchmark
    headline(results)                           one log line

LAReQA (xquad-r, mlqa-r:validation, a folder of <lang>.json): periodic = `languages` x the first `max_queries` ids,
final = every language x the first `final_max_queries` ids (`grid.evaluate_grid`).

Published layouts (MIRACL, Mr. TyDi, MLDR, MKQA, BEIR folders: `published.load_task`): `languages` picks the tasks of
every evaluation. A periodic evaluation searches a CAPPED corpus: every passage judged for the scored queries plus a
fixed sample of the rest (seed 0), `corpus_passages` in all, so a point costs the same at any corpus size; its
embeddings go to a scratch folder removed afterwards (the weights change at every step). The final model searches
the FULL corpus, and its embeddings are cached under its weight files (`at_scale.model_key`), so
`recipes/evaluate.py --model RUN` on the same benchmark encodes nothing. Every result says which corpus it searched.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from hbt_accel.data import LanguagePool, RetrievalBenchmark, load_lareqa_benchmark
from hbt_accel.data.cache import fingerprint
from hbt_accel.errors import ConfigError
from hbt_accel.evaluation.at_scale import model_key, score_task, task_passages
from hbt_accel.evaluation.published import PASSAGE_SCHEMA, RetrievalTask, load_task, macro_average, recognised_kind
from hbt_accel.evaluation.schema import MAP_KEYS, MEAN_MAP, check_selection_metric
from hbt_accel.evaluation.sharded import SAMPLE_SEED, PassageStore, open_passages

CAPPED_BATCH_ROWS = 4096
CAPPED_SUFFIX = "-capped"  # the name of a capped passage store: its corpus's name + this
SCRATCH_FOLDER = ".periodic_embeddings"  # inside the run folder, removed after each periodic evaluation


@dataclasses.dataclass(frozen=True)
class EvaluationSpec:
    """The evaluation settings of a run (HbtConfig's eval_* fields, in evaluation's own words)."""

    benchmark: str
    languages: tuple[str, ...] = ()  # LAReQA: the periodic evaluation's; published: every evaluation's
    final_languages: tuple[str, ...] = ()  # LAReQA: the final evaluation's (recipes/evaluate.py --languages); () = all
    max_queries: int = 0  # periodic; 0 = all
    final_max_queries: int = 0
    split: str = ""
    corpus: str = ""
    corpus_passages: int = 0  # periodic cap of a published corpus; 0 = the full corpus
    data_dir: str = ""
    cache_dir: str = ""
    bf16: bool = False
    batch_size: int = 64
    block_size: int = 256  # LAReQA: queries scored at once against the whole pool
    chunk_rows: int = 16384  # published corpora: passages per embedding file (the unit of resume)
    index: str = "flat"  # published corpora: exact search, or a faiss ivf / hnsw index (with its recall vs exact)


def is_published(benchmark: str) -> bool:
    """A benchmark in one of the published layouts `published.load_task` reads (as opposed to LAReQA)."""
    return recognised_kind(benchmark) is not None


def open_evaluator(spec: EvaluationSpec, metric_for_best_model: str | None = None):
    """The evaluator of `spec`, its files read now; `metric_for_best_model`, when given, must be one it reports."""
    evaluator = PublishedEvaluator(spec) if is_published(spec.benchmark) else LareqaEvaluator(spec)
    if metric_for_best_model is not None:
        check_selection_metric(metric_for_best_model, evaluator.metrics)
    return evaluator


# =====================================================================================================================
# LAReQA
# =====================================================================================================================
class LareqaEvaluator:
    """The LAReQA grid; the periodic language subset and the full benchmark are each read once."""

    metrics = (MEAN_MAP, "mono_map", "cross_map", "multi_map", "rank_distance", "recall_at_1", "recall_at_10")

    def __init__(self, spec: EvaluationSpec):
        self.spec = spec
        data_dir, final_languages = spec.data_dir or None, list(spec.final_languages) or None
        self.full = load_lareqa_benchmark(spec.benchmark, languages=final_languages, data_dir=data_dir)
        missing = [language for language in spec.languages if language not in self.full.pools]
        if missing:
            raise ConfigError(
                f"eval_languages: {', '.join(missing)} not in {spec.benchmark} (has {', '.join(self.full.languages)})"
            )
        periodic = load_lareqa_benchmark(spec.benchmark, languages=list(spec.languages) or None, data_dir=data_dir)
        self.periodic = capped_pools(periodic, spec.max_queries, spec.corpus_passages)

    def score(self, encoder, accelerator, final: bool, per_query=None, encoded_out: list | None = None, **_) -> dict:
        """`grid.evaluate_grid` on the periodic subset or the full benchmark; `per_query` receives the
        PerQueryScores, `encoded_out` the EncodedBenchmark."""
        from hbt_accel.evaluation.grid import evaluate_grid

        spec = self.spec
        max_queries = (spec.final_max_queries if final else spec.max_queries) or None
        return evaluate_grid(
            encoder, self.full if final else self.periodic, None, max_queries, spec.batch_size, spec.bf16,
            accelerator, spec.block_size, per_query, encoded_out,
        )  # fmt: skip

    @staticmethod
    def headline(results: dict) -> str:
        return (
            f"mono {results['mono_map']:.3f} cross {results['cross_map']:.3f} multi {results['multi_map']:.3f} "
            f"rank distance {results['rank_distance']:.1f}"
        )

    @staticmethod
    def logged(results: dict) -> dict:
        return {f"eval/{key}": results[key] for key in MAP_KEYS}


# =====================================================================================================================
# Published layouts
# =====================================================================================================================
class PublishedEvaluator:
    """MIRACL, Mr. TyDi, MLDR, MKQA or a BEIR folder: its tasks (one per language) read once."""

    def __init__(self, spec: EvaluationSpec):
        self.spec = spec
        languages = list(spec.languages) or [None]
        split, corpus = spec.split or None, spec.corpus or None
        self.tasks = [
            t for lang in languages for t in load_task(spec.benchmark, language=lang, split=split, corpus=corpus)
        ]
        self.metrics = tuple(self.tasks[0].metrics)
        self._capped: dict[str, PassageStore] = {}

    def score(self, encoder, accelerator, final: bool, model_dir="", scratch_dir="", step: int = 0, **_) -> dict:
        """The final model on the full corpus (embeddings cached under `model_dir`'s weights), or the model at
        `step` on the capped corpus (embeddings in `scratch_dir`/.periodic_embeddings, removed on return)."""
        limit = self.spec.final_max_queries if final else self.spec.max_queries
        tasks = [dataclasses.replace(t, queries=t.queries[:limit]) if limit else t for t in self.tasks]
        options = {"batch_size": self.spec.batch_size, "bf16": self.spec.bf16, "accelerator": accelerator}
        options |= {"chunk_rows": self.spec.chunk_rows, "index": self.spec.index}
        started = time.perf_counter()
        if final:
            key = model_key(model_dir, encoder, self.spec.bf16)
            scored = [score_task(encoder, task, key, cache_dir=self.spec.cache_dir, **options) for task in tasks]
            corpus = "full corpus"
        else:
            scratch = Path(scratch_dir) / SCRATCH_FOLDER
            key = {"weights": [{"periodic evaluation at step": step}], "bf16": self.spec.bf16}
            stores = [self.capped(t, accelerator) for t in tasks]
            try:
                scored = [
                    score_task(encoder, t, key, cache_dir=scratch, passages=store, **options)
                    for t, store in zip(tasks, stores)
                ]
            finally:
                _remove_scratch(scratch, accelerator)
            cut = any(store.name.endswith(CAPPED_SUFFIX) for store in stores)  # a small corpus is searched whole
            corpus = capped_description(self.spec.corpus_passages if cut else 0)
        results = published_results(tasks, scored, corpus)
        results["seconds"] = time.perf_counter() - started
        return results

    def capped(self, task: RetrievalTask, accelerator) -> PassageStore:
        """The task's capped corpus, built once per run (and cached across runs, like every passage store)."""
        if task.name not in self._capped:
            full = task_passages(task, self.spec.cache_dir, accelerator)
            self._capped[task.name] = capped_passages(
                task, full, self.spec.corpus_passages, self.spec.cache_dir, accelerator
            )
        return self._capped[task.name]

    def headline(self, results: dict) -> str:
        return " ".join(f"{key} {results[key]:.3f}" for key in self.metrics) + f" ({results['corpus']})"

    def logged(self, results: dict) -> dict:
        return {f"eval/{key}": results[key] for key in self.metrics}


def published_results(tasks: list[RetrievalTask], scored: list[dict], corpus: str = "full corpus") -> dict:
    """Per-task results (each with its protocol), the macro average over tasks of every metric, and the same
    averages at the top level (what selects a best checkpoint and draws a metric-by-step curve)."""
    metrics = [{name: result[name] for name in task.metrics} for task, result in zip(tasks, scored)]
    macro = macro_average(metrics)
    return {
        "benchmark": scored[0]["protocol"]["benchmark"],
        "split": scored[0]["protocol"].get("split"),
        "corpus": corpus,
        "languages": [result["protocol"].get("language") for result in scored],
        "metrics": list(tasks[0].metrics),
        **macro,
        "n_queries": sum(result["n_queries"] for result in scored),
        "macro_average": macro,
        "tasks": scored,
    }


def capped_pools(benchmark: RetrievalBenchmark, max_queries: int, per_language: int) -> RetrievalBenchmark:
    """The periodic LAReQA benchmark with each language's pool cut to `per_language` candidates: the gold sentences
    of the scored questions (the first `max_queries` ids) plus a fixed sample of the others (seed 0). Unchanged
    when every pool is that small already; a pool never drops a gold sentence."""
    from hbt_accel.evaluation.grid import select_question_ids

    if not per_language or all(len(pool.candidates) <= per_language for pool in benchmark.pools.values()):
        return benchmark
    wanted = select_question_ids(benchmark, benchmark.languages, max_queries or None)
    pools = {lang: _capped_pool(pool, wanted, per_language) for lang, pool in benchmark.pools.items()}
    return RetrievalBenchmark(f"{benchmark.name} ({per_language} candidates per language)", pools)


def _capped_pool(pool: LanguagePool, wanted: set[str], per_language: int) -> LanguagePool:
    kept = [q for q, qid in enumerate(pool.question_ids) if qid in wanted]
    gold = sorted({pool.gold[q] for q in kept})
    rows = judged_and_sample(len(pool.candidates), np.asarray(gold, dtype=np.int64), per_language).tolist()
    new_index = {row: index for index, row in enumerate(rows)}
    return LanguagePool(
        language=pool.language,
        candidates=[pool.candidates[row] for row in rows],
        question_ids=[pool.question_ids[q] for q in kept],
        questions=[pool.questions[q] for q in kept],
        gold=[new_index[pool.gold[q]] for q in kept],
        context_of=[pool.context_of[row] for row in rows],
        question_article=[pool.question_article[q] for q in kept] if pool.question_article else [],
    )


def capped_description(passages: int) -> str:
    if not passages:
        return "full corpus"
    return f"capped corpus: the judged passages + a fixed sample of the rest (seed {SAMPLE_SEED}), {passages:,} in all"


def capped_passages(task: RetrievalTask, full: PassageStore, cap: int, cache_dir, accelerator=None) -> PassageStore:
    """`full` cut to its judged passages plus a fixed random sample of the rest, `cap` in all (every judged one
    stays even past the cap). MKQA judges by answer strings: its cap is a sample only. 0 or >= the corpus = `full`."""
    if not cap or cap >= len(full):
        return full
    judged = sorted({docid for judgements in (task.qrels or {}).values() for docid in judgements})
    judged_key = fingerprint({"docids": judged})
    description = {"from": full.folder.name, "cap": cap, "seed": SAMPLE_SEED, "judged": judged_key}

    def batches():
        rows = capped_rows(full, judged, cap)
        for start in range(0, len(rows), CAPPED_BATCH_ROWS):
            part = rows[start : start + CAPPED_BATCH_ROWS]
            docids, texts = pa.array(full.docids(part), pa.string()), pa.array(full.texts_at(part), pa.string())
            yield pa.record_batch([docids, texts], schema=PASSAGE_SCHEMA)

    return open_passages(full.name + CAPPED_SUFFIX, description, batches, cache_dir, accelerator)


def capped_rows(full: PassageStore, judged_docids: list[str], cap: int) -> np.ndarray:
    """Sorted rows of `full`: its judged passages plus a fixed sample of the others, `cap` in all."""
    return judged_and_sample(len(full), full.rows_of(judged_docids), cap)


def judged_and_sample(total: int, judged: np.ndarray, cap: int) -> np.ndarray:
    """Sorted indices into `total` items: every judged one (even past `cap`), then the others in the order of one
    seeded draw (seed 0) until `cap` are taken. A draw of `cap` indices, not a permutation of `total`: O(cap) memory
    on a corpus of millions."""
    judged = np.asarray(judged, dtype=np.int64)
    drawn = np.random.default_rng(SAMPLE_SEED).choice(total, size=min(total, cap), replace=False)
    rest = drawn[~np.isin(drawn, judged)][: max(0, cap - len(judged))]
    return np.sort(np.concatenate([judged, rest]))


def _remove_scratch(scratch: Path, accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every rank has searched before its chunks go
    if accelerator is None or accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
