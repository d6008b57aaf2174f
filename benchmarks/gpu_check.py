"""The prepared GPU check: one script, under 8 minutes on one H200-class GPU, no model hub, no internet.

    python benchmarks/gpu_check.py                          # on the GPU machine -> docs/benchmarks/gpu_check.json
    python benchmarks/gpu_check.py --smoke --output X.json  # the same code on CPU with tiny shapes (the test suite)

What it measures, each part on its own so one failure leaves the others' figures:
1. environment: torch / CUDA, the GPU, which of the packages the repo needs are importable (deepspeed, datasets and
   faiss may have to be carried as wheels: the JSON and the first lines say what is missing);
2. default_recipe: samples/s of the default recipe's training step (`hbt_accel.training.run.setup` + `train_step`, the
   users' code path) in the precision `auto` picks, against sentence-transformers' trainer on the same GPU, same
   pairs, batch 32, max length 128 (the settings of benchmarks/train_speed.py);
3. large_encoder_lora: a random-initialised Qwen2-style ~1.5B encoder (no hub: built from a config) with LoRA r=16
   on every linear layer and gradient checkpointing, the 4B recipe's shapes (16 queries x 64 tokens + 16 x 2
   passages x 256 tokens per step), last-token pooling and InfoNCE: tokens/s and peak memory against the estimate
   the 4B recipe's header uses (weights + LoRA states + checkpointed activations);
4. evaluation: passages/s of `DualEncoder.encode` on XQuAD-R English candidate sentences, in the evaluation
   precision `auto` picks;
5. cuda_tests: `pytest -m cuda` (tests/test_cuda.py), skipped in --smoke (it would run the suite inside the suite).

--smoke: a tiny random BERT with the real XLM-R tokenizer and a 2-layer Qwen2, a few steps, on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from data_scale import tiny_model
from report import run_benchmark
from train_speed import BATCH, hbt_flags, mlqa_pairs, time_sentence_transformers, write_pairs

from hbt_accel.atomic import write_json
from hbt_accel.models.precision import choose_precision, device_capabilities, eval_choice, machine_description

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("accelerate", "transformers", "peft", "sentence_transformers", "datasets", "deepspeed", "faiss", "pyarrow")
QWEN_1_5B = dict(  # Qwen2-1.5B's shape: 1.54B parameters with the embedding table
    hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
    vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True,
)  # fmt: skip
QWEN_TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=1000, max_position_embeddings=512, tie_word_embeddings=True,
)  # fmt: skip
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the code, measures nothing")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks" / "gpu_check.json"))
    parser.add_argument("--steps", type=int, default=0, help="timed steps per part; 0 = 20 (3 with --smoke)")
    args = parser.parse_args()
    steps = args.steps or (3 if args.smoke else 20)
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "smoke": args.smoke, "environment": environment()}
    missing = record["environment"]["missing_packages"]
    if missing:
        print(f"missing packages (carry them as wheels): {', '.join(missing)}")
    if not args.smoke and record["environment"]["gpu"] is None:
        print("warning: no CUDA GPU visible; the figures below are this machine's CPU")
    with tempfile.TemporaryDirectory() as scratch:
        model = str(tiny_model(Path(scratch) / "tiny_bert")) if args.smoke else "embedded"
        parts = {
            "default_recipe": lambda: default_recipe(model, Path(scratch), steps),
            "large_encoder_lora": lambda: large_encoder_lora(QWEN_TINY if args.smoke else QWEN_1_5B, steps),
            "evaluation": lambda: evaluation(model, 64 if args.smoke else 4096),
            "cuda_tests": lambda: {"skipped": "--smoke"} if args.smoke else cuda_tests(),
        }
        for name, part in parts.items():
            record[name] = timed_part(name, part)
            write_json(args.output, record)  # after every part: a killed check keeps what it measured
    print(json.dumps(record, indent=1))
    failed = [name for name in parts if "error" in record[name]]
    if failed:
        raise SystemExit(f"gpu_check: {', '.join(failed)} failed (see {args.output})")


def timed_part(name: str, part) -> dict:
    started = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        result = part()
    except Exception as error:  # one part's failure must not lose the others' figures
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: v for k, v in result.items() if k != "traceback"}), flush=True)
    return result


def environment() -> dict:
    import torch

    machine = machine_description()
    return {
        **machine,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if torch.cuda.is_available()
        else None,
        "missing_packages": [name for name in NEEDED if importlib.util.find_spec(name) is None],
    }


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def steady_mean(seconds: list[float]) -> float:
    """Mean seconds per step after the first third (warm-up: kernels chosen, allocator grown)."""
    return statistics.fmean(seconds[len(seconds) // 3 :])


# ---------------------------------------------------------------------------------------------------------------
# 2. The default recipe's step against sentence-transformers
# ---------------------------------------------------------------------------------------------------------------
def default_recipe(model: str, scratch: Path, steps: int) -> dict:
    from hbt_accel.config import parse_config
    from hbt_accel.training.run import setup, train_step

    pairs = mlqa_pairs(BATCH * (steps + 1))
    pairs_path = scratch / "pairs.jsonl"
    write_pairs(pairs, pairs_path)
    precision = choose_precision("auto", device_capabilities())
    flags = hbt_flags(pairs_path, steps + 1, str(scratch / "run"), ["--model_name_or_path", model])
    session = setup(parse_config([*flags, "--mixed_precision", "auto"]))
    batches, seconds = iter(session.loader), []
    for _ in range(steps):
        started = time.perf_counter()
        train_step(session, next(batches)).item()  # .item(): the step has finished on the device
        seconds.append(time.perf_counter() - started)
    peer = time_sentence_transformers(
        pairs, steps, precision.bf16, "" if model == "embedded" else model, device=device()
    )
    ours, theirs = BATCH / steady_mean(seconds), BATCH / steady_mean(peer)
    return {
        "precision": precision.reason,
        "resolved": session.cfg.mixed_precision,
        "samples_per_second": round(ours, 2),
        "sentence_transformers_samples_per_second": round(theirs, 2),
        "speedup_over_sentence_transformers": round(ours / theirs, 3),
    }


# ---------------------------------------------------------------------------------------------------------------
# 3. A ~1.5B decoder-style encoder with LoRA and gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------
def large_encoder_lora(shape: dict, steps: int, queries: int = 16, query_tokens: int = 64) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2Model

    tiny = shape is QWEN_TINY
    passage_tokens, passages = (32 if tiny else 256), 2 * queries  # positive + 1 hard negative, as the 4B recipe
    query_tokens = 16 if tiny else query_tokens
    precision = choose_precision("auto", device_capabilities())
    dtype = torch.bfloat16 if precision.bf16 else torch.float32
    torch.manual_seed(0)
    with torch.device(device()):
        backbone = Qwen2Model(Qwen2Config(**shape)).to(dtype)
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone.enable_input_require_grads()
    model = get_peft_model(backbone, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        q = torch.randint(0, shape["vocab_size"], (queries, query_tokens), device=device())
        p = torch.randint(0, shape["vocab_size"], (passages, passage_tokens), device=device())
        loss = info_nce(last_token(model, q), last_token(model, p))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()
        seconds.append(time.perf_counter() - started)
    tokens = queries * query_tokens + passages * passage_tokens
    estimate = memory_estimate_mb(total, trainable, shape, queries * query_tokens + passages * passage_tokens, dtype)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "parameters": total,
        "trainable": trainable,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_step": tokens,
        "tokens_per_second": round(tokens / steady_mean(seconds), 1),
        "peak_memory_mb": None if peak is None else round(peak),
        "estimate_mb": round(estimate, 1),
    }


def last_token(model, ids):
    """Last-token pooling (no padding here: every row is full length), L2-normalised."""
    import torch

    hidden = model(input_ids=ids).last_hidden_state[:, -1].float()
    return torch.nn.functional.normalize(hidden, dim=-1)


def info_nce(queries, passages, temperature: float = 0.02):
    """Query i's positive is passage 2i (then its hard negative 2i+1); every other passage is a negative."""
    import torch

    targets = torch.arange(len(queries), device=queries.device) * 2
    return torch.nn.functional.cross_entropy(queries @ passages.T / temperature, targets)


