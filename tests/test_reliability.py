"""What a killed, corrupted or mistaken run does: complete checkpoints only, leftovers cleaned, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hbt_accel.errors import DataError
from hbt_accel.training.checkpoints import (
    MANIFEST_FILE,
    PROGRESS_FILE,
    checkpoint_problem,
    latest_complete_checkpoint,
    resolve_resume,
    write_manifest,
)
from tests.test_train import REPO, train, train_here


def _fake_checkpoint(run: Path, step: int, manifest: bool = True) -> Path:
    folder = run / f"checkpoint-{step}"
    (folder / "model").mkdir(parents=True)
    (folder / PROGRESS_FILE).write_text(json.dumps({"global_step": step}))
    (folder / "optimizer.bin").write_bytes(b"x" * 100)
    (folder / "model" / "model.safetensors").write_bytes(b"y" * 50)
    if manifest:
        write_manifest(folder)
    return folder


def test_the_manifest_lists_every_file_but_itself_with_its_size(tmp_path):
    folder = _fake_checkpoint(tmp_path, 1)
    files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    assert files == {"model/model.safetensors": 50, "optimizer.bin": 100, PROGRESS_FILE: len('{"global_step": 1}')}
    assert checkpoint_problem(folder) is None


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda f: (f / "optimizer.bin").write_bytes(b"x" * 60), "optimizer.bin has 60 bytes, 100 were saved"),
        (lambda f: (f / "model" / "model.safetensors").unlink(), "model/model.safetensors is missing"),
        (lambda f: (f / MANIFEST_FILE).write_text("{trunc"), f"{MANIFEST_FILE} is unreadable"),
        (lambda f: (f / PROGRESS_FILE).unlink(), f"no {PROGRESS_FILE}"),
    ],
)
def test_a_damaged_checkpoint_names_what_is_wrong(tmp_path, damage, problem):
    folder = _fake_checkpoint(tmp_path, 1)
    damage(folder)
    assert checkpoint_problem(folder) == problem


def test_auto_resumes_where_there_is_a_checkpoint_and_starts_fresh_where_there_is_none(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume("auto", run) == (None, [])  # no folder yet: the first start of a requeued job
    run.mkdir()
    assert resolve_resume("auto", run) == (None, [])
    _fake_checkpoint(run, 2)
    assert resolve_resume("auto", run) == (run / "checkpoint-2", [])


def test_latest_falls_back_to_the_newest_complete_checkpoint_and_says_which_it_skipped(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 10, manifest=False)  # written before manifests existed: accepted
    truncated = _fake_checkpoint(tmp_path, 30)
    (truncated / "optimizer.bin").write_bytes(b"")
    (tmp_path / "checkpoint-40").mkdir()  # an empty folder
    latest, skipped = latest_complete_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-10"
    assert skipped == [
        f"checkpoint-40 (no {PROGRESS_FILE})",
        "checkpoint-30 (optimizer.bin has 0 bytes, 100 were saved)",
    ]
    assert resolve_resume("latest", tmp_path) == (tmp_path / "checkpoint-10", skipped)
    with pytest.raises(DataError, match=r"checkpoint-30 is not a complete checkpoint \(optimizer.bin has 0 bytes"):
        resolve_resume(str(truncated), tmp_path)
    only_truncated = tmp_path / "other_run"
    only_truncated.mkdir()
    truncated.rename(only_truncated / truncated.name)
    with pytest.raises(DataError, match="only incomplete ones: checkpoint-30"):
        resolve_resume("latest", only_truncated)


# =====================================================================================================================
# End to end (tiny model, a few steps)
# =====================================================================================================================
@pytest.fixture
def four_step_run(tiny_model_dir, mlqa_slice, tmp_path):
    """A finished 4-step run with a checkpoint at every step; returns (run folder, its final weights, arguments)."""
    out = tmp_path / "run"
    args = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--output_dir", str(out)]
    args += ["--per_device_train_batch_size", "16", "--save_steps", "1", "--save_total_limit", "5"]
    args += ["--mixed_precision", "no", "--learning_rate", "1e-3", "--max_steps", "4"]
    train_here(*args)
    return out, load_file(out / "model.safetensors"), args


def _as_if_killed_after(out: Path, step: int) -> None:
    """Make `out` look like a run killed while saving checkpoint step+1: no final files, no newer checkpoints, a
    half-written checkpoint folder."""
    for name in ("model.safetensors", "train_summary.json"):
        (out / name).unlink()
    for checkpoint in out.glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    (out / f".tmp-checkpoint-{step + 1}").mkdir()
    (out / f".tmp-checkpoint-{step + 1}" / "optimizer.bin").write_bytes(b"half")


def test_a_killed_run_resumes_from_the_newest_complete_checkpoint_and_cleans_up(four_step_run):
    out, straight, args = four_step_run
    _as_if_killed_after(out, 3)
    (out / "checkpoint-3" / "optimizer.bin").write_bytes(b"truncated")  # the disk filled up, say
    (out.parent / f".{out.name}.tmp-k2j3").mkdir()  # a final save's staging folder
    log = train_here(*args, "--resume_from_checkpoint", "latest")
    assert "skipped incomplete checkpoint(s): checkpoint-3 (optimizer.bin has 9 bytes" in log
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in log
    assert "removed what an earlier run left: .tmp-checkpoint-4, .run.tmp-k2j3" in log
    assert not list(out.glob(".tmp-*")) and not list(out.parent.glob(".run.tmp-*"))
    resumed = load_file(out / "model.safetensors")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and [r["step"] for r in summary["history"]] == [1, 2, 3, 4]


def test_resuming_a_named_incomplete_checkpoint_is_one_line_before_the_model_loads(four_step_run):
    out, _, args = four_step_run
    _as_if_killed_after(out, 3)
    (out / "checkpoint-3" / "model" / "model.safetensors").write_bytes(b"")
    config_before = (out / "hbt_config.yaml").read_text()
    result = train(*args, "--resume_from_checkpoint", str(out / "checkpoint-3"), check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "checkpoint-3 is not a complete checkpoint (model/model.safetensors has 0 bytes" in result.stderr
    assert "global batch" not in result.stdout  # before the model and the training banner
    assert (out / "hbt_config.yaml").read_text() == config_before


# =====================================================================================================================
# A user's mistake: one line naming the file or field, exit code 2, before the model loads
# =====================================================================================================================
def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-1500:]
    return lines[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, mlqa_slice) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_inputs")
    latin1 = folder / "latin1.jsonl"
    latin1.write_bytes(mlqa_slice.read_bytes().split(b"\n")[0] + b"\n" + '{"query": "caf\xe9"}\n'.encode("latin-1"))
    (folder / "empty_folder").mkdir()
    truncated_benchmark = folder / "truncated_xquad"
    truncated_benchmark.mkdir()
    from hbt_accel.data import lareqa_files

    english = lareqa_files("xquad-r")["en"].read_bytes()
    (truncated_benchmark / "en.json").write_bytes(english[: len(english) // 2])
    return {"latin1": latin1, "empty_folder": folder / "empty_folder", "truncated_benchmark": truncated_benchmark}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train_data", "{latin1}"], "{latin1}:2: not UTF-8 text (byte 0xe9 at column 15)"),
        (["--train_data", "{empty_folder}"], "{empty_folder}: no training data in this folder (train_data: expected"),
        (
            ["--eval_languages", "fr"],
            "eval_languages: fr not in xquad-r (has ar, de, el, en, es, hi, ru, th, tr, vi, zh)",
        ),
        (["--eval_benchmark", "{truncated_benchmark}"], "{truncated_benchmark}/en.json: not valid JSON"),
        (
            ["--eval_benchmark", "xquad-rr"],
            "xquad-rr: not a benchmark name (xquad-r, mlqa-r, optionally :train or :validation) nor a folder; "
            "did you mean 'xquad-r'?",
        ),
        (["--model_name_or_path", "./no/such/model"], "model_name_or_path: ./no/such/model not found (a local model"),
    ],
)
def test_bad_training_input_is_one_line_before_the_model_loads(tiny_model_dir, bad_inputs, tmp_path, args, message):
    args = [arg.format(**bad_inputs) for arg in args]
    common = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "run"), "--max_steps", "2"]
    line = _one_line_error(train(*common, *args, check=False))
    assert message.format(**bad_inputs) in line
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_evaluation_input_is_one_line(tiny_model_dir, tmp_path):
    damaged = tmp_path / "damaged_model"
    shutil.copytree(tiny_model_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    beir = tmp_path / "beir_layout"  # recognised by its two files; --bootstrap is refused before they are read
    beir.mkdir()
    for name in ("queries.jsonl", "corpus.jsonl"):
        (beir / name).write_text("")
    cases = [
        (["--model", "./runs/typo"], "--model: ./runs/typo not found (a local model folder"),
        (["--model", str(damaged)], f"{damaged}: the model weights cannot be read (Error while deserializing header"),
        (["--model", str(tiny_model_dir), "--output_dir", str(a_file)], f"--output_dir: {a_file} is a file"),
        (["--model", str(tiny_model_dir), "--benchmark", "xquad-rr"], "did you mean 'xquad-r'?"),
        (
            ["--model", str(tiny_model_dir), "--bootstrap", "100", "--benchmark", str(beir)],
            "--bootstrap: per-question intervals are for the LAReQA grid (xquad-r, mlqa-r)",
        ),
    ]
    for args, message in cases:
        command = [sys.executable, str(REPO / "recipes" / "evaluate.py"), "--languages", "en", *args]
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
        assert message in _one_line_error(result), args


def test_evaluate_bootstrap_resamples_whole_articles_and_a_model_minus_itself_is_zero(tiny_model_dir, tmp_path):
    """`evaluate.py --bootstrap --baseline`: the intervals are the library's article-level ones for the scored ids
    (questions on one passage are not independent), and the baseline, the same model scored here, differs by 0."""
    from hbt_accel.data import article_of_question, load_lareqa_benchmark
    from hbt_accel.evaluation import evaluate_grid
    from hbt_accel.evaluation.statistics import confidence_intervals
    from hbt_accel.models.dual_encoder import DualEncoder

    benchmark = load_lareqa_benchmark("xquad-r", languages=["en", "de"])
    per_query: list = []
    evaluate_grid(DualEncoder.from_pretrained(tiny_model_dir), benchmark, max_queries=80, per_query=per_query)
    baseline = per_query[0].save(tmp_path / "baseline.npz")
    out = tmp_path / "eval"
    command = [sys.executable, str(REPO / "recipes" / "evaluate.py"), "--model", str(tiny_model_dir)]
    command += ["--languages", "en,de", "--max_queries", "80", "--precision", "no", "--bootstrap", "200"]
    result = subprocess.run([*command, "--baseline", str(baseline), "--output_dir", str(out)], capture_output=True)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "eval_results.json").read_text())
    article_of = article_of_question(benchmark)
    articles = {article_of[q] for q in per_query[0].query_ids}
    assert results["bootstrap_resampled"] == f"{len(articles)} articles" and 1 < len(articles) < 80
    expected = confidence_intervals(per_query[0], 200, article_of=article_of)
    assert results["confidence_intervals"]["multi_map"] == pytest.approx(expected["multi_map"])
    assert expected["multi_map"] != confidence_intervals(per_query[0], 200)["multi_map"]  # not the id-level one
    gap = results["paired_difference"]["multi_map"]
    assert (gap["difference"], gap["low"], gap["high"]) == pytest.approx((0.0, 0.0, 0.0), abs=1e-6)


def test_evaluate_run_dir_scores_each_checkpoint_once_with_its_own_model(tiny_model_dir, xlmr_tokenizer, tmp_path):
    """`evaluate.py --run_dir RUN`: each checkpoint is scored with the model saved in it (as `--model` would), one
    with no saved model is skipped with a line, the metrics by step are plotted, and a second call scores nothing."""
    from transformers import BertModel

    from hbt_accel.data import load_lareqa_benchmark
    from hbt_accel.evaluation import evaluate_grid
    from hbt_accel.evaluation.grid import RESULTS_FILE
    from hbt_accel.models.dual_encoder import DualEncoder
    from tests.conftest import tiny_bert_config

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "checkpoint-10" / "model")
    torch.manual_seed(1)  # another model at step 20: a mixed-up folder would show
    BertModel(tiny_bert_config(len(xlmr_tokenizer))).save_pretrained(run / "checkpoint-20" / "model")
    xlmr_tokenizer.save_pretrained(run / "checkpoint-20" / "model")
    (run / "checkpoint-30").mkdir()
    command = [sys.executable, str(REPO / "recipes" / "evaluate.py"), "--run_dir", str(run), "--languages", "en,de"]
    command += ["--max_queries", "40", "--precision", "no"]

    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"skipping {run / 'checkpoint-30'}: no saved model" in first.stdout
    benchmark = load_lareqa_benchmark("xquad-r", languages=["en", "de"])
    results = {step: run / f"checkpoint-{step}" / RESULTS_FILE for step in (10, 20)}
    scores = {}
    for step, path in results.items():
        expected = evaluate_grid(
            DualEncoder.from_pretrained(path.parent / "model", tokenizer=xlmr_tokenizer), benchmark, max_queries=40
        )
        scores[step] = json.loads(path.read_text())["multi_map"]
        assert scores[step] == pytest.approx(expected["multi_map"], abs=1e-6), step
    assert scores[10] != pytest.approx(scores[20], abs=1e-3)
    assert (run / "metrics_by_step.png").stat().st_size > 0
    written = [path.stat().st_mtime_ns for path in results.values()]

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert [path.stat().st_mtime_ns for path in results.values()] == written


def test_a_huge_learning_rate_stops_within_three_steps_and_saves_nothing(tiny_model_dir, mlqa_slice, tmp_path):
    out = tmp_path / "run"
    result = train(
        *("--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--output_dir", str(out)),
        *("--per_device_train_batch_size", "16", "--max_steps", "5", "--save_steps", "1", "--mixed_precision", "no"),
        *(
            "--learning_rate",
            "1e6",
        ),
        check=False,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    step = int(line.split()[2].rstrip(":"))
    assert step <= 3 and "training diverged (learning_rate 1e+06" in line and "Traceback" not in result.stderr
    assert "warning: temperature" not in result.stdout
    assert not (out / "model.safetensors").exists() and not (out / "train_summary.json").exists()
    for checkpoint in out.glob("checkpoint-*"):  # the steps before the NaN may be saved: they must be finite
        weights = load_file(checkpoint / "model" / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), checkpoint.name
