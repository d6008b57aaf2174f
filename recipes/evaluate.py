"""Score a retriever on the LAReQA grid (XQuAD-R / MLQA-R) or a benchmark in its published layout (MIRACL, Mr. TyDi,
MLDR, MKQA, BEIR folders: encoded in shards to disk, at any corpus size); or every checkpoint of a run.

    python recipes/evaluate.py --model embedded --benchmark xquad-r --output_dir /tmp/ev
    python recipes/evaluate.py --model embedded --benchmark xquad-r --precision no --output_dir /tmp/ev_fp32
    python recipes/evaluate.py --model runs/default/final --benchmark mlqa-r --languages en,de,zh --max_queries 200
    python recipes/evaluate.py --model embedded --benchmark /data/miracl-sw   # corpus.jsonl, queries.jsonl, qrels/
    python recipes/evaluate.py --model runs/a/final --benchmark /data/miracl --languages sw,te --split dev
    python recipes/evaluate.py --model embedded --benchmark /data/mkqa.jsonl.gz --corpus /data/beir/nq --languages de
    python recipes/evaluate.py --model embedded --benchmark /data/mrtydi   # Pyserini's topics/ + qrels/ + corpus
    python recipes/evaluate.py --model embedded --benchmark /data/beir/nq --index ivf   # + its recall vs exact
    python recipes/evaluate.py --run_dir runs/default          # every checkpoint-* without eval_results.json yet
    python recipes/evaluate.py --model runs/a --bootstrap 1000 --output_dir runs/a/eval    # + 95% CIs, per_query.npz
    python recipes/evaluate.py --model runs/b --bootstrap 1000 --baseline runs/a/eval/per_query.npz  # b minus a
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no recipes/evaluate.py --model embedded --benchmark xquad-r

One model: the grid table and summary are printed; with --output_dir, eval_results.json, grid.csv and
grid_heatmap.png are written there. A run: each new checkpoint gets those files in its own folder, then a
metric-by-step table is printed and RUN/metrics_by_step.png written. Under `accelerate launch` every process
encodes a shard of the texts; the numbers equal a single process. Errors in the data or arguments end as one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hbt_accel.config import ConfigError, run_cli
from hbt_accel.data import DataError
from hbt_accel.evaluation.evaluator import is_published
from hbt_accel.models.bundled_e5 import check_model_name
from hbt_accel.models.precision import EVAL_PRECISION_HELP, EVAL_PRECISIONS
from hbt_accel.run_record import PREFIX, checkpoint_step, find_checkpoints, model_folder


@dataclass
class EvaluateArguments:
    model: str = field(default="", metadata={"help": "model folder or Hub id; 'embedded' = multilingual-e5-small"})
    run_dir: str = field(default="", metadata={"help": "score every RUN/checkpoint-* without eval_results.json"})
    benchmark: str = field(
        default="xquad-r",
        metadata={
            "help": "xquad-r, mlqa-r, a folder of LAReQA <lang>.json, or a benchmark in its published layout (MIRACL, "
            "Mr. TyDi, MLDR, a BEIR folder; MKQA's mkqa.jsonl.gz with --corpus)"
        },
    )
    languages: list = field(default_factory=list, metadata={"help": "comma-separated languages; empty = all"})
    max_queries: int = field(
        default=0,
        metadata={"help": "first N question ids (same in every language; published: queries per language); 0 = all"},
    )
    output_dir: str = field(default="", metadata={"help": "where to write the reports of --model; empty = none"})
    precision: str = field(
        default="auto",
        metadata={"help": EVAL_PRECISION_HELP, "choices": EVAL_PRECISIONS},
    )
    batch_size: int = field(default=64, metadata={"help": "texts per encoder forward"})
    block_size: int = field(default=256, metadata={"help": "queries scored at once against the whole pool"})
    data_dir: str = field(default="", metadata={"help": "folder with xquad-r/ and mlqa-r/; empty = default lookup"})
    save_embeddings: bool = field(
        default=False, metadata={"help": "also write embeddings.npz to --output_dir (for independent re-scoring)"}
    )
    bootstrap: int = field(
        default=0, metadata={"help": "resamples of question ids for 95% confidence intervals (e.g. 1000); 0 = off"}
    )
    baseline: str = field(
        default="", metadata={"help": "per_query.npz of another model on the same questions: paired difference"}
    )
    split: str = field(
        default="",
        metadata={
            "help": "MIRACL (dev, test-a), Mr. TyDi and MLDR (test, dev), BEIR (qrels/<split>.tsv): the split; "
            "empty = the benchmark's default"
        },
    )
    corpus: str = field(
        default="", metadata={"help": "the corpus folder where it lives apart: MIRACL's corpus, MKQA's BEIR corpus"}
    )
    chunk_rows: int = field(
        default=16384, metadata={"help": "large benchmarks: passages per embedding file (the unit of resume)"}
    )
    cache_dir: str = field(
        default="", metadata={"help": "passage stores and embeddings of large benchmarks; empty = the corpus cache"}
    )
    index: str = field(
        default="flat",
        metadata={
            "help": "published benchmarks: flat = exact search in shards; ivf / hnsw = a faiss index in one process, "
            "with its recall@100 against exact search",
            "choices": ("flat", "ivf", "hnsw"),
        },
    )

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"  # after `main` has turned auto into a choice

    def validate(self) -> EvaluateArguments:
        if bool(self.model) == bool(self.run_dir):
            raise ConfigError("give exactly one of --model PATH_OR_ID or --run_dir RUN")
        if self.max_queries < 0:
            raise ConfigError(f"--max_queries: got {self.max_queries}, expected 0 (all) or a positive integer")
        if self.save_embeddings and not self.output_dir:
            raise ConfigError("--save_embeddings needs --output_dir")
        if self.chunk_rows < 1:
            raise ConfigError(f"--chunk_rows: got {self.chunk_rows}, expected a positive number of passages")
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap: got {self.bootstrap}, expected 0 (off) or a number of resamples (1000)")
        if self.bootstrap and is_published(self.benchmark):
            raise ConfigError(
                f"--bootstrap: per-question intervals are for the LAReQA grid (xquad-r, mlqa-r); {self.benchmark} is "
                "scored by its official metric, without them"
            )
        if self.baseline and self.bootstrap == 0:
            raise ConfigError("--baseline needs --bootstrap N (e.g. 1000): the difference comes with its interval")
        if self.baseline and not Path(self.baseline).is_file():
            raise ConfigError(f"--baseline: {self.baseline} not found (expected a per_query.npz of evaluate.py)")
        if self.output_dir and Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ConfigError(f"--output_dir: {self.output_dir} is a file, expected a folder")
        if self.model:
            check_model_name(self.model, "--model")  # a local-path typo must not become a Hub request
        return self


def main(args: EvaluateArguments) -> None:
    from hbt_accel.distributed import bound_onednn_kernel_cache, configure_cpu_threads
    from hbt_accel.models.precision import evaluation_precision

    # ---------------------------------------------------------------- processes (a launch splits the encoding)
    threads = configure_cpu_threads()  # accelerate launch would leave one core per process
    bound_onednn_kernel_cache()
    accelerator = None
    if "LOCAL_RANK" in os.environ:
        from hbt_accel.distributed import make_accelerator

        accelerator = make_accelerator()
    is_main = accelerator is None or accelerator.is_main_process
    choice = evaluation_precision(args.precision)
    args = dataclasses.replace(args, precision=choice.precision)
    if is_main:
        print(f"{threads}\nprecision: {choice.reason}")

    try:
        if args.model:
            evaluate_model(args, args.model, Path(args.output_dir) if args.output_dir else None, accelerator, is_main)
        else:
            evaluate_checkpoints(args, accelerator, is_main)
    finally:
        if accelerator is not None:
            accelerator.end_training()  # destroys the process group: left to interpreter exit, a gloo rank may abort


def evaluate_checkpoints(args: EvaluateArguments, accelerator, is_main: bool) -> None:
    """Score every checkpoint of args.run_dir not scored yet, then print and plot the metrics by step."""
    from hbt_accel.evaluation import plot_metrics_by_step, print_metrics_by_step
    from hbt_accel.evaluation.grid import RESULTS_FILE

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    checkpoints = find_checkpoints(run_dir)
    if not checkpoints:
        raise DataError(f"{run_dir}: no {PREFIX}<step> folders")
    for checkpoint in checkpoints:
        if (checkpoint / RESULTS_FILE).is_file():
            continue
        folder = model_folder(checkpoint)
        if folder is None:
            if is_main:
                print(f"skipping {checkpoint}: no saved model (config.json) in it or in its model/ folder")
            continue
        evaluate_model(args, str(folder), checkpoint, accelerator, is_main)

    # ---------------------------------------------------------------- metric-by-step table and plot
    if is_main:
        rows = [
            (checkpoint_step(c), json.loads((c / RESULTS_FILE).read_text(encoding="utf-8")))
            for c in checkpoints
            if (c / RESULTS_FILE).is_file()
        ]
        print_metrics_by_step(rows)
        print(f"wrote {plot_metrics_by_step(rows, run_dir / 'metrics_by_step.png')}")


def evaluate_model(args: EvaluateArguments, model: str, output_dir: Path | None, accelerator, is_main: bool) -> dict:
    """Load one model, score it on args.benchmark, print the report and write it to output_dir (main process).
    The benchmark's files are read first: a bad file or language fails before the model is loaded."""
    from hbt_accel.data import article_of_question
    from hbt_accel.evaluation import print_report, write_reports
    from hbt_accel.evaluation.evaluator import open_evaluator
    from hbt_accel.evaluation.grid import PER_QUERY_FILE, save_encoded
    from hbt_accel.models.bundled_e5 import resolve_model_path

    evaluator = open_evaluator(evaluation_spec(args))
    encoder = load_encoder(model, accelerator)
    per_query, encoded = [], []
    results = evaluator.score(
        encoder, accelerator, final=True, per_query=per_query, encoded_out=encoded, model_dir=resolve_model_path(model)
    )
    results = {"model": model, **results}
    if args.bootstrap and is_main:
        add_statistics(results, per_query[0], args, article_of_question(evaluator.full))
    if not is_main:
        return results
    print_report(results)
    if output_dir is not None:
        paths = write_reports(results, output_dir)
        if args.save_embeddings and encoded:
            paths["embeddings"] = save_encoded(encoded[0], output_dir / "embeddings.npz")
        if args.bootstrap:
            paths["per_query"] = per_query[0].save(output_dir / PER_QUERY_FILE)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


