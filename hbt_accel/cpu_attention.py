"""Attention for training on CPU: the plain math path with a cheaper dropout mask; inference stays on sdpa.

Measured on the 2-core CPU with multilingual-e5-small (one fixed batch, variants interleaved; docs/results.md has
the benchmark): under bf16 autocast a training step through torch's `scaled_dot_product_attention` is slower than
the same attention written as two matmuls and a softmax, and `F.dropout` on the (N, heads, L, L) probabilities is
the largest single cost of dropout, because it draws a float32 random number per element (`bernoulli_`). Here the
keep mask comes from 16-bit random integers instead: the drop probability is `round(p * 2**16) / 2**16` (within
1e-5 of p) and the kept values are scaled by the inverse of that keep rate, so the expectation is exact. The draw
uses torch's global generator, so seeds and GradCache's replayed forwards (which restore the RNG state) hold.

Registered with transformers' own extension points (`AttentionInterface`, `AttentionMaskInterface`) under
`CPU_TRAINING_ATTENTION`; a model loaded with `attn_implementation=CPU_TRAINING_ATTENTION` gets the additive float
mask of the eager path. Without gradients (evaluation, encoding) the call goes to transformers' sdpa function, which
is the faster one there.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CPU_TRAINING_ATTENTION = "hbt_cpu_training"
_RANDOM_LEVELS = 1 << 16


def cheap_dropout(values: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with a keep mask drawn from int16 random numbers (see the module docstring); identity at p == 0."""
    if p <= 0.0:
        return values
    dropped_levels = round(p * _RANDOM_LEVELS)
    random = torch.empty(values.shape, dtype=torch.int16, device=values.device).random_(-(1 << 15), 1 << 15)
    keep = random >= dropped_levels - (1 << 15)  # P(keep) = 1 - dropped_levels / 2**16
    return values * keep * (_RANDOM_LEVELS / (_RANDOM_LEVELS - dropped_levels))


def cpu_training_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention signature: (N, heads, L, d) query/key/value -> ((N, L, heads, d), weights)."""
    grouped_heads = key.shape[1] != query.shape[1]  # grouped-query attention: leave it to sdpa's handling
    if not torch.is_grad_enabled() or grouped_heads:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (N, heads, L, L)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = cheap_dropout(nn.functional.softmax(scores, dim=-1), dropout if module.training else 0.0)
    output = torch.matmul(weights.to(value.dtype), value)  # (N, heads, L, d)
    return output.transpose(1, 2).contiguous(), weights


def register() -> str:
    """Make `CPU_TRAINING_ATTENTION` a valid `attn_implementation` (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(CPU_TRAINING_ATTENTION, cpu_training_attention)
    AttentionMaskInterface.register(CPU_TRAINING_ATTENTION, eager_mask)
    return CPU_TRAINING_ATTENTION
