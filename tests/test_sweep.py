"""Sweeps: recipe checks, points and commands, a real 2-point sweep through submitit's local executor, skip of
finished points, resume of a killed one, a failed point reported, and a report that re-renders identically; several
base recipes with their own launch settings (the backbones plan), and the report's numbers on synthetic points."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from hbt_accel.config import ConfigError
from hbt_accel.run_record import code_version, find_checkpoints
from hbt_accel.sweeps.run import collect_point, load_sweep, point_command, point_resources, run_sweep, sweep_points

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
    model_size = load_sweep(REPO / "recipes" / "sweeps" / "model_size.yaml")
    names = [p.name for p in sweep_points(model_size)]
    assert len(names) == 4 * 3 * 3 and names[:2] == [
        "num_layers-3__sampling-xx__seed-1",
        "num_layers-3__sampling-xy__seed-1",
    ]
    assert {p.as_dict()["num_layers"] for p in sweep_points(model_size)} == {3, 6, 9, 12}
    backbones = load_sweep(REPO / "recipes" / "sweeps" / "backbones.yaml")
    assert len(sweep_points(backbones)) == 4 * 3 * 3


@pytest.mark.parametrize(
    "content, message",
    [
        ({"axes": {"alpha": [0.5]}, "sedes": [1]}, "unknown key 'sedes'"),
        ({"axes": {"alpah": [0.5]}}, "'alpah' is not a training config field"),
        ({"axes": {"alpha": [0.5, 1.5]}}, "point alpha-1.5__seed-1: alpha: got 1.5, expected a probability"),
        ({"axes": {"alpha": 0.5}}, "axes.alpha: expected a non-empty list"),
        ({}, "give either axes (a product) or points (a list), not neither"),
        ({"axes": {"alpha": [0.5]}, "executor": "slurmm"}, "executor: got 'slurmm'"),
        ({"axes": {"alpha": [0.5]}, "executor": "submitit", "cluster": "slurmm"}, "cluster: got 'slurmm'"),
        ({"axes": {"alpha": [0.5]}, "compare": [{"a": 0.5}]}, "compare[0]: expected {field, a, b} (two values"),
        ({"axes": {"alpha": [0.5]}, "keep_checkpoints": "no"}, "keep_checkpoints: got 'no', expected true or false"),
        (
            {"axes": {"alpha": [0.5, 1.0]}, "compare": [{"field": "alpha", "a": 0.5, "b": 0.3}]},
            "compare[0]: b: no point of the sweep sweep has alpha: 0.3",
        ),
        (
            {"points": [{"alpha": 0.5}], "compare": [{"a": {"alpha": 0.5}, "b": {"alpah": 0.5}}]},
            "compare[0]: b: no point of the sweep sweep has {'alpah': 0.5}",
        ),
    ],
)
def test_a_bad_sweep_recipe_fails_in_one_line_before_anything_runs(tmp_path, content, message):
    with pytest.raises(ConfigError) as error:
        load_sweep(write_sweep(tmp_path, **content))
    assert message in str(error.value) and "\n" not in str(error.value)


def write_bases_sweep(tmp_path: Path, bases: list, **content) -> Path:
    path = tmp_path / "bases.yaml"
    path.write_text(yaml.safe_dump({"bases": bases, "axes": {"sampling": ["xx", "hybrid"]}, **content}))
    return path


XLMR = "recipes/xlm-roberta-base/hybrid.yaml"


@pytest.mark.parametrize(
    "bases, content, message",
    [
        ([XLMR], {"base": "recipes/default.yaml"}, "give either base (one recipe) or bases (a list), not both"),
        ([{"recipe": XLMR, "gpus": 1}], {}, "bases[0]: unknown key 'gpus'"),
        ([XLMR, "recipes/xlm-roberta-base/xx.yaml"], {}, "bases[1]: a second base named 'xlm-roberta-base'"),
        (
            [{"recipe": XLMR, "accelerate_config": "accelerate_configs/nope.yaml"}],
            {},
            "accelerate_config: file not found",
        ),
        (
            [{"recipe": XLMR, "num_processes": 8, "submitit": {"gpus_per_node": 4}}],
            {},
            "num_processes 8 but submitit gpus_per_node 4",
        ),
        ([{"recipe": XLMR, "overrides": {"alpah": 0.5}}], {}, "'alpah' is not a training config field"),
        (
            [XLMR],
            {"executor": "submitit", "submitit": {"slurm_partiton": "gpu"}},
            "submitit: Unknown argument 'partiton'",
        ),
        (["recipes/nope/hybrid.yaml"], {}, "point base-nope__sampling-xx__seed-1: --config: file not found"),
    ],
)
def test_a_bad_list_of_bases_fails_in_one_line_before_anything_runs(tmp_path, bases, content, message):
    with pytest.raises(ConfigError) as error:
        load_sweep(write_bases_sweep(tmp_path, bases, **content))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bases_are_the_first_setting_and_bring_their_own_launch_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # recipes/ and accelerate_configs/ are found in the repo from any folder
    bases = [
        {"recipe": XLMR, "accelerate_config": "accelerate_configs/single_gpu.yaml", "submitit": {"timeout_min": 90}},
        {
            "recipe": "recipes/default.yaml",
            "name": "e5-small",
            "num_processes": 2,
            "overrides": {"max_steps": 5},
            "submitit": {"gpus_per_node": 2},
        },
    ]
    spec = load_sweep(
        write_bases_sweep(
            tmp_path, bases, seeds=[4], accelerate_config="accelerate_configs/cpu_ddp.yaml", submitit={"mem_gb": 8}
        )
    )
    points = sweep_points(spec)
    assert [p.name for p in points] == [
        "base-xlm-roberta-base__sampling-xx__seed-4",
        "base-xlm-roberta-base__sampling-hybrid__seed-4",
        "base-e5-small__sampling-xx__seed-4",
        "base-e5-small__sampling-hybrid__seed-4",
    ]
    assert points[0].as_dict() == {"base": "xlm-roberta-base", "sampling": "xx", "seed": 4}
    xlmr, e5 = point_command(spec, points[0]), point_command(spec, points[3])
    assert xlmr[:4] == ["accelerate", "launch", "--config_file", str(REPO / "accelerate_configs" / "single_gpu.yaml")]
    assert xlmr[xlmr.index("--config") + 1] == str(REPO / XLMR) and "--max_steps" not in xlmr
    # the base without its own accelerate config gets the sweep's, its process count, its overrides
    assert e5[:6] == [
        "accelerate",
        "launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
        "--num_processes",
        "2",
    ]
    assert e5[e5.index("--config") + 1] == str(REPO / "recipes" / "default.yaml")
    assert e5[e5.index("--max_steps") + 1] == "5" and e5[e5.index("--sampling") + 1] == "hybrid"
    assert point_resources(spec, points[0]) == {
        "name": "bases-base-xlm-roberta-base__sampling-xx__seed-4",
        "timeout_min": 90,
        "mem_gb": 8,
    }
    assert point_resources(spec, points[3])["gpus_per_node"] == 2
    assert point_resources(spec, points[3])["timeout_min"] == 24 * 60  # a day unless the sweep or base says


def _dry_run(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`recipes/sweep.py --dry_run` as a user runs it, on a machine without GPU, Hub access or model weights."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(REPO / "recipes" / "sweep.py"), "--config", str(config), "--dry_run"]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)


def test_the_backbones_dry_run_prints_every_point_with_its_command_and_slurm_request(tmp_path):
    result = _dry_run(REPO / "recipes" / "sweeps" / "backbones.yaml", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "sweep backbones: 0 finished, 36 to run"
    commands = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in lines if ": accelerate launch" in line}
    requests = [line.strip() for line in lines if line.startswith("    submitit: ")]
    assert len(commands) == len(requests) == 4 * 3 * 3
    assert {name.split("__")[0] for name in commands} == {
        "base-xlm-roberta-base",
        "base-labse",
        "base-multilingual-e5-large",
        "base-qwen3-embedding-4b",
    }
    qwen = "base-qwen3-embedding-4b__sampling-xy__seed-2"
    run = tmp_path / "runs" / "sweeps" / "backbones" / qwen
    assert commands[qwen].split() == [
        *("accelerate", "launch", "--config_file", str(REPO / "accelerate_configs" / "deepspeed_zero3.yaml")),
        *("--num_processes", "8", str(REPO / "recipes" / "train_hybrid.py")),
        *("--config", str(REPO / "recipes" / "qwen3-embedding-4b" / "hybrid_lora_zero3.yaml")),
        *(
            "--save_steps",
            "50",
            "--save_total_limit",
            "1",
            "--sampling",
            "xy",
            "--seed",
            "2",
            "--output_dir",
            str(run),
        ),
    ]
    xlmr = commands["base-xlm-roberta-base__sampling-xx__seed-1"].split()
    assert xlmr[3] == str(REPO / "accelerate_configs" / "single_gpu.yaml") and "--num_processes" not in xlmr
    request = lines[lines.index(f"{qwen}: {commands[qwen]}") + 1]
    assert "gpus_per_node=8" in request and "timeout_min=180" in request and "slurm_partition=gpu" in request
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_the_model_size_dry_run_lists_its_36_points(tmp_path):
    result = _dry_run(REPO / "recipes" / "sweeps" / "model_size.yaml", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if ": accelerate launch" in line]
    assert len(lines) == 36 and lines[-1].startswith("num_layers-12__sampling-hybrid__seed-3: ")
    first = lines[0].split(": ", 1)[1].split()
    assert first[first.index("--num_layers") + 1] == "3" and first[first.index("--sampling") + 1] == "xx"


def test_points_are_the_product_of_the_axes_times_the_seeds(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, axes={"sampling": ["xx", "hybrid"], "alpha": [0.25, 0.5]}, seeds=[7, 8]))
    names = [p.name for p in sweep_points(spec)]
    assert len(names) == 2 * 2 * 2
    assert names[:2] == ["sampling-xx__alpha-0.25__seed-7", "sampling-xx__alpha-0.5__seed-7"]  # seed-major
    command = point_command(spec, sweep_points(spec)[0], ["--resume_from_checkpoint", "latest"])
    assert command[:2] == ["accelerate", "launch"]
    assert command[-2:] == ["--resume_from_checkpoint", "latest"]
    assert ["--seed", "7"] == command[command.index("--seed") : command.index("--seed") + 2]


def test_a_dry_run_lists_every_point_with_its_command_and_marks_the_finished_ones(tmp_path):
    path = write_sweep(tmp_path, axes={"sampling": ["xx", "hybrid"]}, seeds=[1], results_dir=str(tmp_path / "results"))
    spec = load_sweep(path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "sampling-xx__seed-1.json").write_text("{}")
    lines = []
    status = run_sweep(spec, dry_run=True, echo=lines.append)
    assert status.finished == ["sampling-xx__seed-1"] and not status.ran
    assert lines[0] == f"sweep {spec.name}: 1 finished, 1 to run"
    assert lines[1].startswith("sampling-xx__seed-1 (finished, skipped): accelerate launch ")
    assert lines[2].startswith("sampling-hybrid__seed-1: accelerate launch ")
    assert "--resume_from_checkpoint" not in lines[1] + lines[2]


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
        "eval_precision": "no",
        "freeze_word_embeddings": False,
        "query_max_length": 32,
        "passage_max_length": 48,
        "eval_steps": 2,
        "eval_languages": ["en", "de"],
        "eval_max_queries": 10,
        "eval_corpus_passages": 40,  # the periodic pool: the 10 gold sentences per language and a sample of the rest
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
        keep_checkpoints=True,  # the resume below needs one; the default deletion is checked at the end
        executor="submitit",
        cluster="local",
        output_dir=str(tmp_path / "runs"),
        results_dir=str(tmp_path / "results"),
        compare=[{"field": "sampling", "a": "hybrid", "b": "xx"}],
    )


def test_a_sweep_runs_through_submitit_skips_finished_points_and_resumes_a_killed_one(
    tiny_sweep, tmp_path, monkeypatch
):
    from hbt_accel.sweeps import run as sweep
    from hbt_accel.sweeps.report import write_report

    monkeypatch.setattr(sweep, "POLL_SECONDS", 0.2)  # the jobs take seconds; waiting 2 s per poll is most of the rest

    spec = load_sweep(tiny_sweep)
    status = run_sweep(spec)
    assert status.ran == ["sampling-xx__seed-1", "sampling-hybrid__seed-1"] and not status.failed
    assert list((tmp_path / "runs" / "submitit").iterdir())  # the jobs went through submitit's folders
    summary = json.loads((tmp_path / "results" / "sampling-hybrid__seed-1.json").read_text())
    assert summary["settings"] == {"sampling": "hybrid", "seed": 1} and summary["steps"] == 4
    assert summary["final"]["n_queries"] == 11 * 10 and [e["step"] for e in summary["evaluations"]] == [0, 2, 4]
    assert summary["precision"] == {"training": "no", "evaluation": "no"}  # as run, so points can be told apart
    assert summary["code"] == code_version()  # and the code that trained it: a seed's draws can change with it

    # a second run trains nothing
    again = run_sweep(spec)
    assert again.ran == [] and len(again.finished) == 2
    # a point that ran to the end but was not collected (the sweep died in between) is collected, not rerun
    xx_summary = tmp_path / "results" / "sampling-xx__seed-1.json"
    collected = xx_summary.read_bytes()
    xx_summary.unlink()
    assert run_sweep(spec, dry_run=True).finished == ["sampling-xx__seed-1", "sampling-hybrid__seed-1"]
    assert not xx_summary.exists()  # a dry run writes nothing
    again = run_sweep(spec)
    assert again.ran == [] and len(again.finished) == 2 and xx_summary.read_bytes() == collected

    # "kill" the hybrid point after its checkpoint at step 2: no summary, no final model; the next run resumes it
    run_dir = tmp_path / "runs" / "sampling-hybrid__seed-1"
    (tmp_path / "results" / "sampling-hybrid__seed-1.json").unlink()
    for name in ("train_summary.json", "eval_results.json", "model.safetensors"):
        (run_dir / name).unlink()
    resumed = run_sweep(spec)
    assert resumed.ran == ["sampling-hybrid__seed-1"]
    log = (tmp_path / "runs" / "sampling-hybrid__seed-1.log").read_text()  # the command writes to its point's log
    assert "resumed from" in log and "at step 2" in log
    assert json.loads((tmp_path / "results" / "sampling-hybrid__seed-1.json").read_text())["steps"] == 4

    # by default, collecting a point deletes its checkpoints (resume-only state) and keeps its model and summary
    hybrid_summary = (tmp_path / "results" / "sampling-hybrid__seed-1.json").read_bytes()
    assert find_checkpoints(run_dir)
    hybrid = next(point for point in sweep_points(spec) if point.name == "sampling-hybrid__seed-1")
    collect_point(dataclasses.replace(spec, keep_checkpoints=False), hybrid)
    assert find_checkpoints(run_dir) == [] and (run_dir / "model.safetensors").is_file()
    assert (tmp_path / "results" / "sampling-hybrid__seed-1.json").read_bytes() == hybrid_summary

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


class FakeJob:
    """A submitit job that finishes after `polls` calls of done(); result() raises when it failed."""

    def __init__(self, name: str, polls: int, fails: bool, events: list):
        self.name, self.polls, self.fails, self.events = name, polls, fails, events

    def done(self) -> bool:
        self.polls -= 1
        return self.polls <= 0

    def result(self):
        self.events.append(f"end {self.name}")
        if self.fails:
            raise RuntimeError(f"Job {self.name} failed\nTraceback ...\nerror: out of memory")


def test_max_parallel_keeps_that_many_jobs_in_flight_and_submits_the_next_as_one_ends(tmp_path, monkeypatch):
    import hbt_accel.sweeps.run as sweep

    spec = load_sweep(
        write_sweep(
            tmp_path, axes={"alpha": [0.0, 0.5, 1.0]}, seeds=[1], executor="submitit", cluster="local", max_parallel=2
        )
    )
    events, polls = [], {"alpha-0.0__seed-1": 3, "alpha-0.5__seed-1": 1, "alpha-1.0__seed-1": 1}

    def submit(spec, point, command):
        events.append(f"submit {point.name}")
        return FakeJob(point.name, polls[point.name], point.name == "alpha-0.5__seed-1", events)

    monkeypatch.setattr(sweep, "_submit", submit)
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0)
    monkeypatch.setattr(sweep, "collect_point", lambda spec, point: events.append(f"collect {point.name}"))
    status = run_sweep(spec, echo=lambda line: None)
    assert events == [
        "submit alpha-0.0__seed-1",
        "submit alpha-0.5__seed-1",  # two in flight
        "end alpha-0.5__seed-1",  # the short one ends (failed) ...
        "submit alpha-1.0__seed-1",  # ... and the third takes its place
        "end alpha-1.0__seed-1",
        "collect alpha-1.0__seed-1",
        "end alpha-0.0__seed-1",
        "collect alpha-0.0__seed-1",
    ]
    assert status.ran == ["alpha-1.0__seed-1", "alpha-0.0__seed-1"]
    assert list(status.failed) == ["alpha-0.5__seed-1"] and status.failed["alpha-0.5__seed-1"].endswith(
        "out of memory"
    )


def test_max_parallel_needs_submitit(tmp_path):
    with pytest.raises(ConfigError, match="max_parallel: 2 needs executor: submitit"):
        load_sweep(write_sweep(tmp_path, axes={"alpha": [0.5]}, max_parallel=2))


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
            "query_max_length": 32,
            "passage_max_length": 48,  # the final evaluation encodes every XQuAD-R passage
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


# ---------------------------------------------------------------------------------------------------------------------
# The report on synthetic points: numbers computed by hand
# ---------------------------------------------------------------------------------------------------------------------
T_975_2 = 4.302652729911275  # the 97.5% quantile of Student's t with 2 degrees of freedom (3 seeds)
WORD_EMBEDDINGS, LAYER, OTHER = 96_014_208, 1_774_464, 198_144  # e5-small: 250,037 x 384; one layer; the rest


def synthetic_scores(multi_ap_by_id: list[float]):
    """en and th queries of len(multi_ap_by_id) question ids: every query ranks its gold sentence first in every pool
    (mono = cross mAP = 1); question i has multilingual AP multi_ap_by_id[i] in both languages."""
    from hbt_accel.evaluation.grid import PerQueryScores

    ids = [f"q{i}" for i in range(len(multi_ap_by_id))]
    rows = 2 * len(ids)
    return PerQueryScores(
        benchmark="xquad-r",
        languages=["en", "th"],
        query_ids=ids + ids,
        query_language=np.repeat([0, 1], len(ids)),
        pair_ranks=np.ones((rows, 2)),
        multi_ap=np.array(multi_ap_by_id * 2, dtype=float),
        multi_distance=np.zeros(rows),
    )


BF16 = {"training": "bf16", "evaluation": "bf16"}


def test_report_numbers_keep_12_significant_digits_so_another_cpus_last_bits_do_not_show():
    from hbt_accel.sweeps.report import rounded

    # two sums of the same numbers in another order differ in the last bit; rounded, they agree
    assert 0.1 + 0.2 != 0.3 and rounded(0.1 + 0.2) == 0.3
    nested = {"gap": [-0.004319260641056676, (0.25, 3)], "p": 1e-20, "label": "en,de", "n": 3, "ok": True}
    assert rounded(nested) == {"gap": [-0.00431926064106, [0.25, 3]], "p": 1e-20, "label": "en,de", "n": 3, "ok": True}
    assert math.isnan(rounded(math.nan))


def test_the_report_of_synthetic_points_gives_hand_computed_statistics_and_the_gap_by_parameter_count(tmp_path):
    """2 depths x {xx, hybrid} x 3 seeds. X-X multi mAP is 0.3 + 0.1 x seed on every question. Hybrid adds 0.1 to
    every question at 1 layer (a gap with no spread: its interval is the point) and 0, .1, .2, .3 to questions
    q0..q3 at 2 layers (gap .15)."""
    from hbt_accel.atomic import write_json
    from hbt_accel.evaluation.grid import summarize
    from hbt_accel.sweeps.report import write_report
    from hbt_accel.sweeps.run import point_summary, summary_path

    spec = load_sweep(
        write_sweep(
            tmp_path,
            name="sizes",
            axes={"num_layers": [1, 2], "sampling": ["xx", "hybrid"]},
            seeds=[1, 2, 3],
            results_dir=str(tmp_path / "results"),
            compare=[{"field": "sampling", "a": "hybrid", "b": "xx"}],
            language_groups={"thai": ["th"]},
        )
    )
    spec.results_root.mkdir()
    for point in sweep_points(spec):
        settings = point.as_dict()
        layers, seed = settings["num_layers"], settings["seed"]
        gain = {"xx": [0.0] * 4, "hybrid": [0.1] * 4 if layers == 1 else [0.0, 0.1, 0.2, 0.3]}[settings["sampling"]]
        scores = synthetic_scores([0.3 + 0.1 * seed + g for g in gain])
        parameters = {
            "total": WORD_EMBEDDINGS + OTHER + layers * LAYER,
            "word_embeddings": WORD_EMBEDDINGS,
            "without_word_embeddings": OTHER + layers * LAYER,
            "trainable": OTHER + layers * LAYER,
            "layers": layers,
        }
        evaluations = [{"step": s, "multi_map": m} for s, m in ((0, 0.2), (40, 0.5), (80, 0.5))]
        # seeds 1-2 on one machine with no precision recorded (older summaries), seed 3 on another: 1, 4, 9 minutes
        machine = {"device": "cpu (A)"} if seed < 3 else {"device": "cpu (B)", "precision": BF16}
        train_summary = {"evaluations": evaluations, "steps": 80, "train_seconds": 60.0 * seed**2, **machine}
        summary = point_summary(spec, point, {**train_summary, "parameters": parameters}, summarize(scores))
        write_json(summary_path(spec, point), summary)
        scores.save(spec.results_root / f"{point.name}.per_query.npz")

    paths = {path.name for path in write_report(spec)}
    assert {"gap_by_parameters.png", "metrics_by_num_layers.png", "report.md"} <= paths
    report = json.loads((spec.results_root / "report.json").read_text())
    assert report["points_finished"] == report["points"] == 12
    rows = {(r["settings"]["num_layers"], r["settings"]["sampling"]): r for r in report["settings"]}

    # per setting over seeds: X-X multi mAP .4, .5, .6 -> mean .5, std .1, t-interval .5 -+ t(2) x .1 / sqrt(3)
    half_width = T_975_2 * 0.1 / math.sqrt(3)
    for key, mean in {(1, "xx"): 0.5, (2, "xx"): 0.5, (1, "hybrid"): 0.6, (2, "hybrid"): 0.65}.items():
        cell = rows[key]["multi_map"]
        assert cell["mean"] == pytest.approx(mean) and cell["std"] == pytest.approx(0.1) and cell["n"] == 3
        assert (cell["low"], cell["high"]) == pytest.approx((mean - half_width, mean + half_width))
        assert rows[key]["unseen"]["multi_map"]["mean"] == pytest.approx(mean)  # th: never trained on
        assert rows[key]["language_groups"]["thai"]["multi_map"]["mean"] == pytest.approx(
            mean
        )  # the sweep's own language group
        assert rows[key]["recall_at_1"]["mean"] == 1.0  # every gold sentence first in every single-pair pool
    assert rows[(1, "xx")]["mono_map"] == {"mean": 1.0, "std": 0.0, "low": 1.0, "high": 1.0, "n": 3}
    assert rows[(2, "hybrid")]["convergence"]["step_95"]["mean"] == 40  # the first evaluation at 95% of the last
    assert rows[(2, "xx")]["parameters"]["without_word_embeddings"] == OTHER + 2 * LAYER
    # wall times: median and range, never a t-interval (three times could give one below 0); the machines counted
    assert rows[(1, "xx")]["train_seconds"] == {"median": 240.0, "min": 60.0, "max": 540.0, "n": 3}
    assert report["ran_on"] == [
        {"device": "cpu (A)", "precision": "not recorded", "points": 8},
        {"device": "cpu (B)", "precision": "training bf16, evaluation bf16", "points": 4},
    ]

    # paired tests, one per depth: hybrid minus X-X, seeds averaged
    tests = {test["at"]["num_layers"]: test for test in report["paired_tests"]}
    assert sorted(tests) == [1, 2] and all(t["comparison"] == "sampling: hybrid minus xx" for t in tests.values())
    assert tests[1]["seeds"] == [3, 3] and tests[1]["parameters"]["total"] == WORD_EMBEDDINGS + OTHER + LAYER
    one, two = tests[1]["multi_map"], tests[2]["multi_map"]
    assert (one["difference"], one["low"], one["high"]) == pytest.approx((0.1, 0.1, 0.1), abs=1e-6)
    assert two["difference"] == pytest.approx(0.15, abs=1e-6)
    assert 0.0 - 1e-6 <= two["low"] < 0.15 < two["high"] <= 0.3 + 1e-6  # within the questions' own gaps
    assert tests[2]["mono_map"]["difference"] == pytest.approx(0.0)
    # the default interval also resamples seeds: at depth 1 every seed and question gives .1, so still no spread
    deep = tests[1]["hierarchical"]["multi_map"]
    assert (deep["difference"], deep["low"], deep["high"]) == pytest.approx((0.1, 0.1, 0.1), abs=1e-6)
    # the t-interval over seeds pairs seed k with seed k: at depth 2 every seed's gap is .15, so no spread (unpaired,
    # the seeds' own spread of .1 would make it about +-.23)
    seed_t = tests[2]["seed_t"]["multi_map"]
    assert (seed_t["difference"], seed_t["low"], seed_t["high"]) == pytest.approx((0.15, 0.15, 0.15), abs=1e-6)
    # Holm over the two comparisons: the larger raw p is kept, the smaller doubled (capped at 1); a raw 0 enters as
    # the resolution of 1,000 resamples, 2/1,000, so no adjusted p is 0
    raw = sorted(max(t["hierarchical"]["multi_map"]["p_value"], 0.002) for t in tests.values())
    holm = sorted(t["hierarchical"]["multi_map"]["p_holm"] for t in tests.values())
    assert holm == pytest.approx([min(1.0, max(2 * raw[0], raw[0])), min(1.0, max(2 * raw[0], raw[1]))])

    # the figure's numbers: the gap against the parameter count, the smaller model first
    (series,) = report["gap_by_parameters"]
    assert series["comparison"] == "sampling: hybrid minus xx" and series["metric"] == "multi_map"
    assert [(p["at"], p["without_word_embeddings"], p["total"]) for p in series["points"]] == [
        ({"num_layers": 1}, OTHER + LAYER, WORD_EMBEDDINGS + OTHER + LAYER),
        ({"num_layers": 2}, OTHER + 2 * LAYER, WORD_EMBEDDINGS + OTHER + 2 * LAYER),
    ]
    assert [p["difference"] for p in series["points"]] == [one["difference"], two["difference"]]
    assert [(p["low"], p["high"]) for p in series["points"]] == [(one["low"], one["high"]), (two["low"], two["high"])]
    markdown = (spec.results_root / "report.md").read_text()
    assert "| 1 | xx | 98.0M (2.0M w/o word emb.) | 3 |" in markdown
    assert markdown.count(" | 4.0 (1.0-9.0) |") == 4  # training minutes of every setting
    assert "cpu (A), precision not recorded: 8; cpu (B), precision training bf16, evaluation bf16: 4." in markdown
    assert "t-interval over seeds" in markdown and markdown.count("| sampling: hybrid minus xx |") == 6  # 3 tables


def test_two_listed_points_are_compared_question_by_question(tmp_path):
    """A feature switched on against the base point: multi AP .6 vs .5 on every question -> a gap of .1, no spread."""
    from hbt_accel.atomic import write_json
    from hbt_accel.evaluation.grid import summarize
    from hbt_accel.sweeps.report import write_report
    from hbt_accel.sweeps.run import point_summary, summary_path

    base, feature = {"sampling": "hybrid"}, {"sampling": "hybrid", "temperature": 0.05}
    spec = load_sweep(
        write_sweep(
            tmp_path,
            points=[base, feature],
            seeds=[1, 2],
            results_dir=str(tmp_path / "results"),
            compare=[{"a": feature, "b": base}],
        )
    )
    spec.results_root.mkdir()
    for point in sweep_points(spec):
        scores = synthetic_scores([0.6 if "temperature" in point.as_dict() else 0.5] * 4)
        evaluations = [{"step": 40, "multi_map": 0.5}]
        train_summary = {"evaluations": evaluations, "steps": 40, "train_seconds": 60.0, "device": "cpu"}
        write_json(summary_path(spec, point), point_summary(spec, point, train_summary, summarize(scores)))
        scores.save(spec.results_root / f"{point.name}.per_query.npz")
    write_report(spec)
    (test,) = json.loads((spec.results_root / "report.json").read_text())["paired_tests"]
    assert test["comparison"] == "sampling hybrid, temperature 0.05 minus sampling hybrid"
    assert test["seeds"] == [2, 2] and test["at"] == {}
    gap = test["multi_map"]
    assert (gap["difference"], gap["low"], gap["high"]) == pytest.approx((0.1, 0.1, 0.1), abs=1e-6)


def test_a_comparison_takes_its_b_side_from_another_sweep_at_the_same_settings_and_seeds(tmp_path):
    """data_size_scaled_steps against data_size: the same settings, another sweep's overrides (its steps). Multi AP
    .6 here and .5 there on every question, seeds 1-2 of 3 shared: a gap of .1 over the shared seeds; a b that the
    other sweep lacks, or a missing recipe, fails in one line."""
    from hbt_accel.atomic import write_json
    from hbt_accel.evaluation.grid import summarize
    from hbt_accel.sweeps.report import write_report
    from hbt_accel.sweeps.run import point_summary, summary_path

    setting = {"sampling": "hybrid"}
    (tmp_path / "there").mkdir()
    there = write_sweep(tmp_path / "there", points=[setting], seeds=[1, 2, 3], results_dir=str(tmp_path / "b"))
    here = write_sweep(
        tmp_path,
        points=[setting],
        seeds=[1, 2],
        overrides={"max_steps": 30},
        results_dir=str(tmp_path / "a"),
        compare=[{"a": setting, "b_sweep": str(there)}],  # without b: a's settings in the other sweep
    )
    for path, multi_ap in ((there, 0.5), (here, 0.6)):
        spec = load_sweep(path)
        spec.results_root.mkdir()
        for point in sweep_points(spec):
            scores = synthetic_scores([multi_ap] * 4)
            train_summary = {"evaluations": [], "steps": 30, "train_seconds": 60.0, "device": "cpu"}
            write_json(summary_path(spec, point), point_summary(spec, point, train_summary, summarize(scores)))
            scores.save(spec.results_root / f"{point.name}.per_query.npz")
    write_report(spec)
    (test,) = json.loads((spec.results_root / "report.json").read_text())["paired_tests"]
    assert test["comparison"] == "sampling hybrid minus the same in sweep sweep" and test["seeds"] == [2, 2]
    for gap in (test["multi_map"], test["hierarchical"]["multi_map"], test["seed_t"]["multi_map"]):
        assert (gap["difference"], gap["low"], gap["high"]) == pytest.approx((0.1, 0.1, 0.1), abs=1e-6)
    for b_sweep, message in (
        (str(there), "compare[0]: b: no point of the sweep sweep has {'sampling': 'xy'}"),
        (str(tmp_path / "gone.yaml"), "compare[0]: b_sweep: file not found:"),
    ):
        wrong = {"a": setting, "b": {"sampling": "xy"}, "b_sweep": b_sweep}
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_sweep(write_sweep(tmp_path, points=[setting], compare=[wrong]))


def test_labels_show_lists_as_in_point_names_and_an_empty_text_visibly():
    from hbt_accel.sweeps.report import _setting_label, plot_label

    settings = {"train_languages": ["en", "de"], "query_prefix": "", "seed": 1}
    assert _setting_label(settings) == 'train_languages en,de, query_prefix "", seed 1'
    assert plot_label(settings, leave_out="seed") == 'train_languages=en,de, query_prefix=""'
    assert _setting_label({}) == "the base recipe"


def test_a_comparison_pairs_two_points_within_each_base_and_compares_values_as_json():
    from hbt_accel.sweeps.run import compared_side

    two_points = {"a": {"sampling": "hybrid", "temperature": 0.05}, "b": {"sampling": "hybrid"}}
    assert compared_side(two_points, {"base": "labse", "sampling": "hybrid", "seed": 1}) == (
        "b",
        (("base", '"labse"'),),
    )
    assert compared_side(two_points, {"base": "e5", "sampling": "hybrid", "temperature": 0.05, "seed": 2}) == (
        "a",
        (("base", '"e5"'),),
    )
    assert compared_side(two_points, {"sampling": "xy", "seed": 1})[0] is None
    two_values = {"field": "alpha", "a": 0.5, "b": 0.0}
    assert compared_side(two_values, {"alpha": 0.0, "num_layers": 3, "seed": 1}) == ("b", (("num_layers", "3"),))
    assert compared_side(two_values, {"alpha": 0, "seed": 1})[0] is None  # 0 and 0.0 are two points, as in their names
    assert compared_side(two_values, {"num_layers": 3, "seed": 1})[0] is None


def test_a_curve_runs_along_a_numeric_axis_or_the_length_of_a_setting_every_point_lists(tmp_path):
    """train_languages: the x of a point is how many languages it lists; a field some points leave at the base
    recipe's value (alpha) or a text field (sampling) gets no curve."""
    from hbt_accel.sweeps.report import _lines_along, _plotted_settings

    points = [
        {"train_languages": ["en", "de", "es", "ar"], "sampling": "xx"},
        {"train_languages": ["en"], "sampling": "xx"},
        {"train_languages": ["en", "de"], "sampling": "hybrid"},
        {"train_languages": ["en", "de"], "sampling": "hybrid", "alpha": 0.25},
    ]
    spec = load_sweep(write_sweep(tmp_path, name="langs", points=points, seeds=[1]))
    rows = [{"settings": point} for point in points]
    plotted = _plotted_settings(spec, rows)
    assert plotted == {"train_languages": len}
    lines = _lines_along(rows, "train_languages", len)
    assert {label: [x for x, _ in line] for label, line in lines.items()} == {
        "sampling=xx": [1, 4],
        "sampling=hybrid": [2],
        "sampling=hybrid, alpha=0.25": [2],
    }
    axes = load_sweep(write_sweep(tmp_path, name="alphas", axes={"alpha": [0.0, 0.5]}, seeds=[1]))
    rows = [{"settings": {"alpha": alpha}} for alpha in (0.5, 0.0)]
    (position,) = _plotted_settings(axes, rows).values()  # a numeric axis: x is the value itself
    assert [x for x, _ in _lines_along(rows, "alpha", position)[""]] == [0.0, 0.5]


