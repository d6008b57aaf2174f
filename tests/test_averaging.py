"""Weight averaging of finished runs (recipes/average.py): the mean of every tensor, a loadable folder, one-line
refusals before anything is written."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hbt_accel.errors import ConfigError, DataError
from hbt_accel.models.dual_encoder import SETTINGS_FILE, DualEncoder
from hbt_accel.run_record import CONFIG_FILE
from hbt_accel.training.averaging import SOURCES_FILE, average_models
from tests.conftest import load_tiny_encoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir, xlmr_tokenizer) -> list[Path]:
    """Two saved models of one architecture and settings, their weights moved apart by different noise."""
    folders = []
    for seed in (1, 2):
        encoder = load_tiny_encoder(tiny_model_dir, xlmr_tokenizer)
        # short texts: the soup benchmark encodes mlqa-r:validation's 4,057 passages with each model
        encoder.settings = dataclasses.replace(encoder.settings, query_max_length=32, passage_max_length=48)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in encoder.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        folder = tmp_path_factory.mktemp(f"run{seed}")
        encoder.save_pretrained(folder)
        (folder / CONFIG_FILE).write_text("train_data: [mlqa-r:train]\n")  # what the soup benchmark checks
        folders.append(folder)
    return folders


def test_the_average_holds_the_mean_of_every_tensor_and_loads_like_a_trained_model(two_runs, tmp_path):
    output = average_models(two_runs, tmp_path / "soup")
    states = [DualEncoder.from_pretrained(run).state_dict() for run in two_runs]
    averaged = DualEncoder.from_pretrained(output)
    for name, tensor in averaged.state_dict().items():
        torch.testing.assert_close(tensor, (states[0][name] + states[1][name]) / 2, rtol=0, atol=1e-7)
    assert json.loads((output / SOURCES_FILE).read_text())["runs"] == [str(run.resolve()) for run in two_runs]
    texts = ["Wo liegt Berlin?", "Berlin is the capital of Germany."]
    from sentence_transformers import SentenceTransformer

    through_st = SentenceTransformer(str(output), device="cpu", local_files_only=True)
    expected = averaged.encode(texts, kind="passage")
    torch.testing.assert_close(
        torch.from_numpy(through_st.encode(texts, prompt_name="passage")),
        torch.from_numpy(expected),
        atol=1e-5,
        rtol=0,
    )


def test_runs_of_different_settings_or_models_are_refused_in_one_line_before_writing(two_runs, tmp_path):
    other = tmp_path / "other"
    DualEncoder.from_pretrained(two_runs[0]).save_pretrained(other)
    settings = json.loads((other / SETTINGS_FILE).read_text())
    (other / SETTINGS_FILE).write_text(json.dumps({**settings, "pooling": "cls"}))
    with pytest.raises(DataError, match=r"other: encoder settings differ from .* in pooling"):
        average_models([two_runs[0], other], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
    shallower = tmp_path / "shallower"
    DualEncoder.from_pretrained(two_runs[0], num_layers=1).save_pretrained(shallower)
    for runs in ([two_runs[0], shallower], [shallower, two_runs[0]]):  # either order
        with pytest.raises(DataError, match=r"tensor backbone.encoder.layer.1.\S+ is only (here|in .*run1)"):
            average_models(runs, tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
    with pytest.raises(ConfigError, match="is listed twice"):
        average_models([two_runs[0], two_runs[1], two_runs[0]], tmp_path / "soup")
    with pytest.raises(ConfigError, match="give two or more model folders"):
        average_models([two_runs[0]], tmp_path / "soup")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("user data")
    with pytest.raises(ConfigError, match="is not an empty folder"):
        average_models(two_runs, taken)
    with pytest.raises(ConfigError, match="is not an empty folder"):
        average_models(two_runs, taken / "notes.txt")
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_runs_of_another_recipe_are_refused_naming_the_fields(two_runs, tmp_path):
    """Only the seed and the output folder may differ between the runs of a soup (the README's promise)."""
    import shutil

    other = tmp_path / "other_recipe"
    shutil.copytree(two_runs[1], other)
    (two_runs[0] / CONFIG_FILE).write_text("train_data: [mlqa-r:train]\nseed: 1\noutput_dir: runs/a\n")
    (other / CONFIG_FILE).write_text("train_data: [mlqa-r:train]\nseed: 2\noutput_dir: runs/b\nalpha: 0.25\n")
    with pytest.raises(
        DataError, match=r"other_recipe: trained with another recipe than .*run1.* \(alpha None -> 0.25\)"
    ):
        average_models([two_runs[0], other], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
    (other / CONFIG_FILE).write_text("train_data: [mlqa-r:train]\nseed: 2\noutput_dir: runs/b\n")
    assert average_models([two_runs[0], other], tmp_path / "soup").is_dir()  # seed and output_dir may differ
    (two_runs[0] / CONFIG_FILE).write_text("train_data: [mlqa-r:train]\n")


def test_the_command_line_reports_a_folder_that_is_not_a_model_in_one_line(tmp_path, two_runs):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "recipes" / "average.py"),
            "--runs",
            f"{two_runs[0]},{tmp_path}",
            "--output_dir",
            "x",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {tmp_path}: not a saved hbt_accel model (expected {SETTINGS_FILE} and config.json)"
    )


