"""Training on CPU: the plain math attention, a cheaper dropout mask and padding-free rows; inference stays on sdpa.

Measured on the 2-core CPU with multilingual-e5-small (one fixed batch, variants interleaved; docs/results.md has
the benchmark): under bf16 autocast a training step through torch's `scaled_dot_product_attention` is slower than
the same attention written as two matmuls and a softmax, and `F.dropout` on the (N, heads, L, L) probabilities is
the largest single cost of dropout, because it draws a float32 random number per element (`bernoulli_`); the
hidden-state dropouts of every layer come next. Here the keep mask comes from 16-bit random integers instead (for
the attention weights, and for the hidden states through `CheapDropout`): the drop probability is
`round(p * 2**16) / 2**16` (within 1e-5 of p) and the kept values are scaled by the inverse of that keep rate, so the
expectation is exact. The draw uses torch's global generator, so seeds and GradCache's replayed forwards (which
restore the RNG state) hold.

Registered with transformers' own extension points (`AttentionInterface`, `AttentionMaskInterface`) under
`CPU_TRAINING_ATTENTION`; a model loaded with `attn_implementation=CPU_TRAINING_ATTENTION` gets the additive float
mask of the eager path. Without gradients and dropout (evaluation, encoding) the call goes to transformers' sdpa
function, which is the faster one there; a forward without gradients but WITH dropout (GradCache's first pass) stays
on the math path, so its dropout masks are the ones its replay draws.

Padding-free batches: a training batch's rows are fixed by the sampler, so they are padded to the longest row and
more than half of the computed positions can be padding (MLQA-R pairs at 128 tokens: 45% real). `DualEncoder` with
`pack_sequences` sends only the real tokens, as ONE row of T tokens with per-sequence position ids and a
`PackedLayout` (passed down as a keyword, as transformers passes its own padding-free keywords to the attention
function): every linear layer, LayerNorm and hidden dropout then computes T positions, and only attention goes back
to padded (n, heads, L, L) blocks, in length-sorted groups because its element-wise work (mask, softmax, dropout)
grows with the square of a group's longest row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CPU_TRAINING_ATTENTION = "hbt_cpu_training"
_RANDOM_LEVELS = 1 << 16
# Packing needs absolute positions counted from 0 (what the position ids of a packed row give) and bidirectional
# attention: BERT. RoBERTa-family encoders (XLM-R) count positions from padding_idx + 1; decoders mask causally.
PACKABLE_MODEL_TYPES = ("bert",)


def cheap_dropout(values: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with a keep mask drawn from int16 random numbers (see the module docstring); identity at p == 0."""
    if p <= 0.0:
        return values
    if p >= 1.0:
        return values * 0.0  # everything dropped (and no 1 / keep rate to divide by)
    keep, rescale = keep_mask(values.shape, p, values.device)
    return values * keep * rescale


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean keep mask for dropout at 0 < p < 1 and the factor that restores the expectation, 1 / P(keep)."""
    dropped_levels = round(p * _RANDOM_LEVELS)
    keep = uniform_int16(shape, device) >= dropped_levels - (1 << 15)  # P(keep) = 1 - dropped_levels / 2**16
    return keep, _RANDOM_LEVELS / (_RANDOM_LEVELS - dropped_levels)


def uniform_int16(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Uniform int16 numbers over the whole range, cut from full-range int64 draws, four per draw: 4.7x faster on
    this CPU than `random_(-2**15, 2**15)` on an int16 tensor (8M numbers, 11 vs 54 ms)."""
    count = shape.numel()
    draws = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    return draws.view(torch.int16)[:count].view(shape)


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
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    dropout = dropout if module.training else 0.0
    if kwargs.get("packed_layout") is not None:
        return _packed_attention(module, query, key, value, scaling, dropout, kwargs["packed_layout"])
    grouped_heads = key.shape[1] != query.shape[1]  # grouped-query attention: leave it to sdpa's handling
    if grouped_heads or (dropout == 0.0 and not torch.is_grad_enabled()):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return _math_attention(query, key, value, attention_mask, scaling, dropout)


class CheapDropout(nn.Dropout):
    """`nn.Dropout` with `cheap_dropout`'s 16-bit mask, for a model's hidden-state dropout modules."""

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return cheap_dropout(values, self.p) if self.training else values


def use_cheap_dropout(model: nn.Module) -> int:
    """Replace every plain `nn.Dropout` in `model` by a `CheapDropout` of the same p; returns how many."""
    swapped = [name for name, module in model.named_modules() if type(module) is nn.Dropout]
    for name in swapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, CheapDropout(getattr(parent, child).p))
    return len(swapped)


def _math_attention(query, key, value, attention_mask, scaling: float, dropout: float):
    """transformers' layouts around `_attend`: (N, heads, L, d) -> (N, L, heads, d), and the weights."""
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    output, probabilities = _attend(query, key, value, mask, scaling, dropout)
    return output.transpose(1, 2).contiguous(), probabilities


def _attend(query, key, value, additive_mask, scaling: float, dropout: float):
    """softmax(q k^T * scaling + mask) v with `cheap_dropout` on the weights, over the last two dimensions (any
    leading ones): (..., L, d) -> (..., L, d), and the weights before dropout. Both scalings (1 / sqrt(d), dropout's
    1 / P(keep)) go on (..., L, d) tensors rather than the (..., L, L) weights, d / L of the work."""
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))  # (..., L, L)
    if additive_mask is not None:
        scores = scores + additive_mask
    probabilities = nn.functional.softmax(scores, dim=-1).to(value.dtype)
    if 0.0 < dropout < 1.0:
        keep, rescale = keep_mask(probabilities.shape, dropout, probabilities.device)
        return torch.matmul(probabilities * keep, value) * rescale, probabilities
    return torch.matmul(cheap_dropout(probabilities, dropout), value), probabilities


