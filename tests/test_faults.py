"""Faults injected into real runs (HBT_FAULT, hbt_accel/errors.py): preemption signals, Ctrl-C, a full disk, two runs
in one folder, a resume with other settings. Each ends in its documented exit code and one line, and the
interrupted runs resume to the weights of an uninterrupted one with no step lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hbt_accel.distributed import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE
from hbt_accel.training.run_lock import OWNER_FILE
from tests.conftest import free_port
from tests.test_train import FAST, REPO, train_here

STEPS = 6


def run(*args: str, fault: str = "", launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1" if launcher else "2", "TOKENIZERS_PARALLELISM": "false"}
    if fault:
        env["HBT_FAULT"] = fault
    script = str(REPO / "recipes" / "train_hybrid.py")
    command = [sys.executable, *(["-m", "accelerate.commands.launch", *launcher] if launcher else []), script]
    return subprocess.run([*command, *FAST, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope="module")
def base_args(tiny_model_dir, mlqa_slice) -> list[str]:
    args = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--max_steps", str(STEPS)]
    return args + ["--per_device_train_batch_size", "16", "--mixed_precision", "no", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def straight(base_args, tmp_path_factory) -> dict:
    """The uninterrupted run's final weights."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run(*base_args, "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / "model.safetensors")


