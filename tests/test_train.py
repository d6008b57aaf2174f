"""The training loop end to end on a tiny random BERT with the real tokenizer and real MLQA-R data."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "--freeze_word_embeddings",
    "false",  # a tiny random BERT learns mostly in its word embeddings
    "--query_max_length",
    "32",
    "--passage_max_length",
    "48",
    "--final_eval",
    "false",
    "--logging_steps",
    "1",
]


def train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The training command in an interpreter of its own: for exit codes, stderr and anything process-wide."""
    command = [sys.executable, str(REPO / "recipes" / "train_hybrid.py"), *FAST, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env())
    if check and result.returncode != 0:
        raise AssertionError(result.stdout[-3000:] + result.stderr[-3000:])
    return result


def train_here(*args: str) -> str:
    """The same command in this process, through the recipe's own entry (`run_cli`), for runs whose point is not the
    command line itself: no interpreter start and imports (~6 s a run). Returns what the run printed. (Its torch
    threads are this process's, not `_env`'s.)"""
    from hbt_accel.config import DEFAULT_RECIPE, HbtConfig, run_cli
    from hbt_accel.distributed import INTERRUPT_EXIT_CODE
    from hbt_accel.training.run import main

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run_cli(main, HbtConfig, [*FAST, *args], default_yaml=DEFAULT_RECIPE)
    except SystemExit as exit_:  # the error line went to stderr, which pytest shows
        if exit_.code == INTERRUPT_EXIT_CODE:
            raise KeyboardInterrupt from None  # Ctrl-C during the run stops the test session, as it would without it
        raise AssertionError(f"exit {exit_.code}\n{printed.getvalue()[-3000:]}") from None
    return printed.getvalue()


def _env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, xlmr_tokenizer) -> Path:
    """A tiny BERT WITH dropout, so a resume must also restore the RNG to match."""
    from transformers import BertModel

    from tests.conftest import tiny_bert_config

    folder = tmp_path_factory.mktemp("tiny_dropout")
    torch.manual_seed(1)
    BertModel(tiny_bert_config(len(xlmr_tokenizer), dropout=0.1)).save_pretrained(folder)
    xlmr_tokenizer.save_pretrained(folder)
    return folder


def test_short_run_lowers_the_loss_and_saves_a_loadable_model(tiny_model_dir, mlqa_slice, tmp_path):
    out = tmp_path / "run"
    # 64 ids / 16 per batch = 4 batches per epoch: 40 steps are 10 epochs, enough for a tiny model to fit them
    train_here(
        "--model_name_or_path",
        str(tiny_model_dir),
        "--output_dir",
        str(out),
        "--max_steps",
        "40",
        "--train_data",
        str(mlqa_slice),
        "--learning_rate",
        "2e-3",
        "--per_device_train_batch_size",
        "16",
        "--warmup_ratio",
        "0",
    )
    summary = json.loads((out / "train_summary.json").read_text())
    losses = [record["loss"] for record in summary["history"]]
    assert len(losses) == 40
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, (first, last)
    counts = summary["batch_counts"]
    assert counts["X-X"] + counts["X-Y"] == 40 and counts["X-X"] > 5 and counts["X-Y"] > 5
    assert summary["corpora"][0]["trained_on"] == {"ids": 64, "pairs": 192, "xy_ids": 64}  # en, de, es of 64 ids
    # `auto` (the default) is recorded as what it resolved to here, the same as the saved config says
    saved = yaml.safe_load((out / "hbt_config.yaml").read_text())
    assert summary["precision"] == {"training": saved["mixed_precision"], "evaluation": saved["eval_precision"]}
    assert summary["precision"]["training"] in ("bf16", "no")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out)
    assert model.config.hidden_size == 32
    from hbt_accel.models.dual_encoder import DualEncoder

    vectors = DualEncoder.from_pretrained(out).encode(["Wer war Kant?", "Who was Kant?"], "query")
    assert vectors.shape == (2, 32)


def test_a_pair_budget_reaches_the_sampler_and_the_summary(tiny_model_dir, mlqa_slice, tmp_path):
    out = tmp_path / "matched"
    budget = ("--train_pairs", "64", "--train_xy_ids", "16", "--per_device_train_batch_size", "8")
    train_here("--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--max_steps", "2", *budget,
               "--train_data", str(mlqa_slice))  # fmt: skip
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["corpora"][0]["trained_on"] == {"ids": 48, "pairs": 64, "xy_ids": 16}


