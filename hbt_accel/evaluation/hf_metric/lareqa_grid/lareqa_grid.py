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

from hbt_accel.evaluation import score_encoded
from hbt_accel.evaluation.citations import LAREQA_BIBTEX
from hbt_accel.evaluation.grid import arrange_encoded

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
        encoded = arrange_encoded(
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