@dataclass(frozen=True)
class PackedGroup:
    """Sequences of similar length, cut back out of a packed row: which tokens (T_g,) in packed order, and where
    each goes in the group's (rows, longest) padded layout (flat index row * longest + position)."""

    tokens: torch.Tensor
    padded_index: torch.Tensor
    rows: int
    longest: int


@dataclass(frozen=True)
class PackedLayout:
    """How a padding-free row of N sequences is attended: in `groups` of similar length (attention's (L, L) work
    grows with the square of the longest row of a group), and `order` puts the groups' tokens back in packed order."""

    groups: tuple[PackedGroup, ...]
    grouped: torch.Tensor  # (T,) the packed row's tokens group after group: the groups' `tokens` concatenated
    order: torch.Tensor  # (T,) grouped position of each packed token: the inverse permutation

    @classmethod
    def of(cls, lengths: torch.Tensor, groups: int) -> PackedLayout:
        """`lengths` (N,) of the packed sequences, in packed order -> the layout for `groups` length-sorted groups."""
        starts = torch.cumsum(lengths, 0) - lengths  # (N,) first token of each sequence
        by_length = torch.argsort(lengths, descending=True, stable=True)  # (N,)
        parts = []
        for rows in torch.tensor_split(by_length, min(groups, len(lengths))):
            row_lengths = lengths[rows]  # (n_g,)
            longest = int(row_lengths.max())
            local_row = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), row_lengths)  # (T_g,)
            row_starts = torch.cumsum(row_lengths, 0) - row_lengths  # (n_g,) in the group's own packing
            position = torch.arange(len(local_row), device=rows.device) - row_starts[local_row]  # (T_g,)
            tokens = starts[rows][local_row] + position  # (T_g,) token index in the packed row
            parts.append(PackedGroup(tokens, local_row * longest + position, len(rows), longest))
        grouped = torch.cat([part.tokens for part in parts])
        return cls(tuple(parts), grouped, torch.argsort(grouped))


def _packed_attention(module, query, key, value, scaling: float, dropout: float, layout: PackedLayout):
    """Attention of a packed row: (1, heads, T, d) query/key/value -> (1, T, heads, d), each token attending only
    to the tokens of its own sequence (per group, padded back to (heads, n_g, L_g, d) with a key-padding mask).

    The groups are laid out heads first, contiguous, so the matrix products and their backward need no copies; the
    tokens are gathered once per tensor from the packed row's own (T, heads, d) storage, also in the backward."""
    heads, head_dim = query.shape[1], query.shape[-1]
    sizes = [len(group.tokens) for group in layout.groups]
    # The additive mask in the dtype the eager mask would have (the parameters'), so scores promote the same way.
    mask_dtype = next(module.parameters()).dtype
    grouped = [_grouped_tokens(packed, layout).split(sizes) for packed in (query, key, value)]  # (T_g, heads, d)
    outputs = []
    for group, group_query, group_key, group_value in zip(layout.groups, *grouped):
        padded_size = group.rows * group.longest

        def unpack(tokens: torch.Tensor, group=group, padded_size=padded_size) -> torch.Tensor:
            padded = tokens.new_zeros(heads, padded_size, head_dim)
            padded = padded.index_copy(1, group.padded_index, tokens.transpose(0, 1))
            return padded.view(heads, group.rows, group.longest, head_dim)  # (heads, n_g, L_g, d)

        padding = torch.ones(padded_size, dtype=torch.bool, device=query.device)
        padding = padding.index_fill(0, group.padded_index, False)
        mask = torch.zeros(1, group.rows, 1, group.longest, dtype=mask_dtype, device=query.device)
        mask = mask.masked_fill(padding.view(1, group.rows, 1, group.longest), torch.finfo(mask_dtype).min)
        output, _ = _attend(unpack(group_query), unpack(group_key), unpack(group_value), mask, scaling, dropout)
        outputs.append(output.reshape(heads, padded_size, head_dim).index_select(1, group.padded_index))
    packed_output = torch.cat(outputs, dim=1).transpose(0, 1).index_select(0, layout.order)  # (T, heads, d)
    return packed_output.unsqueeze(0), None


def _grouped_tokens(packed: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """(1, heads, T, d), a heads-first view of the linear layer's (1, T, heads, d) output -> (T, heads, d) rows in
    grouped order, gathered from that storage directly (views only before the gather: their backward copies
    nothing)."""
    return packed.transpose(1, 2).squeeze(0).index_select(0, layout.grouped)


def can_pack(config) -> bool:
    """Whether a backbone with this config takes padding-free rows (this attention and a packable architecture)."""
    packable = config.model_type in PACKABLE_MODEL_TYPES and not getattr(config, "is_decoder", False)
    return packable and config._attn_implementation == CPU_TRAINING_ATTENTION


def register() -> str:
    """Make `CPU_TRAINING_ATTENTION` a valid `attn_implementation` (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(CPU_TRAINING_ATTENTION, cpu_training_attention)
    AttentionMaskInterface.register(CPU_TRAINING_ATTENTION, eager_mask)
    return CPU_TRAINING_ATTENTION
