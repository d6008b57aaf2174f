"""Sweeps: recipe checks, points and commands, a real 2-point sweep through submitit's local executor, skip of
finished points, resume of a killed one, a failed point reported, and a report that re-renders identically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hbt_accel.config import ConfigError
from hbt_accel.sweep import load_sweep, point_command, run_sweep, sweep_points

REPO = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path: Path, **content) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "recipes/default.yaml", **content}, sort_keys=False))
    return path


def test_every_committed_sweep_recipe_parses_and_lists_its_points():
    for recipe in sorted((REPO / "recipes" / "sweeps").glob("*.yaml")):
        spec = load_sweep(recipe)
        points = sweep_points(spec)
        assert len(points) == len({p.name for p in points}) >= 3, recipe
    data_ratio = load_sweep(REPO / "recipes" / "sweeps" / "data_ratio.yaml")
    assert [p.name for p in sweep_points(data_ratio)][:2] == ["alpha-0.0__seed-1", "alpha-0.25__seed-1"]
    assert len(sweep_points(data_ratio)) == 5 * 3


@pytest.mark.parametrize(
    "content, message",
    [
        ({"axes": {"alpha": [0.5]}, "sedes": [1]}, "unknown key 'sedes'"),
        ({"axes": {"alpah": [0.5]}}, "'alpah' is not a training config field"),
        ({"axes": {"alpha": [0.5, 1.5]}}, "point alpha-1.5__seed-1: alpha: got 1.5, expected a probability"),
        ({"axes": {"alpha": 0.5}}, "axes.alpha: expected a non-empty list"),
        ({}, "give either axes (a product) or points (a list), not neither"),
        ({"axes": {"alpha": [0.5]}, "executor": "slurmm"}, "executor: got 'slurmm'"),
    ],
)
def test_a_bad_sweep_recipe_fails_in_one_line_before_anything_runs(tmp_path, content, message):
    with pytest.raises(ConfigError) as error:
        load_sweep(write_sweep(tmp_path, **content))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_points_are_the_product_of_the_axes_times_the_seeds(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, axes={"sampling": ["xx", "hybrid"], "alpha": [0.25, 0.5]}, seeds=[7, 8]))
    names = [p.name for p in sweep_points(spec)]
    assert len(names) == 2 * 2 * 2
    assert names[:2] == ["sampling-xx__alpha-0.25__seed-7", "sampling-xx__alpha-0.5__seed-7"]  # seed-major
    command = point_command(spec, sweep_points(spec)[0], resume=True)
    assert command[:2] == ["accelerate", "launch"]
    assert command[-2:] == ["--resume_from_checkpoint", "latest"]
    assert ["--seed", "7"] == command[command.index("--seed") : command.index("--seed") + 2]


@pytest.fixture
def tiny_sweep(tmp_path, tiny_model_dir, mlqa_slice) -> Path:
    """2 points (xx, hybrid) x 1 seed of 4 steps on the tiny model, scored on 10 ids in all 11 languages."""
    overrides = {
        "model_name_or_path": str(tiny_model_dir),
        "train_data": [str(mlqa_slice)],
        "max_steps": 4,
        "per_device_train_batch_size": 16,
        "learning_rate": 2e-3,
        "mixed_precision": "no",
        "freeze_word_embeddings": False,
        "query_max_length": 32,
        "passage_max_length": 48,
        "eval_steps": 2,
        "eval_languages": ["en", "de"],
        "eval_max_queries": 10,
        "final_eval_max_queries": 10,
        "logging_steps": 1,
    }
    return write_sweep(
        tmp_path,
        name="tiny",
        axes={"sampling": ["xx", "hybrid"]},
        seeds=[1],
        overrides=overrides,
        save_steps=2,
        executor="submitit",
        cluster="local",
        output_dir=str(tmp_path / "runs"),
        results_dir=str(tmp_path / "results"),
        compare=[{"field": "sampling", "a": "hybrid", "b": "xx"}],
    )


def test_a_sweep_runs_through_submitit_skips_finished_points_and_resumes_a_killed_one(tiny_sweep, tmp_path):
    from hbt_accel.sweep_report import write_report

    spec = load_sweep(tiny_sweep)
    status = run_sweep(spec)
    assert status.ran == ["sampling-xx__seed-1", "sampling-hybrid__seed-1"] and not status.failed
    assert list((tmp_path / "runs" / "submitit").iterdir())  # the jobs went through submitit's folders
    summary = json.loads((tmp_path / "results" / "sampling-hybrid__seed-1.json").read_text())
    assert summary["settings"] == {"sampling": "hybrid", "seed": 1} and summary["steps"] == 4
    assert summary["final"]["n_queries"] == 11 * 10 and [e["step"] for e in summary["evaluations"]] == [0, 2]

    # a second run trains nothing
    again = run_sweep(spec)
    assert again.ran == [] and len(again.finished) == 2

    # "kill" the hybrid point after its checkpoint at step 2: no summary, no final model; the next run resumes it
    run_dir = tmp_path / "runs" / "sampling-hybrid__seed-1"
    (tmp_path / "results" / "sampling-hybrid__seed-1.json").unlink()
    for name in ("train_summary.json", "eval_results.json", "model.safetensors"):
        (run_dir / name).unlink()
    resumed = run_sweep(spec)
    assert resumed.ran == ["sampling-hybrid__seed-1"]
    log = "".join(p.read_text() for p in (tmp_path / "runs" / "submitit").rglob("*.out"))
    assert "resumed from" in log and "at step 2" in log
    assert json.loads((tmp_path / "results" / "sampling-hybrid__seed-1.json").read_text())["steps"] == 4

    # the report: per-setting statistics and the paired test, re-rendered identically from the summaries alone
    shutil.rmtree(tmp_path / "runs")
    paths = write_report(spec)
    first = {p.name: p.read_bytes() for p in paths}
    report = json.loads((tmp_path / "results" / "report.json").read_text())
    assert [row["settings"] for row in report["settings"]] == [{"sampling": "xx"}, {"sampling": "hybrid"}]
    assert report["settings"][1]["multi_map"]["mean"] == pytest.approx(summary["final"]["multi_map"])
    (test,) = report["paired_tests"]
    assert test["comparison"] == "sampling: hybrid minus xx"
    xx = report["settings"][0]["multi_map"]["mean"]
    assert test["multi_map"]["difference"] == pytest.approx(report["settings"][1]["multi_map"]["mean"] - xx)
    assert {p.name: p.read_bytes() for p in write_report(spec)} == first


def test_a_failing_point_is_reported_and_the_others_still_run(tmp_path, tiny_model_dir, mlqa_slice):
    path = write_sweep(
        tmp_path,
        name="failing",
        points=[{"train_data": [str(tmp_path / "missing.jsonl")]}, {"train_data": [str(mlqa_slice)]}],
        seeds=[1],
        overrides={
            "model_name_or_path": str(tiny_model_dir),
            "max_steps": 1,
            "per_device_train_batch_size": 16,
            "mixed_precision": "no",
            "freeze_word_embeddings": False,
            "final_eval_max_queries": 5,
        },
        output_dir=str(tmp_path / "runs"),
        results_dir=str(tmp_path / "results"),
    )
    spec = load_sweep(path)
    status = run_sweep(spec, echo=lambda line: None)
    (failed,) = status.failed
    assert "missing.jsonl" in failed and "training data file not found" in status.failed[failed]
    assert status.ran == [sweep_points(spec)[1].name]
