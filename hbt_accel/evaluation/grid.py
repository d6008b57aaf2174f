"""The LAReQA grid: mono-, cross- and multilingual mAP, R@1/R@10 and rank distance from ONE encoding pass.

Protocol (the README, "Evaluation"; LAReQA, Roy et al. 2020):
- every question and every candidate sentence of the chosen languages is encoded exactly once per model
  (questions with kind="query", sentences with kind="passage");
- single-pair setting (X, Y): questions in X against the candidate pool of Y; the one relevant sentence is the gold
  sentence of the same question id in Y. Pairs where Y lacks the id (MLQA-R) have no relevant item: such queries
  are skipped, and a pair with no such query at all is not in the grid (42 cross pairs on MLQA-R, 110 on XQuAD-R);
- multilingual setting (X): questions in X against the union of every chosen language's pool; every parallel
  answer (the gold sentence of the same id in each language that has it) is relevant;
- ranks are exact over the whole pool (no cutoff), pessimistic on ties (see `metrics.py`);
- scores are computed a block of queries at a time against all candidates, so memory is O(block x pool).

Summary numbers:
- `mono_map`: mean of the grid diagonal; `cross_map`: mean of the off-diagonal cells (each cell = mAP over its
  queries, so every language pair weighs the same); `multi_map`: mean over query languages of the multilingual mAP;
- `recall_at_1` / `recall_at_10`: over the single-pair settings (all grid cells, mono and cross), the fraction of
  queries whose gold sentence is ranked in the top k, averaged over cells (macro, like the mAPs); per cell in
  `grid_recall_at_1` / `grid_recall_at_10`;
- `rank_distance`: in the multilingual pool, per query the rank of the worst-ranked relevant sentence minus the
  best-ranked one, averaged over the queries of a language (`rank_distance_per_language`), then over languages.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hbt_accel.atomic import write_atomic
from hbt_accel.data import DataError, RetrievalBenchmark
from hbt_accel.evaluation.encoding import encode_texts
from hbt_accel.evaluation.metrics import average_precision, rank_distance, recall_at_k, relevant_ranks
from hbt_accel.evaluation.schema import HEADLINE_KEYS


@dataclass
class EncodedBenchmark:
    """Everything the scorer needs, with the texts already turned into vectors.

    query_embeddings: (Q, d), the chosen questions of all languages, language after language.
    candidate_embeddings: (N, d), every candidate of every chosen language; language j owns columns
        candidate_offsets[j]:candidate_offsets[j + 1].
    query_language: (Q,) index into `languages` of each question's language.
    gold_columns: (Q, L) column in the candidate union of the question's gold sentence in pool language j, or -1
        when that language does not hold the question id.
    """

    benchmark: str
    languages: list[str]
    query_ids: list[str]
    query_language: np.ndarray
    gold_columns: np.ndarray
    candidate_offsets: np.ndarray
    query_embeddings: np.ndarray
    candidate_embeddings: np.ndarray
    precision: str
    encode_seconds: float


def select_languages(benchmark: RetrievalBenchmark, languages: Iterable[str] | str | None) -> list[str]:
    """The requested languages (comma string or list) in the given order; all of the benchmark's if None/empty."""
    if isinstance(languages, str):
        languages = [lang.strip() for lang in languages.split(",") if lang.strip()]
    chosen = list(languages) if languages else benchmark.languages
    missing = [lang for lang in chosen if lang not in benchmark.pools]
    if missing:
        raise DataError(
            f"benchmark {benchmark.name}: no language {', '.join(missing)} (has {', '.join(benchmark.languages)})"
        )
    if len(set(chosen)) != len(chosen):
        raise DataError(f"benchmark {benchmark.name}: a language is listed twice in {', '.join(chosen)}")
    return chosen


def select_question_ids(benchmark: RetrievalBenchmark, languages: list[str], max_queries: int | None) -> set[str]:
    """The first `max_queries` question ids (the same ids in every language); all ids if None or 0.

    Ids are taken in file order of the language holding the most of them (XQuAD-R: every language has the same ids
    in the same order; MLQA-R: English holds every id), then of the others, so the cut never favours one language.
    """
    by_size = sorted(languages, key=lambda lang: (-len(benchmark.pools[lang].question_ids), lang))
    ordered = list(dict.fromkeys(qid for lang in by_size for qid in benchmark.pools[lang].question_ids))
    return set(ordered[:max_queries] if max_queries else ordered)