def test_a_paired_test_counts_only_the_seeds_both_sides_have():
    """A setting with a third seed is compared with a two-seed setting on seeds 1 and 2 only; with no seed in common
    every run counts."""
    from hbt_accel.sweeps.report import common_seeds

    def runs(*seeds):
        return [{"settings": {"seed": seed}} for seed in seeds]

    kept = common_seeds({"a": runs(1, 2, 3), "b": runs(2, 1)})
    assert [r["settings"]["seed"] for r in kept["a"]] == [1, 2] and len(kept["b"]) == 2
    assert common_seeds({"a": runs(1), "b": runs(2)}) == {"a": runs(1), "b": runs(2)}


def test_a_damaged_point_summary_is_one_line_naming_it_before_anything_runs(tmp_path):
    """A half-copied summary must not count the point as finished, nor end a report in a JSONDecodeError."""
    from hbt_accel.errors import DataError
    from hbt_accel.sweeps.report import load_summaries

    path = write_sweep(tmp_path, axes={"sampling": ["xx", "hybrid"]}, seeds=[1], results_dir=str(tmp_path / "results"))
    spec = load_sweep(path)
    (tmp_path / "results").mkdir()
    damaged = tmp_path / "results" / "sampling-hybrid__seed-1.json"
    damaged.write_text('{"settings": {"sampling": "hyb')
    message = rf"{damaged}: damaged point summary \(.*\); delete it to run that point again"
    with pytest.raises(DataError, match=message):
        run_sweep(spec, dry_run=True, echo=lambda line: None)
    with pytest.raises(DataError, match=message):
        load_summaries(spec)


