from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hbt_accel.config import ConfigError, HbtConfig, parse_config, parse_dataclass

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_default_recipe_is_used_without_arguments():
    cfg = parse_config([])
    assert cfg.model_name_or_path == "embedded"
    assert cfg.sampling == "hybrid" and cfg.alpha == 0.5
    assert cfg.train_data == ["mlqa-r"] and cfg.eval_benchmark == "xquad-r"


def test_command_line_overrides_yaml_and_coerces_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("alpha: 0.3\nmax_steps: 7\nlora: false\n")
    cfg = parse_config(["--config", str(recipe), "--alpha", "0.6", "--lora", "--train_languages", "en,de"])
    assert cfg.alpha == 0.6 and cfg.max_steps == 7 and cfg.lora is True
    assert cfg.train_languages == ["en", "de"]
    cfg = parse_config(["--language_weights", "en=1,de=2", "--learning_rate=3e-5"])
    assert cfg.language_weights == {"en": "1", "de": "2"} and cfg.learning_rate == 3e-5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no_such_key", "1"], "unknown key 'no_such_key'"),
        (["--alpah", "0.5"], "did you mean 'alpha'?"),
        (["--alpha", "1.5"], "alpha: got 1.5, expected a probability in [0, 1]"),
        (["--sampling", "mixed"], "expected one of xx, xy, hybrid, xx_mixed, en_en"),
        (["--max_steps", "ten"], "--max_steps: got 'ten', expected an integer"),
        (["--lora", "maybe"], "expected true or false"),
        (["--push_to_hub"], "hub_model_id"),
    ],
)
def test_bad_input_names_the_field(argv, message):
    with pytest.raises(ConfigError, match=None) as error:
        parse_config(argv)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("learning_rat: 1e-5\n")
    with pytest.raises(ConfigError) as error:
        parse_config(["--config", str(recipe)])
    assert str(recipe) in str(error.value) and "'learning_rat'" in str(error.value)
    assert "did you mean 'learning_rate'?" in str(error.value)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_parses(recipe):
    cfg = parse_config(["--config", str(recipe)])
    assert isinstance(cfg, HbtConfig)


def test_recipes_exist():
    names = {str(p.relative_to(REPO / "recipes")) for p in RECIPES}
    assert "default.yaml" in names
    assert len(names) >= 7


def test_fixed_field_names_exist():
    fixed = """model_name_or_path output_dir max_steps num_train_epochs sampling alpha per_device_train_batch_size
    learning_rate temperature seed save_steps eval_steps resume_from_checkpoint lora lora_r gradient_checkpointing
    train_data eval_benchmark push_to_hub hub_model_id""".split()
    cfg = parse_dataclass(HbtConfig, [])
    for name in fixed:
        assert hasattr(cfg, name), name


def test_entry_point_rejects_unknown_key_in_one_line():
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "train_hybrid.py"), "--no_such_key", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_key" in lines[0], result.stderr