def test_train_in_process_returns_its_summary_evaluations_and_paths(tiny_model_dir, mlqa_slice, tmp_path):
    """`train(cfg)` from Python: 3 steps on the tiny model cut to its first layer; the returned numbers are the ones
    written to disk."""
    from hbt_accel.config import parse_config
    from hbt_accel.training.run import train as train_in_process

    out = tmp_path / "run"
    cfg = parse_config(
        [
            *FAST,
            *("--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--train_data", str(mlqa_slice)),
            *("--max_steps", "3", "--per_device_train_batch_size", "16", "--mixed_precision", "no"),
            *("--eval_steps", "2", "--eval_languages", "en,de", "--eval_max_queries", "10", "--final_eval", "true"),
            *("--num_layers", "1"),
        ]
    )
    result = train_in_process(cfg)

    summary = result.summary
    assert summary.steps == 3 and sum(summary.batch_counts.values()) == 3
    assert summary.batch.global_batch == 16 and summary.batch.negatives_per_query == 15 + 16 * 3
    assert [record["step"] for record in summary.history] == [1, 2, 3]
    assert all(np.isfinite(record["loss"]) and record["loss"] > 0 for record in summary.history)
    assert [e["step"] for e in summary.evaluations] == [0, 2, 3] and summary.evaluations[1]["n_queries"] == 2 * 10
    assert summary.train_seconds > 0 and summary.eval_seconds > 0
    # parameters by hand: word embeddings 250,002 x 32; positions 256 x 32, 2 token types, LayerNorm; 1 layer of 8,544
    rest = 256 * 32 + 2 * 32 + 2 * 32 + 8_544
    assert summary.parameters == {
        "total": 250_002 * 32 + rest,
        "word_embeddings": 250_002 * 32,
        "without_word_embeddings": rest,
        "trainable": 250_002 * 32 + rest,  # FAST trains the word embeddings too
        "layers": 1,
    }
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1  # the saved model is the cut one
    # the final evaluation is the full grid: 11 languages x 1,190 questions
    assert result.results["n_queries"] == 11 * 1190 and 0 < result.results["multi_map"] <= 1
    # paths, and what is on disk says the same as what was returned
    assert result.output_dir == out and result.checkpoints == [out / "checkpoint-2"]
    assert json.loads(result.summary_path.read_text()) == json.loads(json.dumps(summary.to_json()))
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["multi_map"] == pytest.approx(result.results["multi_map"])
    assert f"{result.results['mono_map']:.3f}" in result.model_card_path.read_text()
    progress = json.loads((out / "checkpoint-2" / "training_progress.json").read_text())
    assert progress["global_step"] == 2 and progress["best_checkpoint"] == "checkpoint-2"
    assert progress["evaluations"] == summary.evaluations[:2]  # up to the checkpoint's own step
    # the LAReQA folder actually used is recorded (the recipe left data_dir empty)
    from hbt_accel.data import resolve_data_dir

    saved_config = yaml.safe_load((out / "hbt_config.yaml").read_text())
    assert cfg.data_dir == "" and saved_config["data_dir"] == str(resolve_data_dir())


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="a GPU without bf16")
def test_train_in_process_twice_with_other_precisions(tiny_model_dir, mlqa_slice, tmp_path):
    """accelerate's process-wide state refuses a second precision; `train(cfg)` clears it when it ends, so a notebook
    can train in bf16, then in fp32."""
    args = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--max_steps", "1"]
    args += ["--per_device_train_batch_size", "8"]
    for precision in ("bf16", "no"):
        train_here(*args, "--mixed_precision", precision, "--output_dir", str(tmp_path / precision))
        summary = json.loads((tmp_path / precision / "train_summary.json").read_text())
        assert summary["precision"]["training"] == precision


def test_train_in_process_leaves_the_callers_accelerator_alone(tiny_model_dir, mlqa_slice, tmp_path):
    """The state `train(cfg)` clears is only the state it set: an Accelerator made before it still works after."""
    from hbt_accel.distributed import make_accelerator

    accelerator = make_accelerator(mixed_precision="no")
    args = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--max_steps", "1"]
    train_here(*args, "--per_device_train_batch_size", "8", "--mixed_precision", "no", "--output_dir", str(tmp_path))
    assert accelerator.mixed_precision == "no" and accelerator.device.type in ("cpu", "cuda")