def test_a_preempted_submitit_point_is_resubmitted_resuming_from_its_checkpoint(tmp_path):
    """What submitit calls when Slurm signals the job: the same command, resuming (`auto`: a point preempted before
    its first checkpoint starts again); one killed in its final evaluation, with no checkpoint left, starts over."""
    import submitit

    from hbt_accel.sweeps.run import RequeueablePoint

    own = ["accelerate", "launch", "train.py", "--seed", "1", "--output_dir", str(tmp_path)]
    fresh = RequeueablePoint(own, "/repo", {"A": "1"})
    delayed = fresh.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    again = delayed.function
    assert again.command == [*own, "--resume_from_checkpoint", "auto"]
    assert (again.cwd, again.env) == ("/repo", {"A": "1"})
    resumed = RequeueablePoint([*own, "--resume_from_checkpoint", "latest"], "/repo", {})
    assert resumed.checkpoint().function.command == again.command  # one resume flag, never two
    (tmp_path / "model.safetensors").write_bytes(b"final model, then killed while scoring it")
    assert again.checkpoint().function.command == [*own, "--overwrite_output_dir", "true"]


def test_a_point_goes_on_from_its_checkpoint_or_starts_over_when_it_has_none(tmp_path):
    """Killed in training: resume from the newest complete checkpoint. Killed in the final evaluation (final model
    saved, no checkpoint: the last step keeps none) or with only a half-written checkpoint: train again over it,
    which training refuses without the flag. Finished, or never started: nothing to add."""
    from hbt_accel.sweeps.run import unfinished_run_flags
    from tests.test_reliability import _fake_checkpoint

    assert unfinished_run_flags(tmp_path / "never-started") == []
    killed_in_training = tmp_path / "a"
    _fake_checkpoint(killed_in_training, 30)
    (killed_in_training / "model.safetensors").write_bytes(b"an older final model")
    assert unfinished_run_flags(killed_in_training) == ["--resume_from_checkpoint", "latest"]
    half_written = tmp_path / "b"
    _fake_checkpoint(half_written, 30, manifest=False)
    (half_written / "checkpoint-30" / "checkpoint_manifest.json").write_text('{"files": {"optimizer.bin": 7}}')
    killed_in_evaluation = tmp_path / "c"
    killed_in_evaluation.mkdir()
    (killed_in_evaluation / "model.safetensors").write_bytes(b"final model")
    for run in (half_written, killed_in_evaluation):
        assert unfinished_run_flags(run) == ["--overwrite_output_dir", "true"], run.name
    (killed_in_evaluation / "train_summary.json").write_text("{}")
    assert unfinished_run_flags(killed_in_evaluation) == []


