"""The precision choice: a function of the device's capabilities, tested with the inputs of each kind of machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hbt_accel.config import parse_config
from hbt_accel.errors import ConfigError
from hbt_accel.models import precision
from hbt_accel.models.precision import DeviceCapabilities, choose_precision, eval_choice

XEON_NO_BF16 = DeviceCapabilities("cpu", "Intel Xeon (Cascade Lake)", frozenset({"avx512f", "avx512_vnni"}))
EPYC_BF16 = DeviceCapabilities("cpu", "AMD EPYC 9R14", frozenset({"avx512f", "avx512_bf16"}), bf16_speedup=3.1)
XEON_AMX = DeviceCapabilities("cpu", "Intel Xeon", frozenset({"avx512_bf16", "amx_bf16"}), bf16_speedup=7.2)
FLAGS_BUT_SLOW = DeviceCapabilities("cpu", "some CPU", frozenset({"avx512_bf16"}), bf16_speedup=1.1)
ARM_BF16 = DeviceCapabilities("cpu", "Neoverse-V1", frozenset({"asimd", "bf16"}), bf16_speedup=2.0)
H200 = DeviceCapabilities("cuda", "NVIDIA H200", cuda_bf16=True)
V100 = DeviceCapabilities("cuda", "Tesla V100-SXM2-32GB", cuda_bf16=False)


@pytest.mark.parametrize(
    "caps, precision_chosen, reason",
    [
        (XEON_NO_BF16, "no", "fp32: this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag)"),
        (EPYC_BF16, "bf16", "bf16: avx512_bf16 present, probe 3.1x fp32"),
        (XEON_AMX, "bf16", "bf16: avx512_bf16, amx_bf16 present, probe 7.2x fp32"),
        (FLAGS_BUT_SLOW, "no", "fp32: avx512_bf16 present but the probe gives bf16 1.1x fp32"),
        (ARM_BF16, "bf16", "bf16: bf16 present, probe 2.0x fp32"),
        (H200, "bf16", "bf16: NVIDIA H200 computes bf16 natively"),
        (V100, "fp16", "fp16 with a gradient scaler: Tesla V100-SXM2-32GB has no bf16"),
    ],
)
def test_auto_follows_the_device(caps, precision_chosen, reason):
    choice = choose_precision("auto", caps)
    assert (choice.precision, choice.reason) == (precision_chosen, reason)


def test_auto_without_a_probe_result_stays_in_fp32():
    unprobed = DeviceCapabilities("cpu", "Intel Xeon", frozenset({"amx_bf16"}))
    assert choose_precision("auto", unprobed).precision == "no"


def test_explicit_choices_are_respected_and_impossible_ones_refused():
    assert choose_precision("no", EPYC_BF16).precision == "no"
    slow = choose_precision("bf16", XEON_NO_BF16)
    assert slow.precision == "bf16" and "warning: this CPU has no native bf16" in slow.reason
    assert choose_precision("bf16", XEON_AMX).reason == "bf16, as asked"
    assert choose_precision("fp16", V100).precision == "fp16"
    with pytest.raises(ConfigError, match="mixed_precision: fp16 needs a CUDA GPU and this run is on Intel Xeon"):
        choose_precision("fp16", XEON_AMX)
    with pytest.raises(ConfigError, match="mixed_precision: bf16 is not supported by Tesla V100"):
        choose_precision("bf16", V100)
    with pytest.raises(ConfigError, match="mixed_precision: got 'fp8'"):
        choose_precision("fp8", H200)


def test_evaluation_encodes_in_bf16_or_fp32_only():
    assert eval_choice("auto", V100).precision == "no"
    assert eval_choice("auto", H200).precision == "bf16"
    assert eval_choice("auto", XEON_NO_BF16).precision == "no"
    assert eval_choice("auto", XEON_AMX).precision == "bf16"
    # what the encode-only benchmarks print beside their numbers
    assert [eval_choice("auto", caps).label for caps in (V100, XEON_AMX)] == ["fp32", "bf16"]
    assert choose_precision("fp16", V100).label == "fp16"
    with pytest.raises(ConfigError, match="eval_precision: bf16 is not supported"):
        eval_choice("bf16", V100)


def test_the_probe_runs_once_per_machine_and_the_cache_survives_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: calls.append(1) or 2.5)
    flags = frozenset({"amx_bf16", "sse2"})
    assert precision.cached_bf16_speedup("cpu A", flags) == 2.5
    assert precision.cached_bf16_speedup("cpu A", flags) == 2.5
    assert len(calls) == 1  # the second read is the cache
    assert precision.cached_bf16_speedup("cpu B", flags) == 2.5 and len(calls) == 2  # another machine: measured
    cache = tmp_path / "hbt_accel" / "bf16_probe.json"
    assert len(json.loads(cache.read_text())) == 2
    cache.write_text("{not json")
    assert precision.cached_bf16_speedup("cpu A", flags) == 2.5 and len(calls) == 3


def test_the_probe_measures_a_ratio_and_leaves_the_random_stream_alone():
    import torch

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert precision.measure_bf16_speedup(repeats=1) > 0
    assert torch.equal(torch.rand(3), expected)  # a run's seeded stream must not depend on whether the probe ran


def test_cpuinfo_is_read_for_x86_and_arm(tmp_path, monkeypatch):
    x86 = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx512_bf16 amx_bf16\n\nprocessor\t: 1\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16\nCPU part\t: 0xd40\n"
    for text, name, flag in ((x86, "Intel(R) Xeon(R)", "amx_bf16"), (arm, "unknown CPU", "bf16")):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(precision, "CPUINFO", path)
        found_name, flags = precision.cpu_description()
        assert found_name == name and flag in flags


def test_recipes_default_to_auto():
    cfg = parse_config([])
    assert (cfg.mixed_precision, cfg.eval_precision) == ("auto", "auto")
    assert parse_config(["--eval_precision", "no"]).eval_precision == "no"


def test_an_old_run_config_with_eval_bf16_still_loads(tmp_path):
    old = tmp_path / "hbt_config.yaml"
    old.write_text("eval_bf16: false\nmax_steps: 3\n")
    assert parse_config([], default_yaml=old).eval_precision == "no"


def test_fp16_on_a_cpu_fails_in_one_line_before_any_work(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "recipes/train_hybrid.py", "--mixed_precision", "fp16", "--output_dir", str(run)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: mixed_precision: fp16 needs a CUDA GPU")
    assert len(result.stderr.strip().splitlines()) == 1 and not run.exists()
