"""The word-embedding gradient without a fresh (vocabulary, hidden) matrix per lookup.

The dense backward of an embedding lookup allocates and zero-fills a gradient the size of the whole table (96M
floats, 384 MB, for e5-small) for every lookup: a step that embeds queries and passages separately makes two and
adds them. On the 2-core CPU those fills were the largest single op of a full fine-tuning step. With
`nn.Embedding.sparse` the lookups return (token, row) pairs instead; `densify` sums them into one buffer kept across
steps, zeroed in place, and hands it to clipping and the optimizer as the ordinary dense gradient. AdamW and the
gradient norm see the same values (up to the order of float additions); only one process is supported, because
DDP and DeepSpeed reduce gradients themselves.
"""

from __future__ import annotations

import torch
from torch import nn


class SparseEmbeddingGradient:
    """Switches `embedding` to sparse gradients; call `densify()` after the backward passes of a step."""

    def __init__(self, embedding: nn.Embedding):
        embedding.sparse = True
        self.weight = embedding.weight
        self.buffer: torch.Tensor | None = None

    def densify(self) -> None:
        """Replace the accumulated sparse gradient by the same gradient as a dense tensor (the kept buffer)."""
        grad = self.weight.grad
        if grad is None or not grad.is_sparse:
            return
        if self.buffer is None:
            self.buffer = torch.zeros_like(self.weight)
        else:
            self.buffer.zero_()  # in place: no page faults on a fresh 384 MB allocation
        self.buffer.index_add_(0, grad._indices()[0], grad._values().to(self.buffer.dtype))
        self.weight.grad = self.buffer


def sparse_embedding_gradient(model, enabled: bool, single_cpu_process: bool) -> SparseEmbeddingGradient | None:
    """The helper for `model` (a DualEncoder, before `prepare`) when it applies: asked for, one CPU process, and a
    trainable word-embedding matrix (not frozen, not under LoRA)."""
    embedding = model.backbone.get_input_embeddings()
    if not (enabled and single_cpu_process and embedding.weight.requires_grad and not model.is_peft):
        return None
    return SparseEmbeddingGradient(embedding)