def run_until_started(point, log: Path):
    """Run `point` (a RequeueablePoint whose command fails when stopped) in a thread until its command has printed
    'started' to `log`; returns the thread."""
    import threading
    import time

    job = threading.Thread(target=lambda: pytest.raises(RuntimeError, point))
    job.start()
    deadline = time.monotonic() + 30
    while "started" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job


def test_a_preempted_point_is_asked_to_stop_and_given_time_to_save(tmp_path):
    """`checkpoint` sends SIGTERM to the running command's process group and waits for it: here a command that
    writes a file when it gets SIGTERM, as training saves its checkpoint."""
    import pickle

    from hbt_accel.sweeps.run import RequeueablePoint

    saved = tmp_path / "saved"
    script = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(saved)!r}).write_text('ok'), sys.exit(75)))\n"
        "print('started', flush=True)\ntime.sleep(60)\n"
    )
    point = RequeueablePoint(
        [sys.executable, "-c", script, "--output_dir", str(tmp_path / "run")],
        str(tmp_path),
        dict(os.environ),
        str(tmp_path / "log"),
    )
    job = run_until_started(point, tmp_path / "log")
    resubmitted = point.checkpoint()
    job.join(timeout=30)
    assert saved.read_text() == "ok" and point._process.returncode == 75
    assert resubmitted.function.command[-2:] == ["--resume_from_checkpoint", "auto"]
    assert pickle.loads(pickle.dumps(point))._process is None  # what submitit pickles holds no process


