"""What makes an embedding mean what it means (pooling, prefixes, lengths) and how LoRA adapts the backbone.

Kept apart from the model so the files written beside the weights (sentence-transformers format, model card) can
read them without importing the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

POOLINGS = ("mean", "cls", "last")
KINDS = ("query", "passage")


@dataclass
class EncoderSettings:
    """How texts become vectors: pooling over the last hidden states, L2 normalisation, prefixes, lengths."""

    pooling: str = "mean"  # mean | cls | last (last non-padding token; decoder LLMs)
    normalize: bool = True
    query_prefix: str = "query: "
    passage_prefix: str = "passage: "
    query_max_length: int = 64  # tokens, prefix and special tokens included
    passage_max_length: int = 128

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        for name in ("query_max_length", "passage_max_length"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EncoderSettings:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown encoder settings {unknown}")
        return cls(**data)


@dataclass
class LoraSettings:
    """LoRA adapters through peft. `target_modules=None`: peft's default for the architecture, else all-linear."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