def test_periodic_evaluation_records_scores_by_step_and_keeps_the_best_checkpoint(
    tiny_model_dir, mlqa_slice, tmp_path
):
    out = tmp_path / "run"
    train_here(
        *("--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--train_data", str(mlqa_slice)),
        *("--max_steps", "15", "--learning_rate", "2e-3", "--per_device_train_batch_size", "16"),
        *("--eval_benchmark", "xquad-r", "--eval_steps", "5", "--eval_languages", "en,de", "--eval_max_queries", "20"),
        *("--save_total_limit", "1", "--metric_for_best_model", "multi_map"),
    )
    summary = json.loads((out / "train_summary.json").read_text())
    evaluations = summary["evaluations"]
    # step 0 = before any update; 15, the last step, on the same subset (the curve's end; the final eval is apart)
    assert [e["step"] for e in evaluations] == [0, 5, 10, 15]
    assert all(e["n_queries"] == 2 * 20 for e in evaluations)
    assert summary["eval_seconds"] > 0
    assert not (out / "checkpoint-15").exists()  # the last step saves the final model, not a checkpoint
    best = max(evaluations[1:3], key=lambda e: e["multi_map"])  # the best of the evaluated checkpoints
    progress = json.loads((out / f"checkpoint-{best['step']}" / "training_progress.json").read_text())
    assert progress["best_checkpoint"] == f"checkpoint-{best['step']}"
    saved = json.loads((out / f"checkpoint-{best['step']}" / "eval_results.json").read_text())
    assert saved["multi_map"] == pytest.approx(best["multi_map"])
    # The kept checkpoint's progress lists every evaluation up to its own step (a resume continues the curve).
    assert [e["step"] for e in progress["evaluations"]] == [
        e["step"] for e in evaluations if e["step"] <= best["step"]
    ]


def test_a_logged_loss_is_the_mean_of_the_steps_since_the_last_log(tiny_model_dir, mlqa_slice, tmp_path):
    """Logging every 2 steps of 5 records steps 2, 4 and 5 with the mean loss of their window (2, 2 and 1 steps), not
    the loss of the logged step alone: the same run logged every step gives the step losses."""
    from hbt_accel.config import parse_config
    from hbt_accel.training.run import train as train_in_process

    def history(logging_steps: str) -> list[dict]:
        args = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--max_steps", "5"]
        args += ["--per_device_train_batch_size", "8", "--mixed_precision", "no", "--logging_steps", logging_steps]
        cfg = parse_config([*FAST, *args, "--output_dir", str(tmp_path / logging_steps)])
        return train_in_process(cfg).summary.history

    each_step = [record["loss"] for record in history("1")]
    windowed = history("2")
    assert [(record["step"], record["steps_in_loss"]) for record in windowed] == [(2, 2), (4, 2), (5, 1)]
    expected = [np.mean(each_step[0:2]), np.mean(each_step[2:4]), each_step[4]]
    np.testing.assert_allclose([record["loss"] for record in windowed], expected, rtol=1e-6)
    assert len(set(each_step)) == 5  # the steps differ, so a window mean is not any one step's loss


def test_periodic_evaluation_leaves_the_training_trajectory_alone(dropout_model_dir, mlqa_slice, tmp_path):
    """With dropout on, a run evaluated every 2 steps trains exactly as one never evaluated: the evaluation draws no
    random number the training would draw next (a sweep re-run with a denser curve is the same training)."""
    from hbt_accel.config import parse_config
    from hbt_accel.training.run import train as train_in_process

    def step_losses(*evaluation: str) -> list[float]:
        args = ["--model_name_or_path", str(dropout_model_dir), "--train_data", str(mlqa_slice), "--max_steps", "4"]
        args += ["--per_device_train_batch_size", "8", "--mixed_precision", "no", "--logging_steps", "1"]
        cfg = parse_config([*FAST, *args, *evaluation, "--output_dir", str(tmp_path / str(len(evaluation)))])
        return [record["loss"] for record in train_in_process(cfg).summary.history]

    evaluated = (
        "--eval_steps",
        "2",
        "--eval_languages",
        "en,de",
        "--eval_max_queries",
        "8",
        "--eval_corpus_passages",
        "20",
    )
    assert step_losses(*evaluated) == step_losses()