def test_a_data_size_sweep_reports_the_saturating_fit_in_training_ids(tmp_path):
    """Multilingual AP .70 - .02 x fraction^-.5 on every question, both seeds: the fit must give back the ceiling
    .70 and exponent .5, and reach .68 at fraction (.02 / .02)^2 = 1, i.e. all the corpus's ids."""
    from hbt_accel.atomic import write_json
    from hbt_accel.evaluation.grid import summarize
    from hbt_accel.sweeps.report import write_report
    from hbt_accel.sweeps.run import point_summary, summary_path

    fractions = [0.1, 0.25, 0.5, 1.0]
    spec = load_sweep(write_sweep(tmp_path, name="size", axes={"train_id_fraction": fractions}, seeds=[1, 2],
                                  results_dir=str(tmp_path / "results")))  # fmt: skip
    spec.results_root.mkdir()
    for point in sweep_points(spec):
        fraction = point.as_dict()["train_id_fraction"]
        scores = synthetic_scores([0.70 - 0.02 * fraction**-0.5] * 4)
        train_summary = {"evaluations": [], "steps": 120, "train_seconds": 60.0, "device": "cpu"}
        write_json(summary_path(spec, point), point_summary(spec, point, train_summary, summarize(scores)))
        scores.save(spec.results_root / f"{point.name}.per_query.npz")
    write_report(spec)
    (fit,) = json.loads((spec.results_root / "report.json").read_text())["data_size_fit"]
    assert fit["size_unit"] == "ids" and [p["train_id_fraction"] for p in fit["points"]] == fractions
    all_ids = fit["points"][-1]["size"]
    assert all_ids > 1000  # MLQA-R's training ids
    assert (fit["a"], fit["c"]) == pytest.approx((0.70, 0.5), rel=1e-3)
    assert fit["size_for_target"] == pytest.approx(all_ids, rel=1e-2)
    assert "size for multi mAP 0.68" in (spec.results_root / "report.md").read_text()