def encode_benchmark(
    encoder,
    benchmark: RetrievalBenchmark,
    languages: Iterable[str] | str | None = None,
    max_queries: int | None = None,
    batch_size: int = 64,
    bf16: bool = False,
    accelerator=None,
) -> EncodedBenchmark:
    """Encode each chosen question and each candidate sentence exactly once (split over processes if launched)."""
    languages = select_languages(benchmark, languages)
    wanted = select_question_ids(benchmark, languages, max_queries)

    # ---- the texts, language after language; each pool's gold sentence by (question id, row)
    query_texts, query_ids, query_languages, candidate_texts, candidate_languages = [], [], [], [], []
    gold_question_ids, gold_indices = [], []
    for lang in languages:
        pool = benchmark.pools[lang]
        for qid, question in zip(pool.question_ids, pool.questions):
            if qid in wanted:
                query_texts.append(question)
                query_ids.append(qid)
                query_languages.append(lang)
        gold_question_ids += pool.question_ids
        gold_indices += [len(candidate_texts) + gold for gold in pool.gold]
        candidate_texts.extend(pool.candidates)
        candidate_languages += [lang] * len(pool.candidates)

    # ---- encode once, then arrange (already in language order: the builder keeps it)
    start = time.perf_counter()
    query_embeddings = encode_texts(encoder, query_texts, "query", batch_size, bf16, accelerator)  # (Q, d)
    candidate_embeddings = encode_texts(encoder, candidate_texts, "passage", batch_size, bf16, accelerator)  # (N, d)
    return arrange_encoded(
        query_embeddings, query_languages, query_ids, candidate_embeddings, candidate_languages,
        gold_question_ids, gold_indices, languages, benchmark=benchmark.name, precision="bf16" if bf16 else "fp32",
        encode_seconds=time.perf_counter() - start,
    )  # fmt: skip


def arrange_encoded(
    query_embeddings: np.ndarray,
    query_languages: list[str],
    query_ids: list[str],
    candidate_embeddings: np.ndarray,
    candidate_languages: list[str],
    gold_question_ids: list[str],
    gold_indices: list[int],
    languages: list[str] | None = None,
    **about,
) -> EncodedBenchmark:
    """The ONE builder of an EncodedBenchmark, from flat inputs: queries grouped by language, candidates likewise
    (stable: inputs already in that order keep it). `encode_benchmark` and the `evaluate` adapter both call it;
    `about` sets `benchmark`, `precision` and `encode_seconds`."""
    num_candidates = len(candidate_languages)
    _check_shapes(query_embeddings, candidate_embeddings, num_candidates, gold_question_ids, gold_indices)
    languages = list(languages) if languages else list(dict.fromkeys(candidate_languages))
    position = {lang: j for j, lang in enumerate(languages)}
    unknown = sorted(set(query_languages) - set(position))
    if unknown:
        raise ValueError(f"lareqa_grid: query languages {unknown} have no candidates in languages {languages}")

    # ---- candidates: language after language (stable), as the scorer's column offsets require
    kept = [i for i in range(num_candidates) if candidate_languages[i] in position]
    order = sorted(kept, key=lambda i: position[candidate_languages[i]])
    column_of_row = {row: column for column, row in enumerate(order)}
    counts = np.bincount([position[candidate_languages[i]] for i in order], minlength=len(languages))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    # ---- queries: language after language (stable), as evaluate_grid orders them
    query_order = sorted(range(len(query_ids)), key=lambda q: position[query_languages[q]])
    ordered_ids = [query_ids[q] for q in query_order]
    gold = _gold_column_of(gold_question_ids, gold_indices, candidate_languages, position, column_of_row)
    gold_columns = np.array(
        [[gold.get((qid, j), -1) for j in range(len(languages))] for qid in ordered_ids], dtype=np.int64
    ).reshape(len(ordered_ids), len(languages))  # (Q, L)

    dim = candidate_embeddings.shape[1]
    return EncodedBenchmark(
        benchmark=about.get("benchmark", "lareqa_grid"),
        languages=languages,
        query_ids=ordered_ids,
        query_language=np.array([position[query_languages[q]] for q in query_order], dtype=np.int64),
        gold_columns=gold_columns,
        candidate_offsets=offsets,
        query_embeddings=query_embeddings[query_order].reshape(len(query_order), dim),
        candidate_embeddings=np.ascontiguousarray(candidate_embeddings[order]),
        precision=about.get("precision", "given"),
        encode_seconds=about.get("encode_seconds", 0.0),
    )


