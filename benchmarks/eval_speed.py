"""How close the grid evaluation comes to the encoding floor, and what a naive evaluator would cost.

    python benchmarks/eval_speed.py                                         # full XQuAD-R (~an hour on 2 cores)
    python benchmarks/eval_speed.py --languages en,de --max_queries 100 --naive_pairs 1 --repeats 2

One run with the embedded multilingual-e5-small on XQuAD-R measures
  (a) the floor: every question and every candidate of the chosen languages encoded once, nothing else;
  (b) the full grid evaluation (`evaluate_grid`: the same encoding plus exact ranks for all settings);
  (c) a naive evaluator that re-encodes the questions and the pool for every (query, pool) language pair. It is
      timed on the first --naive_pairs pairs and extrapolated linearly to all L x L single-pair settings (the
      multilingual settings, which would re-encode the whole union per query language, are left out: a lower bound);
  (d) (b) again under bf16 autocast: time and the largest |fp32 - bf16| of mono / cross / multi mAP;
  (e) the floor of any evaluator of this model on this CPU: the FLOPs of the encoder's linear layers over every token
      of (a), divided by this CPU's matrix-product rate measured here (torch.addmm on the model's FFN shape, the
      faster of bf16 and fp32);
and prints (b)/(a) (goal <= 1.15), (c)/(b), and peak memory: the process's max RSS (getrusage) and the tracemalloc
peak of the scoring step (numpy arrays of the block-wise ranking).
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np
from report import invocation, machine_line, run_benchmark, write_section

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="model folder or 'embedded'")
    parser.add_argument("--benchmark", default="xquad-r", help="LAReQA benchmark name or folder")
    parser.add_argument("--languages", default="", help="comma-separated languages; empty = all")
    parser.add_argument("--max_queries", type=int, default=0, help="first N question ids; 0 = all")
    parser.add_argument("--naive_pairs", type=int, default=2, help="language pairs the naive evaluator is timed on")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="alternate (a) and (b) this often, keep the minimum")
    parser.add_argument("--skip_bf16", action="store_true", help="leave out the bf16 run")
    parser.add_argument("--docs_dir", default=str(REPO / "docs"), help="write the table here ('' = print only)")
    return parser.parse_args(argv)


def naive_pair(encoder, benchmark, query_lang: str, pool_lang: str, wanted: set[str], batch_size: int) -> float:
    """What a per-pair evaluator does: encode X's questions and Y's whole pool, rank, mAP. Returns the mAP."""
    from hbt_accel.evaluation.metrics import average_precision, relevant_ranks

    queries, pool = benchmark.pools[query_lang], benchmark.pools[pool_lang]
    gold_of = dict(zip(pool.question_ids, pool.gold))
    chosen = [
        (q, gold_of[qid])
        for qid, q in zip(queries.question_ids, queries.questions)
        if qid in wanted and qid in gold_of
    ]
    q_emb = encoder.encode([q for q, _ in chosen], kind="query", batch_size=batch_size)  # (n, d)
    c_emb = encoder.encode(pool.candidates, kind="passage", batch_size=batch_size)  # (N_y, d)
    scores = q_emb @ c_emb.T  # (n, N_y)
    gold = np.array([g for _, g in chosen])
    ranks = relevant_ranks(scores, scores[np.arange(len(chosen)), gold][:, None])  # (n, 1)
    return float(average_precision(ranks).mean())


def linear_layer_flops(encoder, questions: list[str], candidates: list[str]) -> float:
    """2 x tokens x weights of every linear layer the pooled embedding goes through (attention scores, norms and
    activations left out: a lower bound on the work of encoding every text once)."""
    import torch

    tokens = sum(encoder.token_lengths(questions, "query")) + sum(encoder.token_lengths(candidates, "passage"))
    weights = sum(
        module.weight.numel()
        for name, module in encoder.backbone.named_modules()
        if isinstance(module, torch.nn.Linear) and "pooler" not in name  # mean pooling: the pooler never runs
    )
    return 2.0 * tokens * weights


def matmul_rate(rows: int, inner: int, outer: int, dtype, repeats: int = 10) -> float:
    """FLOP/s of torch.addmm (rows x inner) @ (inner x outer) in `dtype` on this machine, best of `repeats`."""
    import torch

    a, b, bias = (
        torch.randn(rows, inner, dtype=dtype),
        torch.randn(inner, outer, dtype=dtype),
        torch.zeros(outer, dtype=dtype),
    )
    torch.addmm(bias, a, b)  # first call: kernel selection and allocation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.addmm(bias, a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * rows * inner * outer / best


def main(argv=None) -> None:
    from hbt_accel.data import load_lareqa_benchmark
    from hbt_accel.evaluation.grid import select_languages, select_question_ids
    from hbt_accel.models.dual_encoder import DualEncoder

    args = parse_args(argv)
    encoder = DualEncoder.from_pretrained(args.model)
    benchmark = load_lareqa_benchmark(args.benchmark)
    languages = select_languages(benchmark, args.languages or None)
    wanted = select_question_ids(benchmark, languages, args.max_queries or None)
    questions = [
        q
        for lang in languages
        for qid, q in zip(benchmark.pools[lang].question_ids, benchmark.pools[lang].questions)
        if qid in wanted
    ]
    candidates = [c for lang in languages for c in benchmark.pools[lang].candidates]
    print(f"{len(languages)} languages, {len(questions):,} questions, {len(candidates):,} candidates")
    encoder.encode(questions[:8], kind="query")  # warm-up: first-call allocations are not part of any timing
    texts = (questions, candidates)

    grid_seconds, fp32, rows, notes, score_peak = time_floor_and_grid(args, encoder, benchmark, languages, texts)
    naive_row, naive_note = time_naive_evaluator(args, encoder, benchmark, languages, wanted, fp32, grid_seconds)
    rows.append(naive_row)
    notes[0] += naive_note
    if not args.skip_bf16:
        row, note = time_bf16(args, encoder, benchmark, languages, fp32, grid_seconds)
        rows.append(row)
        notes.append(note)
    row, note = matmul_floor(encoder, *texts)
    rows.append(row)
    notes.append(note)
    notes.append(memory_note(score_peak))
    if args.docs_dir:
        import torch

        setup = (
            f"{len(languages)} languages, {len(texts[0]):,} questions, {len(texts[1]):,} candidates, "
            f"torch {torch.__version__}; {machine_line()}"
        )
        write_docs(Path(args.docs_dir), setup, rows, notes)


def time_floor_and_grid(args, encoder, benchmark, languages, texts):
    """(a) encoding every text once and (b) the grid (encode once + exact ranks), alternated --repeats times; the
    minimum of each is kept (a shared machine only ever adds time)."""
    from hbt_accel.evaluation import encode_benchmark, score_encoded

    questions, candidates = texts
    floors, grids = [], []
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        encoder.encode(questions, kind="query", batch_size=args.batch_size)
        encoder.encode(candidates, kind="passage", batch_size=args.batch_size)
        floors.append(time.perf_counter() - start)

        start = time.perf_counter()
        encoded = encode_benchmark(encoder, benchmark, languages, args.max_queries or None, args.batch_size)
        tracemalloc.start()
        fp32 = score_encoded(encoded)
        _, score_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        grids.append(time.perf_counter() - start)
    floor, grid_seconds = min(floors), min(grids)
    print(f"(a) encode every text once:       {floor:8.1f} s  (runs: {', '.join(f'{t:.1f}' for t in floors)})")
    print(f"(b) grid evaluation:               {grid_seconds:8.1f} s  (runs: {', '.join(f'{t:.1f}' for t in grids)}; "
          f"last: encode {fp32['encode_seconds']:.1f}, score {fp32['score_seconds']:.1f})  "
          f"(b)/(a) = {grid_seconds / floor:.3f}  (goal <= 1.15)")  # fmt: skip
    rows = [
        ("(a) encode every question and candidate once (fp32)", floor),
        ("(b) full grid evaluation (fp32): encode once + exact ranks of every setting", grid_seconds),
    ]
    return grid_seconds, fp32, rows, [f"(b)/(a) = {grid_seconds / floor:.3f}"], score_peak


def time_naive_evaluator(args, encoder, benchmark, languages, wanted, fp32, grid_seconds):
    """(c) re-encoding per language pair, timed on a few pairs (each checked against the grid) and extrapolated."""
    pairs = [(x, y) for x in languages for y in languages][: max(1, args.naive_pairs)]
    start = time.perf_counter()
    for query_lang, pool_lang in pairs:
        value = naive_pair(encoder, benchmark, query_lang, pool_lang, wanted, args.batch_size)
        assert abs(value - fp32["grid"][f"{query_lang}-{pool_lang}"]) < 1e-3, (query_lang, pool_lang, value)
    per_pair = (time.perf_counter() - start) / len(pairs)
    naive = per_pair * len(languages) ** 2
    print(f"(c) naive per-pair evaluator:      {naive:8.1f} s  EXTRAPOLATED: {per_pair:.1f} s/pair measured on "
          f"{len(pairs)} pair(s) x {len(languages) ** 2} pairs, multilingual settings not counted; "
          f"(c)/(b) = {naive / grid_seconds:.2f}")  # fmt: skip
    row = (f"(c) naive per-pair evaluator, extrapolated from {len(pairs)} pair(s)", naive)
    return row, f"; (c)/(b) = {naive / grid_seconds:.1f}"


def time_bf16(args, encoder, benchmark, languages, fp32, grid_seconds):
    """(d) the grid again under bf16 autocast: its time and the largest |fp32 - bf16| of the summary mAPs."""
    from hbt_accel.evaluation import encode_benchmark, score_encoded
    from hbt_accel.evaluation.schema import HEADLINE_KEYS, MAP_KEYS

    start = time.perf_counter()
    bf16 = score_encoded(
        encode_benchmark(encoder, benchmark, languages, args.max_queries or None, args.batch_size, bf16=True)
    )
    bf16_seconds = time.perf_counter() - start
    diff = max(abs(fp32[k] - bf16[k]) for k in MAP_KEYS)
    speedup = grid_seconds / bf16_seconds
    print(f"(d) bf16 grid evaluation:          {bf16_seconds:8.1f} s  fp32/bf16 time = {speedup:.2f}; "
          f"max |fp32 - bf16| of mono/cross/multi mAP = {diff:.4f}")  # fmt: skip
    for key in HEADLINE_KEYS:
        print(f"    {key:14s} fp32 {fp32[key]:.4f}  bf16 {bf16[key]:.4f}")
    note = (
        "fp32 / bf16 mono, cross, multi mAP, rank distance: "
        + ", ".join(f"{fp32[k]:.4f} / {bf16[k]:.4f}" for k in HEADLINE_KEYS)
        + f" (largest mAP difference {diff:.4f})"
    )
    return ("(d) full grid evaluation under bf16 autocast", bf16_seconds), note


def matmul_floor(encoder, questions, candidates):
    """(e) the linear layers' FLOPs at this CPU's measured matrix-product rate."""
    import torch

    config = encoder.backbone.config
    flops = linear_layer_flops(encoder, questions, candidates)
    # the faster precision's rate: on a CPU without bf16 units fp32 is the faster one, and the floor must not overstate
    rate = max(
        matmul_rate(4096, config.hidden_size, config.intermediate_size, d) for d in (torch.bfloat16, torch.float32)
    )
    floor_seconds = flops / rate
    print(f"(e) matrix-product floor:          {floor_seconds:8.1f} s  {flops / 1e12:.1f} TFLOP of linear layers "
          f"at {rate / 1e9:.0f} GFLOP/s (addmm, bf16 or fp32); 60 s needs {flops / 60e9:.0f} GFLOP/s")  # fmt: skip
    note = (
        f"(e) = {flops / 1e12:.1f} TFLOP / {rate / 1e9:.0f} GFLOP/s (torch.addmm {config.hidden_size}x"
        f"{config.intermediate_size}, the faster of bf16 and fp32); 60 s would need {flops / 60e9:.0f} GFLOP/s"
    )
    return ("(e) floor: linear-layer FLOPs at this CPU's measured matrix-product rate", floor_seconds), note


def memory_note(score_peak: int) -> str:
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak memory: max RSS {max_rss_mb:,.0f} MB (whole process, model included); "
          f"scoring step tracemalloc peak {score_peak / 2**20:,.1f} MB")  # fmt: skip
    return f"peak memory: max RSS {max_rss_mb:,.0f} MB (whole process), scoring step {score_peak / 2**20:,.1f} MB"


def write_docs(docs: Path, setup: str, rows: list[tuple[str, float]], notes: list[str]) -> None:
    command = invocation()
    body = [
        "## Evaluation speed",
        "",
        f"`{command.strip()}` on {time.strftime('%Y-%m-%d')}: {setup}.",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in rows],
        "",
        *[f"- {note}" for note in notes],
    ]
    write_section(docs / "results.md", "eval_speed", "\n".join(body))


if __name__ == "__main__":
    run_benchmark(main)