def test_the_soup_benchmark_scores_runs_and_average_alike_and_tests_the_average_paired(two_runs, tmp_path):
    """benchmarks/weight_averaging.py: every run and the average are scored on the same questions, and the paired
    row against the runs' mean is the average's figure minus the mean of the runs' figures."""
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    from weight_averaging import main

    from hbt_accel.data import load_lareqa_benchmark
    from hbt_accel.evaluation import evaluate_grid
    from hbt_accel.evaluation.statistics import weighted_headline

    def headline(folder):
        per_query: list = []
        questions = load_lareqa_benchmark("mlqa-r:validation")
        evaluate_grid(DualEncoder.from_pretrained(folder), questions, max_queries=6, bf16=False, per_query=per_query)
        return weighted_headline(per_query[0], np.ones(len(per_query[0].query_ids)))[:, 0]

    arguments = [
        "--runs",
        ",".join(map(str, two_runs)),
        "--max_queries",
        "6",
        "--bootstrap",
        "200",
        "--precision",
        "no",
    ]
    main([*arguments, "--output_dir", str(tmp_path / "soup"), "--docs_dir", str(tmp_path)])
    lines = (tmp_path / "results.md").read_text().splitlines()
    average, scores = headline(tmp_path / "soup"), [headline(run) for run in two_runs]
    soup_row = next(line for line in lines if line.startswith("| **weight average** |")).split(" | ")
    assert soup_row[1:4] == [f"{average[k]:.3f}" for k in range(3)]  # mono, cross, multi mAP
    run_row = next(line for line in lines if line.startswith(f"| {two_runs[1].name} | ")).split(" | ")
    assert run_row[1:4] == [f"{scores[1][k]:.3f}" for k in range(3)]
    mean_row = next(line for line in lines if line.startswith("| the runs' mean |")).split(" | ")
    for k in range(3):
        gap = average[k] - (scores[0][k] + scores[1][k]) / 2
        assert mean_row[1 + k].startswith(f"{gap:+.3f} [")
    assert "mlqa-r:validation` (6 question ids" in "\n".join(lines) and "languages, fp32 encoding)" in "\n".join(lines)
    assert re.search(r"^Paired bootstrap over [2-6] articles \(200 resamples\)", "\n".join(lines), re.MULTILINE)


def test_the_soup_benchmark_refuses_an_unknown_benchmark_in_one_line_before_averaging(two_runs, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from weight_averaging import main

    arguments = ["--runs", ",".join(map(str, two_runs)), "--benchmark", "xquad-s", "--docs_dir", ""]
    with pytest.raises(DataError, match=r"^xquad-s: not a benchmark name"):
        main([*arguments, "--output_dir", str(tmp_path / "soup")])
    assert not (tmp_path / "soup").exists()


def test_the_soup_benchmark_refuses_runs_that_trained_on_the_benchmarks_questions(two_runs, tmp_path):
    """The default recipe trains on all of MLQA-R: its runs cannot be compared on mlqa-r:validation."""
    import shutil

    sys.path.insert(0, str(REPO / "benchmarks"))
    from weight_averaging import main

    leaky = shutil.copytree(two_runs[1], tmp_path / "leaky")
    (leaky / CONFIG_FILE).write_text("train_data: [mlqa-r]\n")
    arguments = ["--runs", f"{two_runs[0]},{leaky}", "--docs_dir", "", "--output_dir", str(tmp_path / "soup")]
    with pytest.raises(DataError, match=r"leaky/hbt_config.yaml: train_data mlqa-r holds questions of --benchmark"):
        main(arguments)
    assert not (tmp_path / "soup").exists()