def _check_shapes(query_embeddings, candidate_embeddings, num_candidates: int, gold_question_ids, gold_indices):
    if candidate_embeddings.ndim != 2 or candidate_embeddings.shape[0] != num_candidates:
        raise ValueError(
            f"lareqa_grid: candidate_embeddings has shape {candidate_embeddings.shape}, "
            f"expected ({num_candidates}, d) for {num_candidates} candidate_languages"
        )
    if len(gold_question_ids) != len(gold_indices):
        raise ValueError("lareqa_grid: gold_question_ids and gold_indices must have the same length")
    if len(query_embeddings) and query_embeddings.shape[1] != candidate_embeddings.shape[1]:
        raise ValueError("lareqa_grid: query and candidate embeddings differ in dimension")


def _gold_column_of(gold_question_ids, gold_indices, candidate_languages, position, column_of_row) -> dict:
    """(question id, pool language position) -> the gold sentence's column; one gold sentence per language."""
    gold_column: dict[tuple[str, int], int] = {}
    for qid, row in zip(gold_question_ids, gold_indices):
        row = int(row)
        if not 0 <= row < len(candidate_languages):
            raise ValueError(
                f"lareqa_grid: gold index {row} for question {qid!r} is outside 0..{len(candidate_languages) - 1}"
            )
        if candidate_languages[row] not in position:
            continue
        key = (qid, position[candidate_languages[row]])
        if gold_column.get(key, column_of_row[row]) != column_of_row[row]:
            raise ValueError(f"lareqa_grid: question {qid!r} has two gold sentences in {candidate_languages[row]}")
        gold_column[key] = column_of_row[row]
    return gold_column


RESULTS_FILE = "eval_results.json"  # an evaluation's summary numbers
PER_QUERY_FILE = "per_query.npz"  # the name a PerQueryScores is saved under beside RESULTS_FILE


@dataclass
class PerQueryScores:
    """Every query's ranks in every setting: enough to recompute every summary number under any reweighting of the
    questions (the bootstrap in `statistics.py`), and small enough to keep beside a model's eval_results.json.

    pair_ranks: (Q, L) rank of the question's gold sentence in pool language j (NaN: the pool lacks the id).
    multi_ap, multi_distance: (Q,) AP and rank distance in the multilingual pool.
    multi_ranks: (Q, L) rank of the gold sentence of language j in the multilingual pool (NaN: j lacks the id);
        R@k there per query. None in files written before it was kept.
    """

    benchmark: str
    languages: list[str]
    query_ids: list[str]
    query_language: np.ndarray
    pair_ranks: np.ndarray
    multi_ap: np.ndarray
    multi_distance: np.ndarray
    multi_ranks: np.ndarray | None = None

    def save(self, path: str | os.PathLike) -> Path:
        arrays = _query_layout(self.benchmark, self.languages, self.query_ids, self.query_language)
        arrays["pair_ranks"] = np.nan_to_num(self.pair_ranks, nan=-1).astype(np.int32)  # whole ranks; -1 = no gold
        arrays["multi_ap"] = self.multi_ap.astype(np.float32)
        arrays["multi_distance"] = self.multi_distance.astype(np.int32)
        if self.multi_ranks is not None:
            arrays["multi_ranks"] = np.nan_to_num(self.multi_ranks, nan=-1).astype(np.int32)
        return _write_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PerQueryScores:
        with np.load(path) as data:
            names = ("query_language", "pair_ranks", "multi_ap", "multi_distance", "multi_ranks")
            arrays = {name: data[name] for name in names if name in data}
            for name in ("pair_ranks", "multi_ranks"):  # whole ranks on disk, -1 = no gold
                if name in arrays:
                    arrays[name] = np.where(arrays[name] < 0, np.nan, arrays[name].astype(np.float64))
            return cls(
                benchmark=str(data["benchmark"]),
                languages=[str(x) for x in data["languages"]],
                query_ids=[str(x) for x in data["query_ids"]],
                **{
                    name: value.astype(np.float64) if value.dtype.kind == "f" else value
                    for name, value in arrays.items()
                },
            )