def test_gradient_accumulation_steps_once_per_window_of_micro_batches(tiny_model_dir, mlqa_slice, tmp_path):
    """Accumulating 2 micro-batches of 8 = one optimizer step over the sampler's next two batches of 8: its logged
    loss is their mean, the schedule runs in optimizer steps, and the sampler is consumed twice as fast."""
    common = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--warmup_ratio", "0"]
    common += ["--per_device_train_batch_size", "8", "--learning_rate", "1e-12"]  # weights ~fixed: losses comparable
    train_here(*common, "--output_dir", str(tmp_path / "plain"), "--max_steps", "4")
    train_here(
        *common, "--output_dir", str(tmp_path / "accum"), "--max_steps", "2", "--gradient_accumulation_steps", "2"
    )
    plain = json.loads((tmp_path / "plain" / "train_summary.json").read_text())
    accum = json.loads((tmp_path / "accum" / "train_summary.json").read_text())
    assert accum["steps"] == 2 and sum(accum["batch_counts"].values()) == 4
    plain_losses = [record["loss"] for record in plain["history"]]
    accum_losses = [record["loss"] for record in accum["history"]]
    expected = [(plain_losses[0] + plain_losses[1]) / 2, (plain_losses[2] + plain_losses[3]) / 2]
    np.testing.assert_allclose(accum_losses, expected, rtol=1e-5)
    # linear decay over 2 optimizer steps, logged after each step's tick: half the peak, then 0 (not per micro-batch)
    np.testing.assert_allclose([record["lr"] for record in accum["history"]], [5e-13, 0.0], atol=1e-20)


def test_resume_gives_the_weights_of_an_uninterrupted_run(dropout_model_dir, tmp_path):
    common = [
        "--model_name_or_path",
        str(dropout_model_dir),
        "--max_steps",
        "6",
        "--save_steps",
        "3",
        "--per_device_train_batch_size",
        "8",
        "--mixed_precision",
        "no",
        "--learning_rate",
        "1e-3",
        "--num_hard_negatives",
        "1",
        "--save_total_limit",
        "5",
        "--logging_steps",
        "2",  # checkpoint-3 falls inside a logging window: the resumed run must carry step 3's loss over
    ]
    straight = tmp_path / "straight"
    train_here(*common, "--output_dir", str(straight))
    assert (straight / "checkpoint-3" / "training_progress.json").is_file()
    resumed = tmp_path / "resumed"
    log = train_here(*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(straight / "checkpoint-3"))
    assert "resumed from" in log and "at step 3" in log
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    # the training moved the weights: equality is not trivial
    initial = load_file(dropout_model_dir / "model.safetensors")
    moved = [n for n in a if n in initial and not torch.allclose(a[n], initial[n])]
    assert len(moved) > 10
    # the resumed run's summary covers the WHOLE run: the same steps, losses and batch counts as the straight one
    straight_summary = json.loads((straight / "train_summary.json").read_text())
    resumed_summary = json.loads((resumed / "train_summary.json").read_text())
    assert [(r["step"], r["steps_in_loss"]) for r in resumed_summary["history"]] == [(2, 2), (4, 2), (6, 2)]
    for key in ("loss", "X-X", "X-Y"):
        expected = [r[key] for r in straight_summary["history"]]
        assert [r[key] for r in resumed_summary["history"]] == pytest.approx(expected, abs=1e-6), key
    assert resumed_summary["batch_counts"] == straight_summary["batch_counts"]
    assert sum(resumed_summary["batch_counts"].values()) == 6
    assert (
        resumed_summary["train_seconds"]
        > json.loads((straight / "checkpoint-3" / "training_progress.json").read_text())["train_seconds"]
        > 0
    )


def test_resume_latest_requires_a_checkpoint(tiny_model_dir, tmp_path):
    result = train(
        "--model_name_or_path",
        str(tiny_model_dir),
        "--output_dir",
        str(tmp_path / "empty"),
        "--max_steps",
        "2",
        "--resume_from_checkpoint",
        "latest",
        check=False,
    )
    assert result.returncode == 2
    assert "resume_from_checkpoint: 'latest'" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "1.2"], "alpha: got 1.2, expected a probability in [0, 1]"),
        (["--sampling", "zz"], "sampling"),
        (["--per_device_train_batch_size", "5000"], "exceeds the 1148 distinct ids"),
        (["--num_layers", "3"], "num_layers: got 3, expected 0 (all) or 1 to 2"),
    ],
)
def test_bad_input_fails_before_training_in_one_line(tiny_model_dir, tmp_path, args, message):
    result = train(
        "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"), *args, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "global batch" not in result.stdout  # failed before the training banner