def memory_estimate_mb(total: int, trainable: int, shape: dict, tokens: int, dtype) -> float:
    """The 4B recipe header's arithmetic, unsharded: weights in their dtype, LoRA weights + fp32 master + Adam m and
    v, and one checkpointed hidden state per layer per token (the recompute's one layer of full activations on top
    is not in the header's sum)."""
    width = 2 if str(dtype).endswith("bfloat16") else 4
    activations = tokens * shape["hidden_size"] * shape["num_hidden_layers"] * width
    return (total * width + trainable * (width + 4 + 8) + activations) / 2**20


# ---------------------------------------------------------------------------------------------------------------
# 4. Evaluation encoding, 5. the CUDA-marked tests
# ---------------------------------------------------------------------------------------------------------------
def evaluation(model: str, passages: int) -> dict:
    from hbt_accel.data import load_lareqa_benchmark
    from hbt_accel.models.dual_encoder import DualEncoder

    benchmark = load_lareqa_benchmark("xquad-r", languages=["en"])
    texts = benchmark.pools["en"].candidates  # 1,190 questions' candidate sentences
    texts = (texts * (passages // len(texts) + 1))[:passages]
    precision = eval_choice("auto", device_capabilities())
    encoder = DualEncoder.from_pretrained(model).to(device())
    encoder.encode(texts[:64], "passage", bf16=precision.bf16)  # warm-up
    synchronize()
    started = time.perf_counter()
    encoder.encode(texts, "passage", batch_size=128, bf16=precision.bf16)
    synchronize()
    per_second = passages / (time.perf_counter() - started)
    return {"precision": precision.reason, "passages": passages, "passages_per_second": round(per_second, 1)}


def cuda_tests() -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    return {"returncode": result.returncode, "summary": result.stdout.strip().splitlines()[-1:]}


if __name__ == "__main__":
    run_benchmark(main)
