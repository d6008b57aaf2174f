"""benchmarks/gpu_check.py --smoke: the GPU check's own code, on CPU with tiny shapes, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_measures_every_part(tmp_path):
    output = tmp_path / "gpu_check.json"
    command = [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(output.read_text())
    assert record["smoke"] and record["environment"]["cpu"]
    assert record["environment"]["auto_training"].split(":")[0] in ("bf16", "fp32")
    recipe = record["default_recipe"]
    assert recipe["samples_per_second"] > 0 and recipe["sentence_transformers_samples_per_second"] > 0
    assert recipe["resolved"] in ("bf16", "no")
    large = record["large_encoder_lora"]
    assert 0 < large["trainable"] < large["parameters"] and large["tokens_per_second"] > 0
    assert large["estimate_mb"] > 0
    assert record["evaluation"]["passages_per_second"] > 0
    assert record["cuda_tests"]["skipped"] == "--smoke"
