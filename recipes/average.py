"""Average the weights of finished runs of one recipe (e.g. its seeds) into a new model folder.

    python recipes/average.py --runs runs/a,runs/b,runs/c --output_dir runs/soup
    python recipes/evaluate.py --model runs/soup --benchmark mlqa-r:validation --output_dir runs/soup/eval

The folder loads like any trained model (`DualEncoder`, `SentenceTransformer`, `AutoModel`); `averaged_from.json`
names the runs. Runs with different encoder settings or tensors are refused in one line before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hbt_accel.config import ConfigError, run_cli


@dataclass
class AverageArguments:
    runs: list = field(default_factory=list, metadata={"help": "two or more model folders of one recipe, a,b,c"})
    output_dir: str = field(default="", metadata={"help": "the new model folder (must not hold anything yet)"})

    def validate(self) -> AverageArguments:
        if not self.output_dir:
            raise ConfigError("--output_dir: missing (where the averaged model goes)")
        return self


def main(args: AverageArguments) -> None:
    from hbt_accel.training.averaging import average_models

    folder = average_models(args.runs, args.output_dir)
    print(f"averaged {len(args.runs)} runs into {folder}")


if __name__ == "__main__":
    run_cli(main, AverageArguments)
