"""benchmarks/translation_check.py: bitext retrieval between two languages' answers of their shared ids."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from translation_check import main, pair_row  # noqa: E402

from hbt_accel.errors import DataError  # noqa: E402


def test_pair_row_counts_nearest_neighbours_over_shared_ids_only():
    # ids a, b, c in both languages, d in the first only (ignored). German a's nearest English answer is b's.
    first = {"a": "A-de", "b": "B-de", "c": "C-de", "d": "D-de"}
    second = {"a": "A-en", "b": "B-en", "c": "C-en"}
    unit = np.eye(3)
    vectors = {"A-de": unit[1], "B-de": unit[1], "C-de": unit[2], "D-de": unit[0],
               "A-en": unit[0], "B-en": unit[1], "C-en": unit[2]}  # fmt: skip
    row = pair_row(first, second, vectors)
    assert row["ids"] == 3
    assert row["p_at_1_forward"] == pytest.approx(2 / 3)  # a -> b wrong, b -> b, c -> c
    # English a's column is all zeros: argmax takes the first row (a), right; b's column ties a and b -> a, wrong
    assert row["p_at_1_backward"] == pytest.approx(2 / 3)
    assert row["cosine_same_id"] == pytest.approx((0 + 1 + 1) / 3)
    assert row["cosine_other_ids"] == pytest.approx(1 / 6)  # only (a, b) among the 6 other-id cells is 1
    assert row["median_length_ratio"] == pytest.approx(1.0)


def test_pair_row_needs_two_shared_ids():
    assert pair_row({"a": "x"}, {"a": "y", "b": "z"}, {"x": np.ones(2), "y": np.ones(2), "z": np.ones(2)}) is None


def test_a_selection_without_a_shared_pair_is_refused_in_one_line_before_encoding():
    with pytest.raises(DataError, match=r"^--languages / --max_ids: no language pair shares two or more ids"):
        main(["--languages", "en", "--model", "/nonexistent", "--docs_dir", ""])  # the model is never loaded


def test_the_table_holds_each_pair_of_the_encoded_answers_and_names_the_precision(tiny_model_dir, tmp_path):
    from translation_check import answers_by_language

    from hbt_accel.evaluation.encoding import encode_texts
    from hbt_accel.models.dual_encoder import DualEncoder

    arguments = ["--model", str(tiny_model_dir), "--languages", "en,de", "--max_ids", "80", "--precision", "no"]
    main([*arguments, "--docs_dir", str(tmp_path), "--output", str(tmp_path / "pairs.json")])
    written = json.loads((tmp_path / "pairs.json").read_text())
    assert written["precision"] == "fp32" and list(written["pairs"]) == ["de-en"]

    answers = answers_by_language("", ["en", "de"], 80)
    texts = sorted({text for by_id in answers.values() for text in by_id.values()})
    encoded = encode_texts(DualEncoder.from_pretrained(str(tiny_model_dir)), texts, "passage", bf16=False)
    expected = pair_row(answers["de"], answers["en"], dict(zip(texts, encoded)))
    assert 2 <= expected["ids"] <= 80 and written["pairs"]["de-en"] == pytest.approx(expected)
    section = (tmp_path / "results.md").read_text()
    assert "fp32 encoding: for each language pair" in section and f"| de-en | {expected['ids']} |" in section
