"""A non-editable install works: the wheel carries the library, the model-card template and the recipes, and its
training entry point trains one step from the packaged default recipe, run from a folder outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(command: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "TOKENIZERS_PARALLELISM": "false",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory) -> Path:
    """A fresh venv that sees this machine's packages (torch & co.) and has hbt_accel from the built wheel only."""
    work = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", work / "dist", REPO], work)
    wheel = next((work / "dist").glob("hbt_accel-*.whl"))
    run([sys.executable, "-m", "venv", "--system-site-packages", work / "venv"], work)
    python = work / "venv" / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", wheel], work)
    return python


def test_the_wheel_trains_one_step_from_its_packaged_default_recipe(
    wheel_python, tiny_model_dir, mlqa_slice, tmp_path
):
    where = run(
        [wheel_python, "-c", "import hbt_accel, hbt_accel.config as c; print(hbt_accel.__file__, c.DEFAULT_RECIPE)"],
        tmp_path,
    )
    library, recipe = where.stdout.split()
    assert str(wheel_python.parents[1]) in library and str(REPO) not in library  # the wheel's copy, not the checkout
    assert Path(recipe).is_file() and str(REPO) not in recipe
    help_text = run([wheel_python, "-m", "hbt_accel.recipes.train_hybrid", "--help"], tmp_path).stdout
    assert "--eval_corpus_passages" in help_text and "--sampling" in help_text
    out = tmp_path / "run"
    run(
        [
            wheel_python, "-m", "hbt_accel.recipes.train_hybrid", "--max_steps", "1",
            "--model_name_or_path", tiny_model_dir, "--train_data", mlqa_slice, "--output_dir", out,
            "--per_device_train_batch_size", "8", "--eval_benchmark", "", "--final_eval", "false",
            "--mixed_precision", "no", "--query_max_length", "32", "--passage_max_length", "48",
        ],
        tmp_path,
    )  # fmt: skip
    assert (out / "train_summary.json").is_file() and (out / "model.safetensors").is_file()
    assert "hbt-accel model card" in (out / "README.md").read_text()  # the template came from the wheel
    sweeps = run(
        [
            wheel_python,
            "-c",
            "import hbt_accel.config as c; print(len(list((c.RECIPES_DIR / 'sweeps').glob('*.yaml'))))",
        ],
        tmp_path,
    )
    assert int(sweeps.stdout) >= 7


def test_code_version_names_the_commit_in_a_checkout_and_the_version_alone_elsewhere(monkeypatch, tmp_path):
    """Run summaries record it: the same config and seed trained differently before and after some commits."""
    from importlib import metadata

    from hbt_accel import run_record

    version = metadata.version("hbt-accel")
    checkout = tmp_path / "checkout"
    (checkout / "hbt_accel").mkdir(parents=True)
    (checkout / "hbt_accel" / "code.py").write_text("A = 1\n")
    (checkout / "notes.md").write_text("a\n")
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-qm", "first"]):
        subprocess.run([*git, *command], check=True)
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(run_record, "CHECKOUT", checkout)
    assert run_record.code_version() == f"{version}, git {head}"
    (checkout / "notes.md").write_text("b\n")  # not code: still the commit's
    assert run_record.code_version() == f"{version}, git {head}"
    (checkout / "hbt_accel" / "code.py").write_text("A = 2\n")
    assert run_record.code_version() == f"{version}, git {head} with uncommitted changes to hbt_accel/ or recipes/"
    monkeypatch.setattr(run_record, "CHECKOUT", tmp_path / "elsewhere")  # an installed package: no checkout
    assert run_record.code_version() == version