def rank_encoded(encoded: EncodedBenchmark, block_size: int = 256) -> PerQueryScores:
    """Exact ranks of every query's relevant sentences in every setting, a block of queries at a time."""
    offsets = encoded.candidate_offsets
    num_queries, num_languages = encoded.gold_columns.shape
    candidates = torch.from_numpy(encoded.candidate_embeddings)  # (N, d)
    pair_ranks = np.full((num_queries, num_languages), np.nan)  # (Q, L) rank of the gold in pool language j
    multi_ap = np.zeros(num_queries)  # (Q,)
    multi_distance = np.zeros(num_queries)  # (Q,)
    multi_ranks = np.full((num_queries, num_languages), np.nan)  # (Q, L) each gold's rank in the union of pools
    for begin in range(0, num_queries, block_size):
        end = min(begin + block_size, num_queries)
        queries = torch.from_numpy(encoded.query_embeddings[begin:end])  # (B, d)
        scores = (queries @ candidates.T).numpy()  # (B, N)
        gold = encoded.gold_columns[begin:end]  # (B, L)
        rows = np.arange(end - begin)[:, None]
        relevant = np.where(gold >= 0, scores[rows, np.maximum(gold, 0)], np.nan)  # (B, L) gold score per pool
        for j in range(num_languages):
            pool_scores = scores[:, offsets[j] : offsets[j + 1]]  # (B, N_j)
            pair_ranks[begin:end, j] = relevant_ranks(pool_scores, relevant[:, j : j + 1])[:, 0]
        ranks = relevant_ranks(scores, relevant)  # (B, L) ranks in the union of all pools
        multi_ranks[begin:end] = ranks
        multi_ap[begin:end] = average_precision(ranks)
        multi_distance[begin:end] = rank_distance(ranks)
    return PerQueryScores(
        encoded.benchmark,
        list(encoded.languages),
        list(encoded.query_ids),
        encoded.query_language,
        pair_ranks,
        multi_ap,
        multi_distance,
        multi_ranks,
    )


def score_encoded(encoded: EncodedBenchmark, block_size: int = 256, per_query: list | None = None) -> dict:
    """Exact ranks for every query in every setting, then the summary dict (keys: see module docstring).

    `per_query`: a list that receives the `PerQueryScores` (for confidence intervals and paired tests)."""
    start = time.perf_counter()
    scores = rank_encoded(encoded, block_size)
    if per_query is not None:
        per_query.append(scores)
    results = summarize(scores)
    offsets = encoded.candidate_offsets
    results.update(
        precision=encoded.precision,
        n_candidates=int(offsets[-1]),
        n_candidates_per_language={lang: int(offsets[j + 1] - offsets[j]) for j, lang in enumerate(encoded.languages)},
        encode_seconds=encoded.encode_seconds,
        score_seconds=time.perf_counter() - start,
    )
    return results


RECALL_CUTOFFS = (1, 5, 10, 20)


def recall_by_language(scores: PerQueryScores, cutoffs=RECALL_CUTOFFS) -> dict[str, dict[str, float]]:
    """{language: {"recall_at_k": R@k, "multi_recall_at_k": ...}}: a language's queries against every
    single-language pool (its own and the others'), each pair weighted by its queries; and, where the file keeps
    them, in the multilingual pool: per query the share of its parallel answers in the top k, averaged."""
    out = {}
    for i, language in enumerate(scores.languages):
        mine = scores.query_language == i
        ranks = scores.pair_ranks[mine].ravel()
        ranks = ranks[~np.isnan(ranks)]
        if not len(ranks):
            continue
        out[language] = {f"recall_at_{k}": float((ranks <= k).mean()) for k in cutoffs}
        if scores.multi_ranks is not None:
            multi = scores.multi_ranks[mine]  # (Q_i, L)
            out[language] |= {f"multi_recall_at_{k}": float(np.mean(recall_at_k(multi, k))) for k in cutoffs}
    return out


def summarize(scores: PerQueryScores) -> dict:
    """The summary dict of `score_encoded` from per-query ranks: grid cells, per-language and macro numbers."""
    languages, pair_ranks = scores.languages, scores.pair_ranks
    grid, grid_r1, grid_r10, grid_n = {}, {}, {}, {}
    multi_per_language, distance_per_language, queries_per_language = {}, {}, {}
    for i, query_lang in enumerate(languages):
        mine = scores.query_language == i
        queries_per_language[query_lang] = int(mine.sum())
        if not mine.any():
            continue
        multi_per_language[query_lang] = float(scores.multi_ap[mine].mean())
        distance_per_language[query_lang] = float(scores.multi_distance[mine].mean())
        for j, pool_lang in enumerate(languages):
            ranks = pair_ranks[mine, j]
            ranks = ranks[~np.isnan(ranks)][:, None]  # (n, 1) only queries whose id the pool holds
            if len(ranks) == 0:
                continue
            key = f"{query_lang}-{pool_lang}"
            grid[key] = float(average_precision(ranks).mean())
            grid_r1[key] = float(recall_at_k(ranks, 1).mean())
            grid_r10[key] = float(recall_at_k(ranks, 10).mean())
            grid_n[key] = len(ranks)

    mono = [v for k, v in grid.items() if k.split("-")[0] == k.split("-")[1]]
    cross = [v for k, v in grid.items() if k.split("-")[0] != k.split("-")[1]]
    return {
        "benchmark": scores.benchmark,
        "languages": list(languages),
        "mono_map": _mean(mono),
        "cross_map": _mean(cross),
        "multi_map": _mean(multi_per_language.values()),
        "rank_distance": _mean(distance_per_language.values()),
        "recall_at_1": _mean(grid_r1.values()),
        "recall_at_10": _mean(grid_r10.values()),
        "grid": grid,
        "grid_recall_at_1": grid_r1,
        "grid_recall_at_10": grid_r10,
        "grid_n_queries": grid_n,
        "multi_map_per_language": multi_per_language,
        "rank_distance_per_language": distance_per_language,
        "n_queries": len(scores.query_ids),
        "n_queries_per_language": queries_per_language,
    }


