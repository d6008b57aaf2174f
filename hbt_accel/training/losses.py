"""InfoNCE with cross-device negatives, and its cached (GradCache) variant, behind ONE training-step protocol.

Both losses implement `training_step(model, batch, accelerator) -> detached loss`: forward AND backward of one
micro-batch (`batch` as `PairCollator` makes it), gradients left in the parameters. The training loop and the speed
benchmark call only that, so there is one code path whichever loss a recipe picks.

Batch arithmetic (per optimiser step): each of W ranks holds B_local queries and B_local*(1+k)
passages laid out as [positives (B_local); hard negatives (B_local*k)]. Every query is scored against
the W*B_local*(1+k) passages of the GLOBAL batch, so it sees W*B_local*(1+k) - 1 negatives.
The loss is the mean over LOCAL rows and is not rescaled by W: DDP then averages parameter
gradients over ranks and the update equals one process on the concatenated batch.

With `passage_ids` in the batch (the parallel id of every passage, `data.collate.PairCollator`) the loss works by id
across the global batch (docs/beyond_paper.md): a passage with the query's id is its answer in some language, so
it is a positive (`multi_positive`) or masked, never a negative; and `alignment_weight` adds a translation-ranking
term between passages of one id. Without `passage_ids` the loss is the plain single-positive InfoNCE, operation
for operation (the default recipe's path).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hbt_accel.data.collate import PADDING_PASSAGE
from hbt_accel.distributed import all_gather_with_grad, gather_no_grad


class TrainingStep(Protocol):
    def training_step(self, model: nn.Module, batch: Mapping, accelerator) -> torch.Tensor:
        """Forward and backward of one micro-batch {query, passage: tokenised (N, L); passage_keys: (N_p,); optional
        passage_ids: (N_p,)}; returns the loss, detached. The caller clips, steps the optimizer and zeroes the
        gradients."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _masked_cross_entropy(
    scores: torch.Tensor, target: torch.Tensor, row_keys: torch.Tensor | None, column_keys: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of `scores` (R, C) against `target` (R,), with every column whose key equals the row's
    key set to -inf except the target column (identical passage texts are not negatives)."""
    if row_keys is not None:
        same_text = column_keys[None, :] == row_keys[:, None]  # (R, C)
        same_text[torch.arange(len(target), device=target.device), target] = False
        scores = scores.masked_fill(same_text, float("-inf"))  # (R, C)
    return F.cross_entropy(scores, target)


class InfoNCELoss(nn.Module):
    """InfoNCE over the global batch (cross-device negatives), optionally symmetric.

    forward(q (B_local, d), p (B_local*(1+k), d) = [positives; hard negatives], passage_keys (B_local*(1+k),)
    int64 or None) -> scalar. Equal keys mean identical passage text; such columns are masked out of a
    row's negatives. With `symmetric`, the passage->query term (local positives against the gathered
    queries) is averaged with the query->passage term.

    With `passage_ids` (N_p,) int64 the query term works by parallel id (p = [row answers (B_local); hard
    negatives; further answers], `data.collate.PairCollator`): every column holding the row's id is a positive with
    `multi_positive` (`multi_positive_nce`), else masked; padding slots are masked for every row; and
    `alignment_weight` * `translation_ranking` is added.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        symmetric: bool = False,
        multi_positive: bool = False,
        alignment_weight: float = 0.0,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if alignment_weight < 0:
            raise ValueError(f"alignment_weight must be >= 0, got {alignment_weight}")
        self.temperature = temperature
        self.symmetric = symmetric
        self.multi_positive = multi_positive
        self.alignment_weight = alignment_weight

    def forward(
        self,
        q: torch.Tensor,
        p: torch.Tensor,
        passage_keys: torch.Tensor | None = None,
        passage_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = q.size(0)  # B_local
        passages = p.size(0)  # B_local*(1+k)
        if passages % batch != 0:
            raise ValueError(f"p has {passages} rows, not a multiple of the {batch} queries")
        for name, tensor in (("passage_keys", passage_keys), ("passage_ids", passage_ids)):
            if tensor is not None and tensor.shape != (passages,):
                raise ValueError(f"{name} must have shape ({passages},), got {tuple(tensor.shape)}")
        rank = _rank()
        rows = torch.arange(batch, device=q.device)  # (B_local,)

        p_all = all_gather_with_grad(p)  # (W*B_local*(1+k), d)
        scores = q @ p_all.T / self.temperature  # (B_local, W*B_local*(1+k))
        target = rank * passages + rows  # (B_local,)
        keys_all = gather_no_grad(passage_keys) if passage_keys is not None else None  # (W*B_local*(1+k),)
        row_keys = passage_keys[:batch] if passage_keys is not None else None  # (B_local,)
        ids_all = gather_no_grad(passage_ids) if passage_ids is not None else None  # (W*N_p,)
        if ids_all is None:
            loss = _masked_cross_entropy(scores, target, row_keys, keys_all)
        else:
            loss = self._query_term_by_id(scores, target, passage_ids[:batch], ids_all, keys_all)
        if self.symmetric:
            q_all = all_gather_with_grad(q)  # (W*B_local, d)
            scores_pq = p[:batch] @ q_all.T / self.temperature  # (B_local, W*B_local)
            target_pq = rank * batch + rows  # (B_local,)
            # A query whose positive has the same text as this passage is a match, not a negative.
            query_keys_all = gather_no_grad(row_keys) if row_keys is not None else None  # (W*B_local,)
            loss_pq = _masked_cross_entropy(scores_pq, target_pq, row_keys, query_keys_all)
            loss = (loss + loss_pq) / 2
        if ids_all is not None and self.alignment_weight:
            alignment = translation_ranking(p, p_all, passage_ids, ids_all, keys_all, self.temperature, rank)
            loss = loss + self.alignment_weight * alignment
        return loss

    def _query_term_by_id(
        self,
        scores: torch.Tensor,
        target: torch.Tensor,
        row_ids: torch.Tensor,
        ids_all: torch.Tensor,
        keys_all: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mean over local rows of `multi_positive_nce`; the row's own answer is always a positive."""
        own = F.one_hot(target, scores.size(1)).bool()  # (B_local, C)
        same_id = ids_all[None, :] == row_ids[:, None]  # (B_local, C) the row's answer, in any language
        positive = same_id | own if self.multi_positive else own  # (B_local, C)
        excluded = same_id | (ids_all == PADDING_PASSAGE)[None, :] | _same_text_as(positive, keys_all)
        return multi_positive_nce(_at_least_float32(scores), positive, excluded & ~positive).mean()

    def training_step(self, model: nn.Module, batch: Mapping, accelerator) -> torch.Tensor:
        """Embed queries and passages with grad, InfoNCE, `accelerator.backward` (scales for accumulation)."""
        query = model(batch["query"]["input_ids"], batch["query"]["attention_mask"])  # (B_local, d)
        passage = model(batch["passage"]["input_ids"], batch["passage"]["attention_mask"])  # (B_local(1+k), d)
        loss = self(query, passage, batch["passage_keys"], batch.get("passage_ids"))
        accelerator.backward(loss)
        return loss.detach()


def multi_positive_nce(scores: torch.Tensor, positive: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Multi-positive InfoNCE, "every positive against all negatives": per row (R,), the mean over its positives j of

        -log( e^{s_j} / (e^{s_j} + sum_{n in negatives} e^{s_n}) ) = softplus(logsumexp_n s_n - s_j)

    `scores`, `positive`, `excluded`: (R, C); negatives are the columns neither positive nor excluded. A row without
    positives gives 0. Why this form: multilingual-pool AP rewards ranking EVERY relevant answer above every
    irrelevant one, which is what each term asks for; positives never appear in each other's denominators, so the
    loss does not push one language's answer above another's (the sum-of-positives form, -log sum_j e^{s_j} / Z, is
    satisfied by one high positive; the SupCon form pits the positives against each other). With one positive per
    row it equals InfoNCE.
    """
    negative = ~(positive | excluded)  # (R, C)
    has_negative = negative.any(dim=1, keepdim=True)  # (R, 1)
    # A row without negatives would take logsumexp over -inf only, whose gradient is NaN: use zeros, then drop it.
    negative_scores = scores.masked_fill(~negative, float("-inf")).masked_fill(~has_negative, 0.0)  # (R, C)
    negatives_lse = torch.logsumexp(negative_scores, dim=1, keepdim=True)  # (R, 1)
    negatives_lse = negatives_lse.masked_fill(~has_negative, float("-inf"))  # (R, 1)
    pair_losses = F.softplus(negatives_lse - scores).masked_fill(~positive, 0.0)  # (R, C)
    return pair_losses.sum(dim=1) / positive.sum(dim=1).clamp(min=1)  # (R,)


def translation_ranking(
    p: torch.Tensor,
    p_all: torch.Tensor,
    passage_ids: torch.Tensor,
    ids_all: torch.Tensor,
    keys_all: torch.Tensor | None,
    temperature: float,
    rank: int,
) -> torch.Tensor:
    """Translation ranking (LaBSE's objective, without its additive margin) between passages of the global batch:
    each local passage with a parallel id ranks every other passage of that id (its translations) above the
    passages of other ids, `multi_positive_nce` over passage-passage cosines / temperature. Both directions of a
    pair are anchors. Mean over the anchors of the GLOBAL batch that have a translation in it (each rank scales its
    sum by W / global count, so DDP's gradient average equals one process on the whole batch).

    p: (N_p, d) local passages; p_all: (W*N_p, d) gathered with grad; passage_ids: (N_p,); ids_all, keys_all:
    (W*N_p,). Excluded: the anchor itself, padding slots, and passages with the text of the anchor or of one of its
    translations.
    """
    local = p.size(0)  # N_p
    scores = p @ p_all.T / temperature  # (N_p, W*N_p)
    own = F.one_hot(rank * local + torch.arange(local, device=p.device), p_all.size(0)).bool()  # (N_p, W*N_p)
    has_id = (passage_ids >= 0)[:, None]  # (N_p, 1) answers of a known id (not padding, not an unknown negative)
    positive = (ids_all[None, :] == passage_ids[:, None]) & has_id & ~own  # (N_p, W*N_p)
    excluded = own | (ids_all == PADDING_PASSAGE)[None, :] | _same_text_as(positive | own, keys_all)
    anchor_losses = multi_positive_nce(_at_least_float32(scores), positive, excluded & ~positive)  # (N_p,)
    anchors = positive.any(dim=1).sum().reshape(1)  # (1,) local anchors with a translation
    world = ids_all.numel() // local
    return anchor_losses.sum() * world / gather_no_grad(anchors).sum().clamp(min=1)


def _at_least_float32(scores: torch.Tensor) -> torch.Tensor:
    """bf16 scores (autocast) are summed in float32, as cross_entropy does; float64 stays float64."""
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


def _same_text_as(columns: torch.Tensor, keys_all: torch.Tensor | None) -> torch.Tensor:
    """(R, C): the columns whose passage text (key) equals that of one of the row's marked `columns` (R, C)."""
    if keys_all is None:
        return torch.zeros_like(columns)
    _, text_of = torch.unique(keys_all, return_inverse=True)  # (C,) which distinct text each column holds
    marked = torch.zeros(columns.size(0), int(text_of.max()) + 1, dtype=torch.bool, device=columns.device)  # (R, T)
    rows, marked_columns = columns.nonzero(as_tuple=True)
    marked[rows, text_of[marked_columns]] = True
    return marked[:, text_of]  # (R, C)


class _RandomState:
    """The RNG state before one mini-batch forward, so its re-forward draws the same dropout masks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        # fork_rng: the outer RNG stream continues as if the replay never happened.
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _mini_batches(batch: Mapping[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Slice every tensor of a tokenized batch along dim 0; drop trailing all-padding columns of each
    slice (right padding only, so positions and results do not change)."""
    total = next(iter(batch.values())).size(0)
    chunks = []
    for start in range(0, total, size):
        chunk = {name: t[start : start + size] for name, t in batch.items()}
        mask = chunk.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            used = mask.any(dim=0).nonzero()  # (L_used, 1)
            length = int(used.max()) + 1 if len(used) else mask.size(1)
            chunk = {name: t[:, :length] if t.dim() == 2 else t for name, t in chunk.items()}
        chunks.append(chunk)
    return chunks


class CachedInfoNCELoss(nn.Module):
    """GradCache version of `InfoNCELoss`: the same loss and gradients with activation memory of one
    mini-batch of `mini_batch_size` texts, whatever the batch size.

    `training_step(model, batch, accelerator)` (the protocol) or `step(model, query_batch, passage_batch,
    passage_keys, accelerator, passage_ids)`: both run the backward themselves and return the detached loss.
    `model` is the prepared model (plain, DDP or DeepSpeed engine) called as `model(**batch) -> (N, d)`. Under DDP all
    chunk backwards but the last run inside `accelerator.no_sync`; under DeepSpeed the chunk backwards
    go to the engine with the accumulation boundary set on the last one only, so `engine.step()` runs
    once. Calling the module directly (`forward`) computes the plain loss, e.g. for validation.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        symmetric: bool = False,
        mini_batch_size: int = 32,
        multi_positive: bool = False,
        alignment_weight: float = 0.0,
    ):
        super().__init__()
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        self.loss = InfoNCELoss(temperature, symmetric, multi_positive, alignment_weight)
        self.mini_batch_size = mini_batch_size

    def forward(
        self,
        q: torch.Tensor,
        p: torch.Tensor,
        passage_keys: torch.Tensor | None = None,
        passage_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.loss(q, p, passage_keys, passage_ids)

    def training_step(self, model: nn.Module, batch: Mapping, accelerator) -> torch.Tensor:
        keys, ids = batch["passage_keys"], batch.get("passage_ids")
        return self.step(model, batch["query"], batch["passage"], keys, accelerator, ids)

    def step(
        self,
        model: nn.Module,
        query_batch: Mapping[str, torch.Tensor],
        passage_batch: Mapping[str, torch.Tensor],
        passage_keys: torch.Tensor | None = None,
        accelerator=None,
        passage_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One forward/backward over the local batch; gradients end up in the parameters. Returns the loss."""
        query_chunks = _mini_batches(query_batch, self.mini_batch_size)
        passage_chunks = _mini_batches(passage_batch, self.mini_batch_size)
        chunks = query_chunks + passage_chunks
        device = query_chunks[0]["input_ids"].device

        # (1) Embed every mini-batch without grad, remembering the RNG state before each forward.
        states, embeddings = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(_RandomState(device))
                embeddings.append(model(**chunk))  # (m, d)
        q = torch.cat(embeddings[: len(query_chunks)]).detach().requires_grad_()  # (B_local, d)
        p = torch.cat(embeddings[len(query_chunks) :]).detach().requires_grad_()  # (B_local*(1+k), d)

        # (2) The same InfoNCE on the detached leaves; its backward gives d loss / d embedding only
        # (the cross-rank part of that gradient arrives through the gather's backward).
        loss = self.loss(q, p, passage_keys, passage_ids)
        loss.backward()
        cached_grads = torch.cat([q.grad, p.grad]).split([len(e) for e in embeddings])  # [(m, d)]

        # (3) Re-embed each mini-batch with grad under its step-1 RNG state and backprop the cached
        # gradient through it: sum over chunks of d(emb . g)/d theta = d loss / d theta.
        for index, (chunk, state, grad) in enumerate(zip(chunks, states, cached_grads)):
            last = index == len(chunks) - 1
            sync = nullcontext() if last or accelerator is None else accelerator.no_sync(model)
            with sync, state.replay():
                embedding = model(**chunk)  # (m, d)
                surrogate = (embedding * grad).sum()  # scalar
                _backward(surrogate, accelerator, last)
        return loss.detach()


def _backward(surrogate: torch.Tensor, accelerator, last: bool) -> None:
    if accelerator is None:
        surrogate.backward()
        return
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and not last:
        # accelerator.backward would also call engine.step() after this chunk; go to the engine directly
        # and keep it inside one accumulation window. The last chunk closes the window below.
        engine = accelerator.deepspeed_engine_wrapped.engine
        engine.set_gradient_accumulation_boundary(is_boundary=False)
        engine.backward(surrogate)
        return
    # Scales by gradient_accumulation_steps like the plain path; under DeepSpeed steps the engine.
    accelerator.backward(surrogate)