def test_a_preempted_launcher_is_left_alone_and_its_training_process_saves(tmp_path):
    """A stand-in for `accelerate launch`: a parent that kills its child at once if IT gets SIGTERM (accelerate's
    launcher gives 5 s). `checkpoint` signals the child only, so the child saves and the parent returns."""
    from hbt_accel.sweeps.run import RequeueablePoint

    saved = tmp_path / "saved"
    child = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1), pathlib.Path({str(saved)!r}).write_text('ok'), "
        "sys.exit(75)))\nprint('started', flush=True)\ntime.sleep(60)\n"
    )
    launcher = (
        "import signal, subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "signal.signal(signal.SIGTERM, lambda *a: (p.kill(), sys.exit(1)))\n"
        "sys.exit(p.wait())\n"
    )
    point = RequeueablePoint(
        [sys.executable, "-c", launcher, "--output_dir", str(tmp_path / "run")],
        str(tmp_path),
        dict(os.environ),
        str(tmp_path / "log"),
    )
    job = run_until_started(point, tmp_path / "log")
    point.checkpoint()
    job.join(timeout=30)
    assert saved.read_text() == "ok" and point._process.returncode == 75  # the child's code, passed through


def test_convergence_is_read_off_the_periodic_curve_by_hand():
    from hbt_accel.sweeps.report import convergence, curve_area

    fast = [{"step": 0, "multi_map": 0.2}, {"step": 10, "multi_map": 0.6}, {"step": 20, "multi_map": 0.6}]
    slow = [{"step": 0, "multi_map": 0.2}, {"step": 10, "multi_map": 0.58}, {"step": 20, "multi_map": 0.6}]
    # trapezoids: (0.2 + 0.6) / 2 x 10 + 0.6 x 10 = 10 over 20 steps; (0.2 + 0.58) / 2 x 10 + 0.59 x 10 = 9.8
    assert curve_area(fast) == pytest.approx(0.5) and curve_area(slow) == pytest.approx(0.49)
    found = convergence([{"evaluations": fast}, {"evaluations": slow}])
    assert found["steps_evaluated"] == [0, 10, 20]
    assert found["step_95"]["mean"] == 10  # .57 reached at step 10 by both
    assert found["step_99"]["mean"] == 15  # .594: step 10 (fast), step 20 (slow)
    assert found["best_step"]["mean"] == 15  # fast: .6 first at step 10 (the tie goes to the first); slow: step 20
    assert found["best_minus_last"]["mean"] == 0.0
    peaked = [{"step": 0, "multi_map": 0.2}, {"step": 10, "multi_map": 0.65}, {"step": 20, "multi_map": 0.6}]
    assert convergence([{"evaluations": peaked}])["best_minus_last"]["mean"] == pytest.approx(0.05)
    assert convergence([{"evaluations": fast[:1]}]) is None and curve_area([]) is None


