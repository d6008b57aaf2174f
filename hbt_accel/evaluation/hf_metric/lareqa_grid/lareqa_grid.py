"""LAReQA grid metric for `evaluate`: mono-, cross- and multilingual mAP, R@1/R@10 and rank distance from embeddings.

A thin adapter: it arranges the inputs into `hbt_accel.evaluation.EncodedBenchmark` and scores them with
`hbt_accel.evaluation.score_encoded`, the same code `evaluate_grid` uses, so the numbers are identical.

Load it by path:

    import evaluate
    from hbt_accel.evaluation.hf_metric import lareqa_grid_path

    metric = evaluate.load(lareqa_grid_path())
    metric.add_batch(query_embeddings=q, query_languages=q_langs, query_ids=q_ids)  # any number of batches
    results = metric.compute(
        candidate_embeddings=c, candidate_languages=c_langs, gold_question_ids=g_ids, gold_indices=g_rows
    )
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from hbt_accel.evaluation import EncodedBenchmark, score_encoded
from hbt_accel.evaluation.citations import LAREQA_BIBTEX

_DESCRIPTION = """\
Language-agnostic answer retrieval (LAReQA) scored on the full language grid. Questions in language X are ranked
against the candidate sentences of language Y (single-pair settings: the grid; X == Y monolingual, X != Y
cross-lingual) and against the union of all languages' candidates (multilingual setting: every translation of the
answer is relevant). mAP with exact ranks (no cutoff, ties pessimistic), R@1/R@10 over the single-pair settings, and
rank distance (per query, rank of the worst-ranked relevant sentence minus the best-ranked one; language bias, lower
is better). Embeddings are compared with the dot product: pass L2-normalised vectors for cosine similarity.
"""

_KWARGS_DESCRIPTION = """
Per-query inputs (features; pass to `add_batch`/`add` or `compute`), one entry per question:
    query_embeddings (list of float lists or (Q, d) array): the question embeddings.
    query_languages (list of str): the language code of each question, e.g. "en".
    query_ids (list of str): the question id; the same id in every language (translations share it).
Pool inputs (keyword arguments of `compute` only, given once):
    candidate_embeddings ((N, d) array): every candidate sentence of every language.
    candidate_languages (list of str, N): the language of each candidate.
    gold_question_ids (list of str) and gold_indices (list of int), the same length: candidate row
        `gold_indices[k]` (a row of candidate_embeddings) is the relevant sentence for question `gold_question_ids[k]`
        in that candidate's language. At most one per (question id, language); several ids may share one sentence.
    languages (list of str, optional): the languages scored and their order; default: the order in which languages
        first appear in candidate_languages. Questions in other languages are an error.
    block_size (int, optional, default 256): questions scored at a time (memory: block_size x N floats).
Returns: the dict of `hbt_accel.evaluation.evaluate_grid` (without "seconds"): mono_map, cross_map, multi_map,
    rank_distance, recall_at_1, recall_at_10, grid ("en-de" -> mAP), grid_recall_at_1, grid_recall_at_10,
    grid_n_queries, multi_map_per_language, rank_distance_per_language, languages, n_queries, ...
    A (query language, pool language) pair with no question whose id the pool holds is not in the grid.
Example:
    >>> metric = evaluate.load(lareqa_grid_path())
    >>> results = metric.compute(query_embeddings=q, query_languages=["en", "de"], query_ids=["1", "1"],
    ...     candidate_embeddings=c, candidate_languages=["en", "en", "de"], gold_question_ids=["1", "1"],
    ...     gold_indices=[0, 2])
    >>> results["grid"]["en-de"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LareqaGrid(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=LAREQA_BIBTEX,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "query_embeddings": datasets.Sequence(datasets.Value("float32")),
                    "query_languages": datasets.Value("string"),
                    "query_ids": datasets.Value("string"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2004.05484", "https://arxiv.org/abs/2408.10536"],
        )

    def _compute(
        self,
        query_embeddings,
        query_languages,
        query_ids,
        candidate_embeddings=None,
        candidate_languages=None,
        gold_question_ids=None,
        gold_indices=None,
        languages=None,
        block_size: int = 256,
    ):
        if candidate_embeddings is None or candidate_languages is None or gold_question_ids is None:
            raise ValueError(
                "lareqa_grid: compute() needs candidate_embeddings, candidate_languages, gold_question_ids"
            )
        encoded = build_encoded(
            np.asarray(query_embeddings, dtype=np.float32),
            list(query_languages),
            [str(qid) for qid in query_ids],
            np.asarray(candidate_embeddings, dtype=np.float32),
            list(candidate_languages),
            [str(qid) for qid in gold_question_ids],
            list(gold_indices if gold_indices is not None else []),
            languages,
        )
        return score_encoded(encoded, block_size)


def build_encoded(
    query_embeddings: np.ndarray,
    query_languages: list[str],
    query_ids: list[str],
    candidate_embeddings: np.ndarray,
    candidate_languages: list[str],
    gold_question_ids: list[str],
    gold_indices: list[int],
    languages: list[str] | None = None,
) -> EncodedBenchmark:
    """Arrange flat inputs as the scorer's EncodedBenchmark: queries grouped by language, candidates likewise."""
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
        benchmark="lareqa_grid",
        languages=languages,
        query_ids=ordered_ids,
        query_language=np.array([position[query_languages[q]] for q in query_order], dtype=np.int64),
        gold_columns=gold_columns,
        candidate_offsets=offsets,
        query_embeddings=query_embeddings[query_order].reshape(len(query_order), dim),
        candidate_embeddings=np.ascontiguousarray(candidate_embeddings[order]),
        precision="given",
        encode_seconds=0.0,
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
