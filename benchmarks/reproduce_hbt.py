"""Reproduce the paper's X-X / X-Y / hybrid comparison on real data, on this machine.

    python benchmarks/reproduce_hbt.py                                  # untrained, xx, xy, hybrid -> docs/results.*
    python benchmarks/reproduce_hbt.py --alphas 0,0.25,0.75,1           # add an alpha sweep (hybrid with those alphas)
    python benchmarks/reproduce_hbt.py --tune                           # the MLQA-R validation runs used for tuning

Every run uses `recipes/default.yaml` (embedded multilingual-e5-small, MLQA-R, same steps, seed and hyperparameters)
and differs ONLY in `sampling` (and `alpha`). Each model, and the untrained one, is scored on the FULL XQuAD-R grid
(11 languages x 1,190 questions; el, ru, th, tr never seen in training). Tuning never looks at XQuAD-R: `--tune`
trains on 85% of the MLQA-R ids and scores the other 15%.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from report import invocation, run_benchmark, write_section

from hbt_accel.atomic import write_atomic
from hbt_accel.evaluation.grid import RESULTS_FILE
from hbt_accel.evaluation.schema import HEADLINE, HEADLINE_KEYS
from hbt_accel.run_record import CONFIG_FILE, SUMMARY_FILE, read_summary

REPO = Path(__file__).resolve().parents[1]
UNSEEN = ("el", "ru", "th", "tr")  # XQuAD-R languages absent from MLQA-R
# The metric-by-step curves: a subset (two trained languages, two never trained on), so that each point costs ~30 s.
PERIODIC_EVAL = ["--eval_steps", "50", "--eval_languages", "en,de,ru,th", "--eval_max_queries", "300"]
PERIODIC_EVAL_NOTE = "every 50 steps on en, de, ru, th with 300 questions each; full pools of those languages"
PAPER = {  # arXiv 2408.10536, XQuAD-R: mono / cross / multi mAP, rank distance
    "XLM-R hybrid (paper)": (0.798, 0.705, 0.593, 286.6),
    "LaBSE hybrid (paper)": (0.817, 0.767, 0.682, 221.1),
}


def run(command: list[str], log: Path) -> float:
    """Run a command with its output in `log`; returns wall seconds; a failure ends the script with the log tail."""
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(command)}\n" + log.read_text()[-3000:])
    return time.perf_counter() - started


def finished(output_dir: Path, *files: str) -> bool:
    """A run whose outputs exist is reused (delete its folder to redo it)."""
    done = all((output_dir / name).is_file() for name in files)
    if done:
        print(f"reusing {output_dir} (delete it to run again)", flush=True)
    return done


def train(name: str, runs: Path, overrides: list[str]) -> dict:
    output_dir = runs / name
    command = [sys.executable, str(REPO / "recipes" / "train_hybrid.py"), "--output_dir", str(output_dir), *overrides]
    reused = finished(output_dir, SUMMARY_FILE, RESULTS_FILE)
    wall = 0.0 if reused else run(command, runs / f"{name}.log")
    summary = read_summary(output_dir)
    results = json.loads((output_dir / RESULTS_FILE).read_text())
    return {
        "results": results,
        "train_seconds": summary["train_seconds"],
        "wall_seconds": wall,
        "dir": output_dir,
        "history": summary["history"],
        "evaluations": summary.get("evaluations", []),
    }


def evaluate_untrained(runs: Path, bf16: bool) -> dict:
    output_dir = runs / "untrained"
    command = [
        sys.executable,
        str(REPO / "recipes" / "evaluate.py"),
        "--model",
        "embedded",
        "--benchmark",
        "xquad-r",
        "--output_dir",
        str(output_dir),
    ] + ["--precision", "bf16" if bf16 else "no"]
    wall = 0.0 if finished(output_dir, RESULTS_FILE) else run(command, runs / "untrained.log")
    results = json.loads((output_dir / RESULTS_FILE).read_text())
    return {"results": results, "train_seconds": 0.0, "wall_seconds": wall, "dir": output_dir}


def unseen_view(results: dict) -> dict:
    """mono / cross / multi mAP and rank distance restricted to queries in languages never trained on."""
    from hbt_accel.evaluation.grid import language_view

    return language_view(results, UNSEEN)


def row(name: str, metrics: dict, extra: str = "") -> str:
    return f"| {name} | " + " | ".join(m.format(metrics[m.key]) for m in HEADLINE) + f" |{extra}"


def write_results(entries: dict, docs: Path, command: str, wall: float, budget: str, sweep: dict) -> None:
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    every_run = {**entries, **sweep}
    payload = {}
    for name, entry in every_run.items():
        r = entry["results"]
        payload[name] = {key: r[key] for key in (*HEADLINE_KEYS, "n_queries")}
        payload[name].update(
            train_seconds=entry["train_seconds"],
            recall_at_1=r["recall_at_1"],
            recall_at_10=r["recall_at_10"],
            unseen_languages=unseen_view(r),
            precision=r.get("precision", ""),
            grid=r["grid"],
        )
        heatmap = Path(entry["dir"]) / "grid_heatmap.png"
        if heatmap.is_file():
            shutil.copyfile(heatmap, figures / f"heatmap_{name}.png")
    write_atomic(docs / "results.json", json.dumps(payload, indent=2))

    curves = {name: entry["history"] for name, entry in every_run.items() if entry.get("history")}
    if curves:
        plot_by_step(curves, {"loss": "InfoNCE loss (mean over the logging window)"}, figures / "loss_by_step.png")
    scores = {name: entry["evaluations"] for name, entry in every_run.items() if entry.get("evaluations")}
    if scores:
        plot_by_step(scores, {m.key: m.label for m in HEADLINE}, figures / "metric_by_step.png")
    reused = [name for name, entry in every_run.items() if entry["wall_seconds"] == 0.0]
    header = (
        "| model / sampling | mono mAP | cross mAP | multi mAP | rank distance (lower is better) |\n"
        + "|---" * 5
        + "|"
    )
    lines = [
        f"Produced by `{command}` in {wall / 60:.0f} min wall time on this 2-core CPU machine. {budget}",
        f"Reused from an earlier invocation of the same command (outputs already on disk): {', '.join(reused)}."
        if reused
        else "",
        "Every number below is from a full-grid evaluation: 11 languages x 1,190 questions, 121 language pairs, "
        "exact ranks over the whole pool (LAReQA protocol, `hbt_accel/evaluation`).",
        "",
        "## XQuAD-R, all 11 languages",
        "",
        header,
        *[row(name, entries[name]["results"]) for name in entries],
        *[row(name, dict(zip(HEADLINE_KEYS, scores))) for name, scores in PAPER.items()],
        "",
        "## XQuAD-R, queries in the languages never trained on (el, ru, th, tr)",
        "",
        header,
        *[row(name, unseen_view(entries[name]["results"])) for name in entries],
        "",
        "## Training cost",
        "",
        "| run | train seconds | R@1 | R@10 |",
        "|---|---|---|---|",
        *[
            f"| {n} | {e['train_seconds']:.0f} | {e['results']['recall_at_1']:.3f} | "
            f"{e['results']['recall_at_10']:.3f} |"
            for n, e in entries.items()
        ],
    ]
    if sweep:
        lines += ["", "## Alpha sweep (hybrid, same budget)", "", header]
        lines += [row(name, entry["results"]) for name, entry in sweep.items()]
    if scores:
        lines += [
            "",
            "## Scores by step",
            "",
            f"Periodic evaluation during training ({PERIODIC_EVAL_NOTE}); step 0 is the untrained model on the same "
            "subset.",
            "",
            "![metric by step](figures/metric_by_step.png)",
        ]
    if curves:
        lines += ["", "## Training loss by step", "", "![training loss by step](figures/loss_by_step.png)"]
    lines += ["", "## Heatmaps (mAP, rows = query language, columns = pool language)", ""]
    lines += [f"![{name}](figures/heatmap_{name}.png)" for name in every_run]
    write_section(docs / "results.md", "reproduction", "\n".join(lines))


def plot_by_step(curves: dict[str, list[dict]], panels: dict[str, str], path: Path) -> None:
    """One panel per key of `panels` (key -> axis label), one line per run; `curves` maps run -> records by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 4), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels.items()):
        for name, records in curves.items():
            axis.plot(
                [r["step"] for r in records],
                [r[key] for r in records],
                marker="o" if len(records) < 20 else "",
                label=name,
            )
        axis.set_xlabel("step")
        axis.set_ylabel(label)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------------------