def test_data_file_with_a_missing_field(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps({"id": "1", "lang": "en", "query": "q", "positive": "p"})
        + "\n"
        + json.dumps({"id": "2", "lang": "de", "query": "q"})
        + "\n"
    )
    result = train(
        "--model_name_or_path",
        str(tiny_model_dir),
        "--output_dir",
        str(tmp_path / "o"),
        "--train_data",
        str(data),
        check=False,
    )
    assert result.returncode == 2
    assert f"{data}:2: missing field 'positive'" in result.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_a_diverging_run_stops_in_one_line_naming_the_last_good_checkpoint(tiny_model_dir, mlqa_slice, tmp_path):
    out = tmp_path / "run"
    common = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--output_dir", str(out)]
    common += ["--per_device_train_batch_size", "16", "--save_steps", "1", "--mixed_precision", "no"]
    train_here(*common, "--max_steps", "4", "--save_total_limit", "5", "--learning_rate", "1e-12")
    for name in ("model.safetensors", "train_summary.json"):
        (out / name).unlink()  # as if the run had stopped after its step-2 checkpoint
    shutil.rmtree(out / "checkpoint-3")
    good = load_file(out / "checkpoint-2" / "model" / "model.safetensors")
    # temperature 1e-40: scores / temperature overflow, the loss is NaN from the first step after the resume
    diverging = ["--temperature", "1e-40", "--allow_config_change", "true"]  # a deliberate change of settings
    result = train(*common, "--max_steps", "4", *diverging, "--resume_from_checkpoint", "latest", check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "warning: temperature 1e-40 is far below the usual 0.01-0.1: scores are multiplied by 1e+40" in (
        result.stdout
    )
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # one line, no traceback
    assert "Traceback" not in result.stderr
    assert line.startswith("error: step 3: loss nan") and "training diverged" in line and "temperature 1e-40" in line
    assert line.endswith(f"last good checkpoint: {out / 'checkpoint-2'}")
    assert not (out / "model.safetensors").exists() and not (out / "checkpoint-3").exists()
    assert all(
        torch.equal(good[k], v) for k, v in load_file(out / "checkpoint-2" / "model" / "model.safetensors").items()
    )


def test_skipped_nonfinite_steps_leave_the_weights_untouched(tiny_model_dir, mlqa_slice, tmp_path):
    out = tmp_path / "run"
    train_here(
        *("--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--output_dir", str(out)),
        *("--per_device_train_batch_size", "16", "--max_steps", "2", "--mixed_precision", "no"),
        *("--temperature", "1e-40", "--skip_nonfinite_steps", "5"),
    )
    summary = json.loads((out / "train_summary.json").read_text())  # strict JSON: the NaN losses are null
    assert [record["loss"] for record in summary["history"]] == [None, None]
    assert [(r["steps_in_loss"], r["nonfinite_steps_in_window"]) for r in summary["history"]] == [(0, 1), (0, 1)]
    initial = load_file(tiny_model_dir / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    assert all(torch.equal(initial[k], trained[k]) for k in trained if k in initial)


def test_a_run_that_fails_while_setting_up_frees_its_folder(tiny_model_dir, mlqa_slice, tmp_path, monkeypatch):
    """A failure after the run folder is taken (here: mining the first negatives) gives the folder up at once, though
    the traceback, which holds the half-built session, is still alive: the next try is not refused as in use."""
    from hbt_accel.config import parse_config
    from hbt_accel.training import run

    def failing_mining(session):
        raise RuntimeError("mining failed")

    monkeypatch.setattr(run, "start_negatives", failing_mining)
    out = tmp_path / "run"
    args = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--output_dir", str(out)]
    with pytest.raises(RuntimeError, match="mining failed") as failure:
        run.train(parse_config([*FAST, *args, "--max_steps", "1", "--mixed_precision", "no"]))
    probe = "import sys; from pathlib import Path; from hbt_accel.training.run_lock import folder_in_use; "
    probe += "print(folder_in_use(Path(sys.argv[1])))"
    another_process = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True)
    assert another_process.stdout.strip() == "None", another_process.stdout + another_process.stderr
    assert failure.value.__traceback__ is not None


def test_a_new_run_never_lands_on_another_run(tiny_model_dir, tmp_path):
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "train_summary.json").write_text('{"steps": 4}')
    (finished / "checkpoint-2").mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    common = ["--model_name_or_path", str(tiny_model_dir), "--max_steps", "4"]
    cases = [
        (["--output_dir", str(finished)], "already holds a run (train_summary.json, checkpoint-2)"),
        (["--output_dir", str(finished), "--resume_from_checkpoint", "latest"], "already finished (4 steps"),
        (["--output_dir", str(a_file)], "is a file, expected a folder"),
    ]
    for args, message in cases:
        result = train(*common, *args, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-1000:]
        assert len(result.stderr.strip().splitlines()) == 1 and "global batch" not in result.stdout
    assert (finished / "train_summary.json").read_text() == '{"steps": 4}'  # untouched