def test_the_by_step_figure_averages_the_seeds_of_a_setting_at_their_common_steps():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hbt_accel.sweeps.report import _mean_curve, _setting_order
    from hbt_accel.sweeps.run import _loss_point

    _, panel = plt.subplots()
    # seed 2 logged no step 20: the line keeps steps 10 and 30, means (1 + 3) / 2 and (0.5 + 1.5) / 2, std by hand
    _mean_curve(panel, [[(10, 1.0), (20, 0.8), (30, 0.5)], [(10, 3.0), (30, 1.5)], []], "alpha=0.5")
    (line,) = panel.lines
    assert list(line.get_xdata()) == [10, 30] and list(line.get_ydata()) == [2.0, 1.0]
    assert line.get_label() == "alpha=0.5 (2 seeds)"
    band = panel.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(1.0 - math.sqrt(0.5)) and band.max() == pytest.approx(2.0 + math.sqrt(2.0))
    _mean_curve(panel, [[(10, 1.0)], [(20, 2.0)]], "no common step")  # draws nothing rather than an empty line
    assert len(panel.lines) == 1
    settings = [{"settings": {"n": n, "seed": 1}} for n in (10, 2, [1, 2])]
    assert [s["settings"]["n"] for s in sorted(settings, key=_setting_order)] == [2, 10, [1, 2]]
    # the point summary keeps how many steps a logged loss averages, where the run recorded it
    assert _loss_point({"step": 10, "loss": 0.5, "steps_in_loss": 10, "lr": 1e-5}) == {
        "step": 10, "loss": 0.5, "steps_in_loss": 10}  # fmt: skip
    assert _loss_point({"step": 10, "loss": 0.5, "lr": 1e-5}) == {"step": 10, "loss": 0.5}
    plt.close("all")