# Tuning on MLQA-R validation ids (never XQuAD-R)
# ------------------------------------------------------------------------------------------------------------------
def tune(runs: Path, docs: Path, trials: list[list[str]], max_steps: int) -> None:
    from hbt_accel.data import load_lareqa_benchmark
    from hbt_accel.evaluation import evaluate_grid
    from hbt_accel.models.dual_encoder import DualEncoder

    # Train on 85% of the MLQA-R ids, score the held-out 15% (hbt_accel.data.select_split).
    validation = load_lareqa_benchmark("mlqa-r:validation")
    log = runs / "tuning.jsonl"
    if not (log.is_file() and '"trial": "untrained"' in log.read_text()):
        base = evaluate_grid(DualEncoder.from_pretrained("embedded"), validation, bf16=True)
        _log_trial(runs, docs, "untrained", None, base, 0.0)
    first = len(list(runs.glob("tune*.log")))  # trials accumulate in one runs_dir across invocations
    for index, overrides in enumerate(trials, start=first):
        name = f"tune{index}"
        command = [
            sys.executable,
            str(REPO / "recipes" / "train_hybrid.py"),
            "--output_dir",
            str(runs / name),
            "--train_data",
            "mlqa-r:train",
            "--eval_benchmark",
            "",
            "--max_steps",
            str(max_steps),
            *overrides,
        ]
        seconds = run(command, runs / f"{name}.log")
        results = evaluate_grid(DualEncoder.from_pretrained(runs / name), validation, bf16=True)
        _log_trial(runs, docs, " ".join(overrides) or "(recipe defaults)", runs / name, results, seconds)


