"""A deterministic fake encoder, and the 2-process evaluation script run by tests/test_grid_agreement.py.

Launched as:
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/distributed_eval_script.py OUT.json [LANGS] [MAX_QUERIES]
Every rank runs `evaluate_grid` with its share of the encoding; rank 0 writes the results and how many texts each
rank encoded.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class HashEncoder:
    """Hashed bag of words (so questions share dimensions with their answers) plus text-seeded noise, L2-normalised.

    Deterministic per text, independent of batching and of which process encodes it. `calls` counts encoded texts.
    """

    def __init__(self, dim: int = 128, noise: float = 0.3):
        self.dim, self.noise, self.calls = dim, noise, 0

    def _vector(self, text: str) -> np.ndarray:
        vector = np.zeros(self.dim)
        for word in re.findall(r"\w+", text.lower()):
            bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
            vector[bucket % self.dim] += 1.0
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        vector += self.noise * np.random.default_rng(seed).standard_normal(self.dim)
        return vector / np.linalg.norm(vector)

    def encode(self, texts, kind="query", batch_size=64, bf16=False) -> np.ndarray:
        assert kind in ("query", "passage")
        self.calls += len(texts)
        out = np.stack([self._vector(text) for text in texts]) if texts else np.zeros((0, self.dim))
        return out.astype(np.float32)


def main() -> None:
    from hbt_accel.data import load_lareqa_benchmark
    from hbt_accel.evaluation import evaluate_grid

    try:
        from hbt_accel.distributed import make_accelerator
    except ImportError:  # before distributed.py lands: the gloo fix by hand (hbt_accel/distributed.py)
        from accelerate import Accelerator, InitProcessGroupKwargs

        def make_accelerator():
            return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])

    output, languages = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "en,de,zh"
    max_queries = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    accelerator = make_accelerator()
    encoder = HashEncoder()
    benchmark = load_lareqa_benchmark("xquad-r", languages=languages.split(","))
    results = evaluate_grid(encoder, benchmark, max_queries=max_queries, accelerator=accelerator, block_size=100)
    calls = accelerator.gather(__import__("torch").tensor([encoder.calls])).tolist()
    if accelerator.is_main_process:
        results["encoded_per_rank"] = calls
        results["num_processes"] = accelerator.num_processes
        Path(output).write_text(json.dumps(results), encoding="utf-8")
    accelerator.wait_for_everyone()
    # destroys the process group: left to interpreter exit, gloo's threads sometimes abort a rank (SIGABRT)
    accelerator.end_training()


if __name__ == "__main__":
    main()
