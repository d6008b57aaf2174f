"""Exact-rank retrieval metrics for LAReQA pools: ranks of relevant items, average precision, rank distance, R@k.

Tie rule (pessimistic, documented once here and tested in tests/test_metrics.py): a relevant item is placed after
every candidate whose score is strictly higher AND after every NON-relevant candidate with an equal score. Relevant
items tied with each other take consecutive ranks (their order among themselves does not change AP). So with
relevant scores sorted descending s_1 >= s_2 >= ... >= s_R,

    rank_k = k + #{non-relevant candidates with score >= s_k}.

With one relevant item this is 1 + #{strictly higher} + #{tied non-relevant}. A model that scores everything
equal therefore gets the worst rank, never a lucky one. trec_eval breaks ties by docno instead; the agreement test
names documents so that its order is the same as ours.

Everything here works on a block of queries at once (numpy, shapes in the docstrings); no cutoff: ranks are exact
over the whole pool.
"""

from __future__ import annotations

import numpy as np


def relevant_ranks(scores: np.ndarray, relevant_scores: np.ndarray) -> np.ndarray:
    """Ranks of the relevant items under the pessimistic tie rule.

    scores: (B, N) every candidate's score, the relevant ones included.
    relevant_scores: (B, R) the scores of each query's relevant candidates; NaN marks "no relevant item here"
        (queries with fewer than R relevant items). The relevant candidates must be among the N columns.
    Returns (B, R) float ranks (1 = best), NaN where the input was NaN; the columns keep the input order.
    """
    valid = ~np.isnan(relevant_scores)  # (B, R)
    filled = np.where(valid, relevant_scores, np.inf)  # inf compares below nothing: counts stay 0
    all_ge = (scores[:, None, :] >= filled[:, :, None]).sum(axis=2)  # (B, R) candidates with score >= s_k
    rel_ge = (relevant_scores[:, None, :] >= filled[:, :, None]).sum(axis=2)  # (B, R) relevant ones among them
    nonrel_ge = all_ge - rel_ge  # (B, R)
    # position k of s_k among the relevant items sorted descending, ties among relevant broken by column order
    greater = (relevant_scores[:, None, :] > filled[:, :, None]).sum(axis=2)  # (B, R) NaN compares False
    cols = np.arange(relevant_scores.shape[1])
    tied_before = (
        (relevant_scores[:, None, :] == filled[:, :, None]) & (cols[None, None, :] < cols[None, :, None])
    ).sum(axis=2)  # (B, R) equal relevant scores in earlier columns
    k = greater + tied_before + 1
    return np.where(valid, k + nonrel_ge, np.nan)


def average_precision(ranks: np.ndarray) -> np.ndarray:
    """AP per query from the ranks of ALL its relevant items (no cutoff: every relevant item is retrieved).

    ranks: (B, R) with NaN padding. AP = mean over relevant items of (#relevant at or above it) / rank.
    With one relevant item, AP = 1 / rank. Returns (B,).
    """
    sorted_ranks = np.sort(ranks, axis=1)  # NaN sorts last
    position = np.arange(1, ranks.shape[1] + 1)[None, :]  # (1, R)
    precision = position / sorted_ranks  # (B, R), NaN where padded
    return np.nanmean(precision, axis=1)


def rank_distance(ranks: np.ndarray) -> np.ndarray:
    """Language bias of each query: rank of its worst-ranked relevant item minus its best-ranked one. (B,) ."""
    return np.nanmax(ranks, axis=1) - np.nanmin(ranks, axis=1)


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per query, the fraction of its relevant items ranked in the top k. With one relevant item: 1.0 or 0.0. (B,)"""
    hits = np.where(np.isnan(ranks), np.nan, ranks <= k)
    return np.nanmean(hits, axis=1)
