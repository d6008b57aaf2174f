"""The distributed paths really run on CPU: DDP over gloo, DeepSpeed ZeRO-2/3 (+ offload), LoRA under ZeRO-3, and
two "nodes" on 127.0.0.1. Each run checks the world size, a falling loss and that the saved model reloads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port
from tests.test_train import train_here

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "accelerate_configs"
pytestmark = pytest.mark.distributed


def training_args(model_dir: Path, data: Path, output_dir: Path) -> list[str]:
    # 64 ids, global batch 16: 4 batches an epoch, so 24 steps fit the slice well enough to see the loss fall
    return [
        str(REPO / "recipes" / "train_hybrid.py"),
        "--model_name_or_path",
        str(model_dir),
        "--train_data",
        str(data),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "24",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "2e-3",
        "--warmup_ratio",
        "0",
        "--logging_steps",
        "1",
        "--final_eval",
        "false",
        "--mixed_precision",
        "no",
        "--query_max_length",
        "32",
        "--passage_max_length",
        "48",
        "--freeze_word_embeddings",
        "false",  # a tiny random BERT learns mostly in its word embeddings
    ]


def launch(launcher_args: list[str], args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(result.stdout[-3000:] + "\n" + result.stderr[-4000:])
    return result


# LoRA dropout off: 2 processes of 8 rows and 1 of 16 draw different dropout masks, which would make step 2 differ by
# chance (the tiny model's own dropout is 0 for the same reason).
LORA = ["--lora", "true", "--lora_r", "8", "--lora_dropout", "0", "--learning_rate", "3e-2"]


def single_process_run(model_dir: Path, data: Path, out: Path, extra: list[str] = ()) -> list[dict]:
    """The same run in ONE process with the whole global batch of 16: the reference trajectory (per-step records),
    trained in this process (no launch is under test here)."""
    args = training_args(model_dir, data, out)[1:]  # [0] is the script
    train_here(*args, "--per_device_train_batch_size", "16", *extra)
    return json.loads((out / "train_summary.json").read_text())["history"]


@pytest.fixture(scope="module")
def single_process_history(tiny_model_dir, mlqa_slice, tmp_path_factory) -> list[dict]:
    return single_process_run(tiny_model_dir, mlqa_slice, tmp_path_factory.mktemp("single") / "run")


def check_run(
    result_stdout: str,
    output_dir: Path,
    reference: list[dict] | None = None,
    window: int = 4,
    margin: float = 0.2,
    step2_atol: float = 1e-4,
) -> None:
    assert "world size 2" in result_stdout, result_stdout[-2000:]
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 16
    losses = [record["loss"] for record in summary["history"]]
    first, last = np.mean(losses[:window]), np.mean(losses[-window:])
    assert last < first - margin, (first, last)
    if reference is not None:
        # same global batches, cross-device negatives, averaged gradients: step 1 (the loss) and step 2 (after one
        # update) equal one process on the whole batch; later steps drift apart by float summation order, which
        # Adam amplifies on near-zero gradients.
        np.testing.assert_allclose(losses[0], reference[0]["loss"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(losses[1], reference[1]["loss"], rtol=0, atol=step2_atol)
        # the learning-rate schedule runs in global steps whatever the world size (accelerate's prepared scheduler
        # would otherwise advance once per process per step and end the decay halfway through)
        lrs = [record["lr"] for record in summary["history"]]
        np.testing.assert_allclose(lrs, [record["lr"] for record in reference], rtol=1e-9, atol=0)
    from hbt_accel.models.dual_encoder import DualEncoder

    vectors = DualEncoder.from_pretrained(output_dir).encode(["Wer schrieb Faust?", "Who wrote Faust?"], "query")
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


EVERY_4 = ["--save_steps", "4", "--save_total_limit", "3"]
DDP = ["--config_file", str(CONFIGS / "cpu_ddp.yaml")]


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, mlqa_slice, tmp_path_factory) -> tuple[str, Path]:
    """One uninterrupted 2-process DDP run with checkpoints (they change nothing in the trajectory): checked
    against one process below, and the reference of the kill-and-resume test. (its stdout, its folder)"""
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = launch(
        [*DDP, "--main_process_port", str(free_port())], training_args(tiny_model_dir, mlqa_slice, out) + EVERY_4
    )
    return result.stdout, out


def test_two_process_ddp_training(ddp_run, single_process_history):
    check_run(*ddp_run, single_process_history)


@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml"])
def test_two_process_training(config, tiny_model_dir, mlqa_slice, single_process_history, tmp_path):
    out = tmp_path / "run"
    result = launch(
        ["--config_file", str(CONFIGS / config), "--main_process_port", str(free_port())],
        training_args(tiny_model_dir, mlqa_slice, out),
    )
    check_run(result.stdout, out, single_process_history)


def test_lora_under_zero3_saves_adapter_and_merged_model(tiny_model_dir, mlqa_slice, tmp_path):
    out = tmp_path / "lora"
    args = training_args(tiny_model_dir, mlqa_slice, out) + LORA
    result = launch(
        ["--config_file", str(CONFIGS / "deepspeed_zero3.yaml"), "--main_process_port", str(free_port())], args
    )
    reference = single_process_run(tiny_model_dir, mlqa_slice, tmp_path / "lora_single", LORA)
    # LoRA (query/value adapters) on a random tiny BERT learns slowly: no loss-drop margin here, but the first two
    # steps (loss, then loss after one sharded update of the adapters) must equal the single-process run.
    # (Adam's first step is ~lr * sign(grad): summation-order noise on near-zero LoRA-B gradients moves step 2 by
    # ~4e-3 at this learning rate, hence the looser step-2 tolerance.)
    check_run(result.stdout, out, reference, margin=-np.inf, step2_atol=1e-2)
    # the adapter on the base model gives the merged model's embeddings
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from hbt_accel.models.dual_encoder import DualEncoder

    merged = DualEncoder.from_pretrained(out)
    base = DualEncoder.from_pretrained(tiny_model_dir, settings=merged.settings)
    base.backbone = PeftModel.from_pretrained(base.backbone, out / "adapter")
    texts = ["Wer schrieb Faust?", "Goethe schrieb Faust."]
    np.testing.assert_allclose(base.encode(texts, "query"), merged.encode(texts, "query"), atol=1e-5)
    # and the adapter really learned something
    plain = DualEncoder.from_pretrained(tiny_model_dir, settings=merged.settings).encode(texts, "query")
    assert np.abs(plain - merged.encode(texts, "query")).max() > 1e-3
    assert isinstance(AutoModel.from_pretrained(out), torch.nn.Module)


def test_two_nodes_on_localhost(tiny_model_dir, mlqa_slice, tmp_path):
    out = tmp_path / "nodes"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    nodes = []
    for rank in (0, 1):
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / "multi_node.yaml"),
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--mixed_precision",
            "no",
            *training_args(tiny_model_dir, mlqa_slice, out),
        ]
        nodes.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        )
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-2000:] + stderr[-3000:]
    check_run(outputs[0][0], out)


def test_a_run_killed_under_ddp_resumes_to_the_weights_of_an_uninterrupted_one(
    ddp_run, tiny_model_dir, mlqa_slice, tmp_path
):
    """kill -9 of both processes mid-run (after the step-8 checkpoint), then `--resume_from_checkpoint latest`."""
    import signal
    import time

    import psutil
    import torch
    from safetensors.torch import load_file

    _, straight = ddp_run
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", *DDP, "--main_process_port", str(free_port())]
    command += training_args(tiny_model_dir, mlqa_slice, killed) + EVERY_4
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-8").is_dir() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # the launcher and both training processes at once (torch's launcher puts its workers in sessions of their own)
    tree = psutil.Process(run.pid)
    for process in [*tree.children(recursive=True), tree]:
        process.send_signal(signal.SIGKILL)
    run.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"

    result = launch([*DDP, "--main_process_port", str(free_port())],
                    training_args(tiny_model_dir, mlqa_slice, killed) + EVERY_4
                    + ["--resume_from_checkpoint", "latest"])  # fmt: skip
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", result.stdout).group(1))
    assert 8 <= resumed_at < 24 and resumed_at % 4 == 0
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    summary = json.loads((killed / "train_summary.json").read_text())
    assert [r["step"] for r in summary["history"]] == list(range(1, 25))
    assert not list(killed.glob(".tmp-*"))
