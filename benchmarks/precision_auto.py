"""`mixed_precision: auto` against both explicit precisions, side by side, on the README's own commands.

    python benchmarks/precision_auto.py                 # 8 training steps and one evaluation per precision, x2
    python benchmarks/precision_auto.py --rounds 1 --docs_dir ''

Training: `accelerate launch recipes/train_hybrid.py --max_steps 8 --eval_benchmark '' --final_eval false
--save_steps 0 --logging_steps 1 --mixed_precision P` (the default recipe otherwise), samples/s = the median of its
own per-step log after the first 2 steps. Evaluation: `recipes/evaluate.py --model embedded --languages en,de
--max_queries 100 --precision P`, its encode + score seconds. The precisions run interleaved (auto, bf16, no, auto,
...) so drift of the machine falls on all of them. The goal (issue 31): auto within 10% of the faster explicit one.
Writes docs/benchmarks/precision_auto.json and the results.md section "precision_auto".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from report import invocation, publish, run_benchmark

from hbt_accel.atomic import write_json
from hbt_accel.models.precision import machine_description
from hbt_accel.run_record import CONFIG_FILE, read_summary

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--max_steps", "8", "--eval_benchmark", "", "--final_eval", "false", "--save_steps", "0"]
TRAIN += ["--logging_steps", "1"]
EVALUATE = ["--model", "embedded", "--languages", "en,de", "--max_queries", "100"]
WARMUP_STEPS = 2


def train_once(precision: str) -> tuple[float, str]:
    """(samples/s after warm-up, the precision the run resolved) of one 8-step run of the README's command."""
    with tempfile.TemporaryDirectory() as output_dir:
        command = ["accelerate", "launch", str(REPO / "recipes" / "train_hybrid.py"), *TRAIN]
        command += ["--mixed_precision", precision, "--output_dir", output_dir]
        run(command)
        history = read_summary(output_dir)["history"]
        chosen = yaml.safe_load((Path(output_dir) / CONFIG_FILE).read_text())["mixed_precision"]
    return statistics.median(entry["samples_per_second"] for entry in history[WARMUP_STEPS:]), chosen


def evaluate_once(precision: str) -> float:
    """Encode + score seconds of the evaluation command (model loading excluded)."""
    with tempfile.TemporaryDirectory() as output_dir:
        run([sys.executable, str(REPO / "recipes" / "evaluate.py"), *EVALUATE, "--precision", precision,
             "--output_dir", output_dir])  # fmt: skip
        return json.loads((Path(output_dir) / "eval_results.json").read_text())["seconds"]


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of the three precisions")
    parser.add_argument("--docs_dir", default=str(REPO / "docs"), help="'' = print only")
    args = parser.parse_args()
    machine = machine_description()
    print(json.dumps(machine, indent=1))
    precisions = ("auto", "bf16", "no")
    train = {p: [] for p in precisions}
    evaluate = {p: [] for p in precisions}
    chosen = {}
    for _ in range(args.rounds):
        for precision in precisions:
            samples_per_second, chosen[precision] = train_once(precision)
            train[precision].append(samples_per_second)
            evaluate[precision].append(evaluate_once(precision))
            print(f"{precision}: {samples_per_second:.2f} samples/s, evaluation {evaluate[precision][-1]:.1f} s")
    record = summarise(machine, chosen, train, evaluate)
    if args.docs_dir:
        write_json(Path(args.docs_dir) / "benchmarks" / "precision_auto.json", record)
    publish(args.docs_dir, "precision_auto", section(record))


def summarise(machine: dict, chosen: dict, train: dict, evaluate: dict) -> dict:
    train_median = {p: statistics.median(v) for p, v in train.items()}
    eval_median = {p: statistics.median(v) for p, v in evaluate.items()}
    best_train = max(train_median["bf16"], train_median["no"])
    best_eval = min(eval_median["bf16"], eval_median["no"])
    return {
        "date": time.strftime("%Y-%m-%d"),
        "command": invocation(),
        "machine": machine,
        "auto_resolved_to": chosen["auto"],
        "train_samples_per_second": train,
        "eval_seconds": evaluate,
        "auto_train_vs_best": train_median["auto"] / best_train,
        "auto_eval_vs_best": best_eval / eval_median["auto"],
    }


def section(record: dict) -> list[str]:
    machine, train, evaluate = record["machine"], record["train_samples_per_second"], record["eval_seconds"]
    flags = ", ".join(machine["cpu_bf16_flags"]) or "no native bf16 flag"
    lines = [
        "## Precision: auto against bf16 and fp32",
        "",
        f"`{record['command']}` on {record['date']}: {machine['cpu']} ({flags}; bf16 probe "
        f"{machine['bf16_probe_speedup'] or 'not run'}x), {machine['torch_threads']} threads, GPU "
        f"{machine['gpu'] or 'none'}. auto chose {record['auto_resolved_to']} ({machine['auto_training']}).",
        "",
        "| precision | training samples/s (8 steps, median after 2; each round) | evaluation s (en, de, 100 ids) |",
        "|---|---|---|",
    ]
    for precision in train:
        runs = " / ".join(f"{v:.2f}" for v in train[precision])
        lines.append(f"| {precision} | {runs} | {' / '.join(f'{v:.1f}' for v in evaluate[precision])} |")
    lines += [
        "",
        f"auto trains at {record['auto_train_vs_best']:.2f}x and evaluates at {record['auto_eval_vs_best']:.2f}x the "
        "faster explicit precision (medians over the rounds; goal: within 10%).",
    ]
    return lines


if __name__ == "__main__":
    run_benchmark(main)
