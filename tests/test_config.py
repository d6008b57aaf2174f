from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hbt_accel.config import ConfigError, HbtConfig, parse_config, parse_dataclass

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "sweeps" not in p.parts)  # sweeps: test_sweep.py


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
        (
            ["--overwrite_output_dir", "true", "--resume_from_checkpoint", "auto"],
            "overwrite_output_dir: got True, expected false with resume_from_checkpoint auto",
        ),
        (["--train_xy_ids", "10"], "train_xy_ids: got 10, expected 0, or a number of ids whose two pairs fit"),
        (["--train_pairs", "100", "--train_xy_ids", "60"], "train_xy_ids: got 60"),
        (["--num_layers", "-2"], "num_layers: got -2, expected 0 (all layers) or a positive layer count"),
        (["--eval_benchmark", "mlqa-r:validation"], "whose questions train_data (mlqa-r) does not train on"),
        (["--train_data", "mlqa-r:train", "--eval_benchmark", "mlqa-r"], "train_data (mlqa-r:train) does not"),
    ],
)
def test_bad_input_names_the_field(argv, message):
    with pytest.raises(ConfigError, match=None) as error:
        parse_config(argv)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_the_two_sides_of_the_held_out_split_and_other_benchmarks_go_together():
    from hbt_accel.data import shares_questions

    assert parse_config(["--train_data", "mlqa-r:train", "--eval_benchmark", "mlqa-r:validation"])
    assert not shares_questions(["../shared/data/lareqa/mlqa-r"], "xquad-r")
    assert shares_questions(["xquad-r", "../shared/data/lareqa/mlqa-r:validation"], "mlqa-r:validation")  # a folder


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


@pytest.mark.parametrize(
    "env, launcher_env, launcher_args, cores, expected",
    [
        ({}, {}, [], 2, None),  # plain `python script.py`: torch already uses every core (or OMP_NUM_THREADS)
        ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}, {}, ["accelerate", "launch"], 2, 2),
        ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, {}, [], 8, 4),
        ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "4"}, {}, [], 2, 1),
        ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "1"}, [], 2, None),
        (
            {"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "3"},
            {},
            ["--num_cpu_threads_per_process", "3"],
            2,
            None,
        ),
        ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}, None, None, 2, None),  # unknown: respected
    ],
)
def test_launched_processes_take_their_share_of_the_cores_unless_the_user_chose(
    env, launcher_env, launcher_args, cores, expected
):
    from hbt_accel.distributed import choose_cpu_threads

    threads, why = choose_cpu_threads(env, launcher_env, launcher_args, cores)
    assert threads == expected and why


def test_an_empty_recipe_and_a_mistyped_choice_fail_in_one_line(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="the recipe is empty"):
        parse_config(["--config", str(empty)])
    with pytest.raises(ConfigError, match="did you mean 'hybrid'"):
        parse_config(["--sampling", "hybird"])


def test_a_missing_hbt_data_dir_is_an_error_not_a_silent_fallback(monkeypatch, tmp_path):
    from hbt_accel.data import DataError, resolve_data_dir

    monkeypatch.setenv("HBT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="HBT_DATA_DIR=.*nowhere: no such folder"):
        resolve_data_dir()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--mining_same_language_share", "1.5"],
            "mining_same_language_share: got 1.5, expected a fraction in [0, 1]",
        ),
        (["--mining_margin", "-1"], "mining_margin: got -1.0"),
        (["--hard_negative_mining", "--num_hard_negatives", "0"], "num_hard_negatives: got 0, expected 1 or more"),
        (["--mining_every_steps", "50"], "mining_every_steps: got 50, expected 0 unless hard_negative_mining"),
        (
            ["--hard_negative_mining", "--mining_every_steps", "50", "--dataloader_num_workers", "2"],
            "dataloader_num_workers: got 2, expected 0 with mining_every_steps",
        ),
        (["--passage_alignment_weight", "0.5"], "passage_alignment_weight: got 0.5, expected 0 unless sampling is"),
        (
            ["--sampling", "multilingual"],
            "sampling: got 'multilingual', expected multilingual only with multi_positive",
        ),
        (
            ["--sampling", "multilingual", "--passage_alignment_weight", "0.3"],
            "sampling: got 'multilingual', expected multilingual only with multi_positive",
        ),
        (["--sampling", "multilingual", "--multi_positive", "--answers_per_query", "1"], "answers_per_query: got 1"),
        (["--answers_per_query", "3"], "answers_per_query: got 3, expected 0 unless sampling is multilingual"),
    ],
)
def test_language_bias_fields_fail_in_one_line_before_any_work(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_config(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_language_bias_fields_are_off_by_default_and_combine():
    default = parse_config([])
    assert not default.hard_negative_mining and not default.multi_positive
    assert default.passage_alignment_weight == 0 and default.sampling != "multilingual"
    cfg = parse_config(
        ["--sampling", "multilingual", "--multi_positive", "--passage_alignment_weight", "0.3", "--cached_loss"]
        + ["--hard_negative_mining", "--mining_every_steps", "40"]
    )
    assert cfg.multi_positive and cfg.passage_alignment_weight == 0.3 and cfg.mining_every_steps == 40


def test_an_empty_output_dir_is_refused():
    """An empty output_dir would write the model, card and summary into the current folder (the checkout)."""
    from hbt_accel.config import parse_config

    with pytest.raises(ConfigError, match="output_dir: got '', expected a folder"):
        parse_config(["--output_dir", "", "--eval_benchmark", ""])


def test_tensorboard_without_its_package_is_refused_instead_of_logging_nothing(monkeypatch):
    """accelerate drops a tracker whose package is missing with a debug line only: the run would log nothing. The
    check is accelerate's own, so the two never disagree."""
    import accelerate.utils

    assert parse_config(["--report_to", "none"]).report_to == "none"
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^report_to: got 'tensorboard', expected none, or tensorboard once its"):
        parse_config(["--report_to", "tensorboard"])
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    assert parse_config(["--report_to", "tensorboard"]).report_to == "tensorboard"