def test_curves_along_a_list_length_keep_two_language_orders_apart():
    from hbt_accel.sweeps.report import _lines_along

    def row(languages, sampling="xy"):
        return {"settings": {"train_languages": languages, "sampling": sampling}}

    rows = [row(["en", "de"]), row(["en", "zh"]), row(["en", "de", "es", "ar"]), row(["en", "zh", "hi", "vi"]),
            row(["en", "de", "es", "ar", "hi", "vi", "zh"]), row(["en"], "xx")]  # fmt: skip
    lines = _lines_along(rows, "train_languages", len)
    xs = {label: [x for x, _ in points] for label, points in lines.items()}
    assert xs == {
        "sampling=xy, en+de+es+ar+hi+vi+zh": [2, 4, 7],
        "sampling=xy, en+zh+hi+vi": [2, 4],
        "sampling=xx": [1],
    }
    shared_start = _lines_along([row(["en"]), row(["en", "de"]), row(["en", "zh", "hi"])], "train_languages", len)
    assert {label: [x for x, _ in points] for label, points in shared_start.items()} == {
        "sampling=xy, en+de": [1, 2],
        "sampling=xy, en+zh+hi": [1, 3],  # the English-only point starts both orders
    }
    one_order = _lines_along(rows[::2], "train_languages", len)  # nested lists only: one line, its label unchanged
    assert {label: len(points) for label, points in one_order.items()} == {"sampling=xy": 3}


def test_a_point_summary_keeps_what_each_corpus_trained_on(tmp_path):
    from hbt_accel.evaluation.grid import summarize
    from hbt_accel.sweeps.run import point_summary

    spec = load_sweep(write_sweep(tmp_path, name="matched", axes={"train_pairs": [100]}, seeds=[1]))
    point = sweep_points(spec)[0]
    trained_on = {"ids": 60, "pairs": 100, "xy_ids": 40}
    corpora = [{"name": "mlqa-r", "ids": 1148, "pairs": 4199, "trained_on": trained_on}, {"name": "old", "ids": 9}]
    train_summary = {"evaluations": [], "steps": 2, "train_seconds": 1.0, "device": "cpu", "corpora": corpora}
    summary = point_summary(spec, point, train_summary, summarize(synthetic_scores([0.5, 0.5])))
    assert summary["trained_on"] == [{"name": "mlqa-r", **trained_on}]  # a run from before the record: none