# What a tuning trial may change, recorded from the run's own hbt_config.yaml (the recipe changes over time).
TUNED_FIELDS = {
    "max_steps": "steps",
    "learning_rate": "lr",
    "temperature": "temperature",
    "num_hard_negatives": "hard negatives",
    "symmetric_loss": "symmetric",
    "freeze_word_embeddings": "frozen word emb.",
}


def _log_trial(runs: Path, docs: Path, trial: str, run_dir: Path | None, results: dict, seconds: float) -> None:
    """Append one trial to runs/tuning.jsonl and re-render the tuning section of docs/results.md from it."""
    import yaml

    settings = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) if run_dir else {}
    record = {"trial": trial, "train_seconds": round(seconds), **{key: settings.get(key) for key in TUNED_FIELDS}}
    record.update({key: results[key] for key in HEADLINE_KEYS})
    print(json.dumps(record), flush=True)
    with (runs / "tuning.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    write_tuning_section(runs, docs)


def _setting(value) -> str:
    return "" if value is None else str(value)


def write_tuning_section(runs: Path, docs: Path) -> None:
    trials = [json.loads(line) for line in (runs / "tuning.jsonl").read_text().splitlines()]
    lines = [
        "## Tuning on MLQA-R validation data (never XQuAD-R)",
        "",
        '`python benchmarks/reproduce_hbt.py --tune --tune_steps N --trial "--field value ..."` trains on 85% '
        "of the MLQA-R ids (split by a hash of the id) and scores the other 15%: their questions against pools "
        "made of their own paragraphs, in every language pair. Each trial is the recipe of its day plus the "
        "overrides shown; the columns give the settings it ran with. The pools are smaller than XQuAD-R's, so the "
        "scores differ in scale: only the comparison between trials matters. Train seconds were taken on a shared "
        "machine.",
        "",
        "| trial | "
        + " | ".join(TUNED_FIELDS.values())
        + " | mono mAP | cross mAP | multi mAP | rank distance | train s |",
        "|---" * (len(TUNED_FIELDS) + 6) + "|",
        *[
            f"| {t['trial']} | "
            + " | ".join(_setting(t[key]) for key in TUNED_FIELDS)
            + " | "
            + " | ".join(m.format(t[m.key]) for m in HEADLINE)
            + f" | {t['train_seconds']} |"
            for t in trials
        ],
    ]
    write_section(docs / "results.md", "tuning", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs_dir", default=str(REPO / "runs" / "reproduce"))
    parser.add_argument("--docs_dir", default=str(REPO / "docs"))
    parser.add_argument("--strategies", default="xx,xy,hybrid")
    parser.add_argument("--alphas", default="", help="extra hybrid alphas for the sweep, e.g. 0,0.25,0.75,1")
    parser.add_argument(
        "--fp32_eval",
        action="store_true",
        help="score in fp32 (default bf16: measured difference below .002 mAP, see README)",
    )
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tune_steps", type=int, default=120)
    parser.add_argument("--trial", action="append", default=[], help="with --tune: one set of overrides, quoted")
    parser.add_argument("overrides", nargs="*", help="extra --field value pairs passed to every training run")
    args, unknown = parser.parse_known_args()
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    extra = args.overrides + unknown
    if args.tune:
        tune(runs, Path(args.docs_dir), [trial.split() for trial in args.trial] or [[]], args.tune_steps)
        return

    started = time.perf_counter()
    eval_flags = PERIODIC_EVAL + ([] if args.fp32_eval else ["--eval_precision", "bf16"])
    entries = {"untrained": evaluate_untrained(runs, bf16=not args.fp32_eval)}
    for strategy in args.strategies.split(","):
        entries[strategy] = train(strategy, runs, ["--sampling", strategy, *eval_flags, *extra])
    sweep = {}
    for alpha in filter(None, args.alphas.split(",")):
        sweep[f"hybrid_alpha{alpha}"] = train(
            f"hybrid_alpha{alpha}", runs, ["--sampling", "hybrid", "--alpha", alpha, *eval_flags, *extra]
        )
    from hbt_accel.config import parse_config

    cfg = parse_config(extra)
    budget = (
        f"Budget per run: {cfg.max_steps} steps x {cfg.per_device_train_batch_size} queries "
        f"(+{cfg.num_hard_negatives} hard negative each), lr {cfg.learning_rate}, temperature {cfg.temperature}, "
        f"max lengths {cfg.query_max_length}/{cfg.passage_max_length}, {cfg.mixed_precision}, seed {cfg.seed}."
    )
    command = invocation()
    write_results(entries, Path(args.docs_dir), command.strip(), time.perf_counter() - started, budget, sweep)
    print((Path(args.docs_dir) / "results.md").read_text())


if __name__ == "__main__":
    run_benchmark(main)