def assert_same_weights(a: dict, out: Path) -> None:
    b = load_file(out / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def stopped_then_resumed(
    base_args, out: Path, fault: str, code: int, extra=(), resume=("--resume_from_checkpoint", "latest")
) -> str:
    """Run with the fault: the exit code, and the run's last word on stderr (loading bars come before it); then the
    same command plus `resume`, which must resume, to the end. Returns that line."""
    result = run(*base_args, *extra, "--output_dir", str(out), fault=fault)
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    resumed = run(*base_args, *extra, "--output_dir", str(out), *resume)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-'}" in resumed.stdout
    return lines[-1]


# SIGTERM's run is started as the README's requeued Slurm job is: one command with `--resume_from_checkpoint auto` for
# the first start (no checkpoint yet) and every restart
@pytest.mark.parametrize(
    "signal_name, auto",
    [pytest.param("SIGTERM", True, id="SIGTERM-requeue-auto"), pytest.param("SIGUSR2", False, id="SIGUSR2-latest")],
)
def test_a_signal_mid_step_saves_that_step_and_the_resume_is_exact(base_args, straight, tmp_path, signal_name, auto):
    out = tmp_path / "run"
    how = {"extra": ("--resume_from_checkpoint", "auto"), "resume": ()} if auto else {}
    line = stopped_then_resumed(base_args, out, f"train_step:3:{signal_name}", REQUEUE_EXIT_CODE, **how)
    assert line.startswith(f"stopped by {signal_name} at step 3 of {STEPS}: saved {out / 'checkpoint-3'}")
    resume = "the same command as it is (--resume_from_checkpoint auto" if auto else "--resume_from_checkpoint latest"
    assert resume in line
    assert_same_weights(straight, out)
    history = json.loads((out / "train_summary.json").read_text())["history"]
    assert [entry["step"] for entry in history] == list(range(1, STEPS + 1))  # no step lost, none twice


def test_a_signal_during_a_periodic_evaluation_ends_it_and_saves(base_args, straight, tmp_path):
    """The 2nd evaluation is the one at step 2 (the 1st is step 0): the signal comes as it starts, and the check
    between its encoder batches ends it long before it would finish."""
    out = tmp_path / "run"
    periodic = ["--eval_steps", "2", "--eval_languages", "en,de", "--eval_max_queries", "10"]
    line = stopped_then_resumed(base_args, out, "evaluation:2:SIGTERM", REQUEUE_EXIT_CODE, periodic)
    assert line.startswith(f"stopped by SIGTERM at step 2 of {STEPS}: saved {out / 'checkpoint-2'}")
    assert_same_weights(straight, out)


def test_a_run_overwriting_a_finished_one_and_stopped_early_resumes_to_the_uninterrupted_weights(
    base_args, straight, tmp_path
):
    """--overwrite_output_dir over a finished run: stopped at step 3, the new run resumes (it is not taken for the
    old run, which had finished) and ends on the weights of a run never stopped."""
    out = tmp_path / "run"
    train_here(*base_args, "--output_dir", str(out), "--seed", "7")  # a finished run, other weights
    finished = load_file(out / "model.safetensors")
    assert not all(torch.equal(straight[name], finished[name]) for name in straight)
    overwrite = ("--overwrite_output_dir", "true")
    stopped_then_resumed(base_args, out, "train_step:3:SIGTERM", REQUEUE_EXIT_CODE, overwrite)
    assert_same_weights(straight, out)


def test_a_signal_during_the_final_evaluation_saves_the_last_step_and_the_resume_finishes_it(
    base_args, straight, tmp_path
):
    """A job preempted while scoring its final model (minutes of a default run): the last step is saved, and the
    resume trains nothing, scores the model and writes the summary a finished run has."""
    out = tmp_path / "run"
    final = ("--final_eval", "true", "--final_eval_max_queries", "20")
    line = stopped_then_resumed(base_args, out, "evaluation_encode:2:SIGTERM", REQUEUE_EXIT_CODE, final)
    assert line.startswith(f"stopped by SIGTERM at step {STEPS} of {STEPS}: saved {out / f'checkpoint-{STEPS}'}")
    assert_same_weights(straight, out)
    summary = json.loads((out / "train_summary.json").read_text())
    assert [entry["step"] for entry in summary["history"]] == list(range(1, STEPS + 1))
    assert json.loads((out / "eval_results.json").read_text())["n_queries"] == 20 * 11  # ids x XQuAD-R languages


def test_ctrl_c_saves_and_says_how_to_resume(base_args, straight, tmp_path):
    out = tmp_path / "run"
    line = stopped_then_resumed(base_args, out, "train_step:4:SIGINT", INTERRUPT_EXIT_CODE)
    assert line.startswith(f"interrupted (Ctrl-C) at step 4 of {STEPS}: saved {out / 'checkpoint-4'}")
    assert_same_weights(straight, out)


@pytest.mark.distributed
def test_a_signal_on_one_rank_stops_both_under_ddp_and_the_resume_matches(base_args, tmp_path):
    ddp = ["--config_file", str(REPO / "accelerate_configs" / "cpu_ddp.yaml")]
    args = [*base_args, "--per_device_train_batch_size", "8"]
    straight_out, stopped_out = tmp_path / "straight", tmp_path / "stopped"
    assert (
        run(
            *args, "--output_dir", str(straight_out), launcher=[*ddp, "--main_process_port", str(free_port())]
        ).returncode
        == 0
    )
    stopped = run(*args, "--output_dir", str(stopped_out), fault="train_step:3:SIGTERM:1",
                  launcher=[*ddp, "--main_process_port", str(free_port())])  # fmt: skip
    assert stopped.returncode != 0 and (stopped_out / "checkpoint-3").is_dir(), stopped.stderr[-3000:]
    assert f"stopped by SIGTERM at step 3 of {STEPS}" in stopped.stderr  # rank 1 got it; rank 0 says so
    resumed = run(*args, "--output_dir", str(stopped_out), "--resume_from_checkpoint", "latest",
                  launcher=[*ddp, "--main_process_port", str(free_port())])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(load_file(straight_out / "model.safetensors"), stopped_out)  # bitwise, as one process


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_nothing_half_written(base_args, tmp_path):
    out = tmp_path / "run"
    result = run(*base_args, "--output_dir", str(out), "--save_steps", "2", fault="save_checkpoint:2:ENOSPC")
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert line.startswith(f"error: {out}: no space left on the device while saving checkpoint-4")
    assert f"last good checkpoint: {out / 'checkpoint-2'}" in line and "MB free" in line
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".tmp", "checkpoint"))) == ["checkpoint-2"]


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_holder(base_args, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from hbt_accel.training.run_lock import "
         "lock_run_folder; lock = lock_run_folder(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run(*base_args, "--output_dir", str(out))
        assert result.returncode == 2
        assert f"error: output_dir: {out} is in use by a run of pid {holder.pid}" in result.stderr
        assert not (out / "hbt_config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock went with it, and the next run takes the folder
    assert json.loads((out / OWNER_FILE).read_text())["pid"] == holder.pid
    train_here(*base_args, "--output_dir", str(out), "--max_steps", "1")
    assert (out / "train_summary.json").is_file()


def test_a_resume_with_other_settings_lists_them_and_the_flag_that_forces_it(base_args, tmp_path):
    out = tmp_path / "run"
    train_here(*base_args, "--output_dir", str(out), "--save_steps", "2", "--max_steps", "3")
    (out / "train_summary.json").unlink()  # as if killed after checkpoint-2
    changed = ["--per_device_train_batch_size", "8", "--temperature", "0.1", "--max_steps", "4"]
    result = run(*base_args, "--output_dir", str(out), *changed, "--resume_from_checkpoint", "latest")
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip()
    assert "per_device_train_batch_size 16 -> 8" in line and "temperature 0.02 -> 0.1" in line
    assert "max_steps" not in line and "--allow_config_change true" in line
    train_here(*base_args, "--output_dir", str(out), *changed, "--resume_from_checkpoint", "latest",
               "--allow_config_change", "true")  # fmt: skip
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4  # forced through to the new end


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_evaluation_interrupted_by_ctrl_c_is_one_line(tiny_model_dir, tmp_path):
    env = {**os.environ, "HBT_FAULT": "evaluation_encode:1:SIGINT"}
    command = [sys.executable, "recipes/evaluate.py", "--model", str(tiny_model_dir), "--languages", "en,de"]
    # Ctrl-C as a terminal gives it: an ignored SIGINT is inherited, and an earlier test of the session can leave this
    # process ignoring it (the child then finishes with 0), so the child starts with the default disposition
    result = subprocess.run([*command, "--output_dir", str(tmp_path / "ev")], capture_output=True, text=True,
                            cwd=REPO, env=env, preexec_fn=default_sigint)  # fmt: skip
    assert result.returncode == INTERRUPT_EXIT_CODE
    assert result.stderr.strip().splitlines()[-1] == (
        "error: interrupted (Ctrl-C); files are written whole or not at all, so nothing half-written remains"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ev").exists()


def test_a_hub_model_without_network_or_cache_is_one_line_before_the_data_loads(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")}
    command = [sys.executable, "recipes/train_hybrid.py", "--model_name_or_path", "someone/no-such-model"]
    result = subprocess.run([*command, "--output_dir", str(tmp_path / "run")], capture_output=True, text=True,
                            cwd=REPO, env=env)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: model_name_or_path: cannot get the Hub model someone/no-such-model (HF_HUB_OFFLINE is set)"
    )
    assert "query-passage pairs" not in result.stdout and not (tmp_path / "run").exists()
