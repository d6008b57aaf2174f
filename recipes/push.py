"""Upload a finished run folder to the Hugging Face Hub, alone: e.g. after the push at the end of training failed.

    python recipes/push.py --run_dir runs/default                  # repo, branch, privacy from its hbt_config.yaml
    python recipes/push.py --run_dir runs/default --hub_model_id me/hbt-e5 --hub_revision v2

The token is checked before anything is sent (as training does); what is uploaded is what the training's own push
sends: the model, its sentence-transformers files, the card and the reports, and with hub_push_checkpoints the
checkpoints' models (never their optimizer state).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from hbt_accel.config import ConfigError, HbtConfig, parse_dataclass, run_cli
from hbt_accel.errors import DataError


@dataclass
class PushArguments:
    run_dir: str = field(default="", metadata={"help": "a finished run folder (hbt_config.yaml, model, summary)"})
    hub_model_id: str = field(default="", metadata={"help": "repo id; empty = the run's hub_model_id"})
    hub_revision: str = field(default="", metadata={"help": "branch; empty = the run's hub_revision (or main)"})

    def validate(self) -> PushArguments:
        if not self.run_dir:
            raise ConfigError("--run_dir: missing (the run folder to upload)")
        return self


def main(args: PushArguments) -> str | None:
    from accelerate import PartialState

    from hbt_accel.publishing.hub import check_hub_access, push_finished_run
    from hbt_accel.run_record import CONFIG_FILE, SUMMARY_FILE, WEIGHTS_FILE

    run_dir = Path(args.run_dir)
    missing = [name for name in (CONFIG_FILE, SUMMARY_FILE, WEIGHTS_FILE) if not (run_dir / name).is_file()]
    if missing:
        raise DataError(f"--run_dir: {run_dir} is not a finished run (no {', '.join(missing)})")
    cfg = parse_dataclass(HbtConfig, [], default_yaml=run_dir / CONFIG_FILE)
    chosen = {"hub_model_id": args.hub_model_id, "hub_revision": args.hub_revision}
    cfg = dataclasses.replace(cfg, push_to_hub=True, **{key: value for key, value in chosen.items() if value})
    if not cfg.hub_model_id:
        raise ConfigError(f"--hub_model_id: {run_dir / CONFIG_FILE} names no repo; give one (e.g. me/hbt-e5)")
    check_hub_access(cfg)
    url = push_finished_run(PartialState(), cfg, run_dir)
    if url:
        print(f"pushed {run_dir} to {cfg.hub_model_id}: {url}")
    return url


if __name__ == "__main__":
    run_cli(main, PushArguments)
