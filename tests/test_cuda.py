"""The GPU paths, on a GPU: skipped without CUDA here; benchmarks/gpu_check.py runs them (`pytest -m cuda`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hbt_accel.models.precision import choose_precision, device_capabilities

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]


def test_auto_picks_what_this_gpu_computes():
    caps = device_capabilities()
    assert caps.device == "cuda"
    expected = "bf16" if torch.cuda.get_device_properties(0).major >= 8 else "fp16"  # Ampere and later: native
    assert choose_precision("auto", caps).precision == expected


def test_encoding_on_the_gpu_matches_the_cpu(tiny_encoder):
    texts = ["a short text", "ein etwas längerer deutscher Satz mit mehr Wörtern", "另一个句子"] * 5
    on_cpu = tiny_encoder.encode(texts, "passage", batch_size=4)
    on_gpu = tiny_encoder.to("cuda").encode(texts, "passage", batch_size=4)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4)


def test_a_training_step_on_the_gpu_matches_the_cpu(tiny_model_dir, mlqa_slice, tmp_path):
    """The default training step (sdpa attention, padded length buckets on CUDA) gives the CPU's fp32 loss."""
    from hbt_accel.config import parse_config
    from hbt_accel.training.run import setup, train_step

    losses = {}
    for where, env in (("cpu", "1"), ("cuda", "")):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("ACCELERATE_USE_CPU", env)
            flags = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice)]
            flags += ["--mixed_precision", "no", "--eval_benchmark", "", "--final_eval", "false"]
            flags += ["--per_device_train_batch_size", "8", "--num_hard_negatives", "0", "--max_steps", "2"]
            session = setup(parse_config([*flags, "--output_dir", str(tmp_path / where)]))
            assert session.accelerator.device.type == where
            losses[where] = train_step(session, next(iter(session.loader))).item()
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)
