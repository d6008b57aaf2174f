"""The projections of benchmarks/lir_probe.py against what they promise, on synthetic embeddings."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the script imports its sibling report.py
from lir_probe import normalized, project_out, top_directions  # noqa: E402


def test_the_top_direction_of_one_language_is_its_shared_offset_and_projecting_it_out_leaves_unit_orthogonal_rows():
    rng = np.random.default_rng(0)
    offset = normalized(rng.normal(size=(1, 16)))[0]
    vectors = normalized(rng.normal(size=(200, 16)) * 0.1 + offset)  # one language: content + a common offset
    (direction,) = top_directions(vectors, 1)
    assert abs(direction @ offset) > 0.99  # uncentred SVD: the language's mean direction comes first
    directions = top_directions(vectors, 3)
    np.testing.assert_allclose(directions @ directions.T, np.eye(3), atol=1e-6)
    projected = project_out(vectors, directions)
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(projected @ directions.T, 0.0, atol=1e-6)


def test_projecting_out_the_span_of_the_centred_language_means_makes_the_means_coincide():
    rng = np.random.default_rng(1)
    content = rng.normal(size=(300, 16))
    offsets = rng.normal(size=(3, 16)) * 2
    languages = [content[k::3] + offsets[k] for k in range(3)]  # three languages, same content distribution
    means = np.stack([x.mean(axis=0) for x in languages])
    directions = top_directions(means - means.mean(axis=0), 2)  # 3 centred means span 2 directions
    projected_means = np.stack([(x - (x @ directions.T) @ directions).mean(axis=0) for x in languages])
    np.testing.assert_allclose(projected_means, np.broadcast_to(projected_means[0], (3, 16)), atol=1e-9)


def test_each_text_loses_only_its_own_languages_directions():
    """Two languages with unequal pools (2 en and 3 de candidates), queries in en, de, de: en texts lose axis 0 and
    keep axis 1, de texts the other way round."""
    from lir_probe import per_language

    from hbt_accel.evaluation.grid import EncodedBenchmark

    rng = np.random.default_rng(2)
    encoded = EncodedBenchmark(
        benchmark="toy",
        languages=["en", "de"],
        query_ids=["q0", "q1", "q2"],
        query_language=np.array([0, 1, 1]),
        gold_columns=np.array([[0, 2], [1, 3], [0, 4]]),
        candidate_offsets=np.array([0, 2, 5]),
        query_embeddings=normalized(rng.normal(size=(3, 4))),
        candidate_embeddings=normalized(rng.normal(size=(5, 4))),
        precision="fp32",
        encode_seconds=0.0,
    )
    axes = np.eye(4)
    projected = per_language(encoded, {"en": axes[:1], "de": axes[1:2]})
    language_of = {"query": [0, 1, 1], "candidate": [0, 0, 1, 1, 1]}
    for kind, vectors in (("query", projected.query_embeddings), ("candidate", projected.candidate_embeddings)):
        for vector, language in zip(vectors, language_of[kind]):
            assert abs(vector[language]) < 1e-7 and abs(vector[1 - language]) > 1e-3
    assert encoded.query_embeddings[0, 0] != 0  # the input embeddings are left as they were
