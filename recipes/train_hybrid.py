"""Train a multilingual dense retriever with hybrid batch training (X-X / X-Y batches).

    accelerate launch recipes/train_hybrid.py                                  # recipes/default.yaml
    accelerate launch recipes/train_hybrid.py --config recipes/labse/hybrid.yaml --alpha 0.4
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml recipes/train_hybrid.py --max_steps 5

Any field of `hbt_accel.config.HbtConfig` can be set in the YAML or as `--field value`; `--help` lists them.
"""

from __future__ import annotations

from hbt_accel.config import DEFAULT_RECIPE, HbtConfig, run_cli
from hbt_accel.training.run import main

if __name__ == "__main__":
    run_cli(main, HbtConfig, default_yaml=DEFAULT_RECIPE)