def evaluate_grid(
    encoder,
    benchmark: RetrievalBenchmark,
    languages: Iterable[str] | str | None = None,
    max_queries: int | None = None,
    batch_size: int = 64,
    bf16: bool = False,
    accelerator=None,
    block_size: int = 256,
    per_query: list | None = None,
    encoded_out: list | None = None,
) -> dict:
    """Score `encoder` on the full LAReQA grid of `benchmark` (optionally a language subset / first N ids): the one
    assembler of a grid evaluation (training's evaluator, recipes/evaluate.py and the benchmarks call it).

    `encoder` is anything with `.encode(texts, kind, batch_size, bf16) -> (N, d)` L2-normalised float32.
    Under an `accelerator` with several processes each rank encodes a shard; every rank returns the same dict.
    `seconds` is the wall time of the whole call (encoding + scoring). `per_query` receives the `PerQueryScores`,
    `encoded_out` the `EncodedBenchmark` (to save the embeddings).
    """
    start = time.perf_counter()
    encoded = encode_benchmark(encoder, benchmark, languages, max_queries, batch_size, bf16, accelerator)
    results = score_encoded(encoded, block_size, per_query)
    results["seconds"] = time.perf_counter() - start
    if encoded_out is not None:
        encoded_out.append(encoded)
    return results


def language_view(results: dict, languages: Iterable[str]) -> dict:
    """mono / cross / multi mAP and rank distance over the queries in `languages` only: their diagonal cells, their
    rows' off-diagonal cells (against every pool), their multilingual numbers. E.g. the never-trained languages."""
    grid, chosen = results["grid"], [x for x in languages if x in results["languages"]]
    mono = [grid[f"{x}-{x}"] for x in chosen if f"{x}-{x}" in grid]
    cross = [grid[f"{x}-{y}"] for x in chosen for y in results["languages"] if y != x and f"{x}-{y}" in grid]
    multi = [results["multi_map_per_language"][x] for x in chosen]
    distance = [results["rank_distance_per_language"][x] for x in chosen]
    # plain sums (not np.mean's pairwise ones): the committed reproduction tables were computed this way
    return {
        key: sum(v) / len(v) if v else float("nan") for key, v in zip(HEADLINE_KEYS, (mono, cross, multi, distance))
    }


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def save_encoded(encoded: EncodedBenchmark, path: str | os.PathLike) -> Path:
    """Write the embeddings and the relevance layout to one .npz, so another scorer can re-rank the same vectors."""
    arrays = _query_layout(encoded.benchmark, encoded.languages, encoded.query_ids, encoded.query_language)
    for name in ("gold_columns", "candidate_offsets", "query_embeddings", "candidate_embeddings", "precision"):
        arrays[name] = getattr(encoded, name)
    arrays["encode_seconds"] = encoded.encode_seconds
    return _write_npz(path, arrays)


def _query_layout(benchmark: str, languages: list[str], query_ids: list[str], query_language: np.ndarray) -> dict:
    """The arrays every saved .npz of an evaluation starts with: which questions, in which language."""
    return {
        "benchmark": benchmark,
        "languages": np.array(languages),
        "query_ids": np.array(query_ids),
        "query_language": query_language,
    }


def _write_npz(path: str | os.PathLike, arrays: dict) -> Path:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return write_atomic(path, buffer.getvalue())


def load_encoded(path: str | os.PathLike) -> EncodedBenchmark:
    with np.load(path) as data:
        return EncodedBenchmark(
            benchmark=str(data["benchmark"]),
            languages=[str(lang) for lang in data["languages"]],
            query_ids=[str(qid) for qid in data["query_ids"]],
            query_language=data["query_language"],
            gold_columns=data["gold_columns"],
            candidate_offsets=data["candidate_offsets"],
            query_embeddings=data["query_embeddings"],
            candidate_embeddings=data["candidate_embeddings"],
            precision=str(data["precision"]),
            encode_seconds=float(data["encode_seconds"]),
        )