def load_encoder(model: str, accelerator):
    from hbt_accel.models.dual_encoder import DualEncoder

    try:
        encoder = DualEncoder.from_pretrained(model)
    except DataError:  # already one line naming the file
        raise
    except (OSError, ValueError) as error:
        raise DataError(f"{model}: cannot load the model ({str(error).strip().splitlines()[0]})") from None
    return encoder.to(accelerator.device) if accelerator is not None else encoder


def evaluation_spec(args: EvaluateArguments):
    from hbt_accel.evaluation.evaluator import EvaluationSpec

    return EvaluationSpec(
        benchmark=args.benchmark,
        languages=tuple(args.languages),
        final_languages=tuple(args.languages),
        final_max_queries=args.max_queries,
        data_dir=args.data_dir,
        block_size=args.block_size,
        split=args.split,
        corpus=args.corpus,
        cache_dir=args.cache_dir,
        bf16=args.bf16,
        batch_size=args.batch_size,
        chunk_rows=args.chunk_rows,
        index=args.index,
    )


def add_statistics(results: dict, scores, args: EvaluateArguments, article_of: dict[str, str]) -> None:
    """95% bootstrap intervals resampling whole articles (questions on one passage are not independent; question
    ids where the benchmark names no articles); with --baseline, the paired difference to that model."""
    from hbt_accel.evaluation.grid import PerQueryScores
    from hbt_accel.evaluation.statistics import confidence_intervals, paired_difference, resampling_units

    article_of, resampled = resampling_units(scores, article_of)
    results["confidence_intervals"] = confidence_intervals(scores, args.bootstrap, article_of=article_of)
    results["bootstrap_resamples"] = args.bootstrap
    results["bootstrap_resampled"] = resampled
    if args.baseline:
        try:
            baseline = PerQueryScores.load(args.baseline)
            difference = paired_difference(scores, baseline, args.bootstrap, article_of=article_of)
        except ValueError as error:  # another benchmark, language set or question subset than this evaluation
            raise DataError(f"--baseline {args.baseline}: {error}") from None
        results["paired_difference"] = {"baseline": args.baseline, **difference}


if __name__ == "__main__":
    run_cli(main, EvaluateArguments)