# ---------------------------------------------------------------- issue 14: mining, multi-positive, alignment
MINING = ["--hard_negative_mining", "true", "--num_hard_negatives", "2", "--mining_every_steps", "2"]


def test_resume_with_mined_negatives_gives_the_weights_of_an_uninterrupted_run(
    dropout_model_dir, mlqa_slice, tmp_path
):
    """Negatives are mined at steps 0, 2 and 4; a resume from step 3 must collate with the step-2 negatives of the
    run it continues (read from that run's folder), then mine at step 4 with the same weights."""
    common = [
        *("--model_name_or_path", str(dropout_model_dir), "--train_data", str(mlqa_slice), *MINING),
        *("--max_steps", "5", "--save_steps", "3", "--per_device_train_batch_size", "8", "--mixed_precision", "no"),
        *("--learning_rate", "1e-3", "--save_total_limit", "5", "--mining_margin", "0"),
    ]
    straight = tmp_path / "straight"
    log = train_here(*common, "--output_dir", str(straight))
    assert sorted(p.name for p in (straight / "mined_negatives").iterdir()) == [
        "step-0.json",
        "step-2.json",
        "step-4.json",
    ]
    assert log.count("mined 2 hard negatives for 192 queries") == 3
    resumed = tmp_path / "resumed"
    log = train_here(*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(straight / "checkpoint-3"))
    assert f"(loaded from {straight / 'mined_negatives' / 'step-2.json'})" in log
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    straight_losses = [r["loss"] for r in json.loads((straight / "train_summary.json").read_text())["history"]]
    resumed_losses = [r["loss"] for r in json.loads((resumed / "train_summary.json").read_text())["history"]]
    assert resumed_losses == pytest.approx(straight_losses, abs=1e-6)  # the summary covers the whole run
    # the step-4 negatives were mined with the same weights; the resumed run keeps its own copy of step 2
    mined = {
        name: json.loads((run / "mined_negatives" / "step-4.json").read_text())
        for name, run in [("a", straight), ("b", resumed)]
    }
    assert mined["a"]["queries"] == mined["b"]["queries"]
    assert (resumed / "mined_negatives" / "step-2.json").is_file()


def test_multilingual_multi_positive_alignment_and_mining_cached_equals_plain(tiny_model_dir, mlqa_slice, tmp_path):
    """Every issue-14 feature on at once, plain and GradCache: the same first two step losses (the same batch, then
    the same update)."""
    common = [
        *("--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), *MINING),
        *("--sampling", "multilingual", "--multi_positive", "true", "--passage_alignment_weight", "0.5"),
        *("--max_steps", "2", "--per_device_train_batch_size", "8", "--mixed_precision", "no", "--warmup_ratio", "0"),
        *("--learning_rate", "1e-3", "--mining_margin", "0"),
    ]
    plain = tmp_path / "plain"
    log = train_here(*common, "--output_dir", str(plain))
    assert "each query's answer in up to 3 languages" in " ".join(log.split())
    train_here(
        *common, "--output_dir", str(tmp_path / "cached"), "--cached_loss", "true", "--cache_mini_batch_size", "5"
    )
    losses = {
        run: [r["loss"] for r in json.loads((tmp_path / run / "train_summary.json").read_text())["history"]]
        for run in ("plain", "cached")
    }
    np.testing.assert_allclose(losses["cached"], losses["plain"], rtol=0, atol=1e-4)


def test_a_run_trains_on_the_train_split_and_scores_the_held_out_ids(tiny_model_dir, tmp_path):
    """How settings are chosen: `mlqa-r:train` for training, `mlqa-r:validation` for every evaluation."""
    from hbt_accel.data import is_validation_id

    out = tmp_path / "run"
    train_here(
        *("--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--train_data", "mlqa-r:train"),
        *("--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_benchmark", "mlqa-r:validation"),
        *("--eval_languages", "en,de", "--final_eval", "true"),
    )
    from hbt_accel.evaluation.grid import PER_QUERY_FILE, PerQueryScores

    scores = PerQueryScores.load(out / PER_QUERY_FILE)
    assert scores.benchmark == "mlqa-r:validation" and len(scores.languages) == 7
    assert scores.query_ids and all(is_validation_id(query_id) for query_id in scores.query_ids)
