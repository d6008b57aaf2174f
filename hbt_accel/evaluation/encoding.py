"""Encode a list of texts once, optionally split over the processes of an `accelerate` launch.

Any object with `.encode(texts, kind=..., batch_size=..., bf16=...) -> np.ndarray (N, d)` works (DualEncoder, or a
fake encoder in tests). Under `num_processes > 1` rank r encodes texts r, r+W, r+2W, ... (interleaved, so every rank
gets a similar length mix), the padded shards are gathered, and every rank gets back the full (N, d) array in the
original order.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager

import numpy as np
import torch

from hbt_accel.errors import fault_point

PROGRESS_SECONDS = 15.0  # a full-grid encode takes minutes; a log file must show it is alive


_between_batches: list = []  # callbacks run after every encoder batch on every rank (`between_batches`)


@contextmanager
def between_batches(callback):
    """Run `callback()` after every encoder batch while the context is open. Every rank runs the same number of
    batches (`encode_texts` pads the shards), so the callback may be a collective: training's stop-request check
    (hbt_accel.distributed) is one, which lets a preemption signal end a long evaluation or mining pass in time."""
    _between_batches.append(callback)
    try:
        yield
    finally:
        _between_batches.remove(callback)


def run_between_batches() -> None:
    """The `between_batches` callbacks, now: every rank must reach this point equally often (collectives)."""
    for callback in _between_batches:
        callback()


class ProgressLine:
    """Prints `encoding <kind>: done/total texts` at most every `every` seconds (first line after `every`)."""

    def __init__(self, kind: str, every: float = PROGRESS_SECONDS, enabled: bool = True, clock=time.perf_counter):
        self.kind, self.every, self.enabled, self.clock = kind, every, enabled, clock
        self.start = self.last = clock()

    def __call__(self, done: int, total: int) -> None:
        fault_point("evaluation_encode")
        run_between_batches()
        now = self.clock()
        if self.enabled and now - self.last >= self.every:
            rate = done / max(now - self.start, 1e-9)
            left = time_left((total - done) / rate) if rate > 0 else "unknown time"
            line = f"encoding {self.kind} texts: {done:,}/{total:,} ({rate:.0f} texts/s, about {left} left)"
            print(line, flush=True)
            self.last = now


def time_left(seconds: float) -> str:
    """A duration for a progress line: 45s, 3m 07s, 2h 05m."""
    seconds = int(max(0.0, seconds))
    hours, minutes = seconds // 3600, seconds // 60 % 60
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds % 60:02d}s" if minutes else f"{seconds}s"


def encode_texts(
    encoder, texts: list[str], kind: str, batch_size: int = 64, bf16: bool = False, accelerator=None
) -> np.ndarray:
    """(N, d) float32 embeddings of `texts` in their order; each text is encoded by exactly one process."""
    world = accelerator.num_processes if accelerator is not None else 1
    progress = ProgressLine(kind, enabled=accelerator is None or accelerator.is_main_process)
    if world == 1:
        return _encode(encoder, texts, kind, batch_size, bf16, progress)
    rank = accelerator.process_index
    shard = texts[rank::world]
    per_rank = -(-len(texts) // world)  # the largest shard; smaller ones are padded to it
    # Every rank encodes exactly `per_rank` texts (the padding repeats a text): under ZeRO-3 each forward gathers
    # parameters collectively, so ranks running different numbers of batches would wait on each other forever.
    filler = shard[:1] or texts[:1]
    local = _encode(encoder, shard + filler * (per_rank - len(shard)), kind, batch_size, bf16, progress)
    padded = torch.from_numpy(local).to(accelerator.device)
    gathered = accelerator.gather(padded).cpu().numpy().reshape(world, per_rank, -1)  # (W, per_rank, d)
    out = np.empty((len(texts), gathered.shape[2]), dtype=np.float32)
    for r in range(world):
        count = len(range(r, len(texts), world))
        out[r::world] = gathered[r, :count]
    return out


def _encode(encoder, texts: list[str], kind: str, batch_size: int, bf16: bool, progress=None) -> np.ndarray:
    if not texts:
        # the embedding size is unknown without encoding something; one probe text is cheap
        dim = np.asarray(encoder.encode(["."], kind=kind, batch_size=1, bf16=bf16)).shape[1]
        return np.zeros((0, dim), dtype=np.float32)
    extra = {"progress": progress} if "progress" in inspect.signature(encoder.encode).parameters else {}
    return np.asarray(encoder.encode(texts, kind=kind, batch_size=batch_size, bf16=bf16, **extra), dtype=np.float32)
