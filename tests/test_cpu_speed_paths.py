"""The CPU speed paths keep the numerics: the training attention with its cheaper dropout, and the sparse
word-embedding gradient (hbt_accel/models/cpu_attention.py, hbt_accel/training/embedding_gradient.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel

from hbt_accel.models.cpu_attention import (
    CheapDropout,
    PackedLayout,
    can_pack,
    cheap_dropout,
    cpu_training_attention,
    keep_mask,
    register,
    uniform_int16,
    use_cheap_dropout,
)
from hbt_accel.models.dual_encoder import DualEncoder
from hbt_accel.training.embedding_gradient import SparseEmbeddingGradient
from tests.test_train import train_here

TEXTS = ["a short one", "a much longer sentence with many more words in it than the first", "mid length text"]


def test_cheap_dropout_drops_at_rate_p_and_keeps_the_expectation():
    torch.manual_seed(0)
    values = torch.ones(400_000)
    dropped = cheap_dropout(values, 0.1)
    share = (dropped == 0).float().mean().item()
    assert abs(share - 0.1) < 0.003  # 6 standard deviations of a binomial share at n = 400k
    kept = dropped[dropped != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 65536 / (65536 - 6554)))  # 1 / P(keep), exactly
    assert abs(dropped.mean().item() - 1.0) < 0.005
    assert cheap_dropout(values, 0.0) is values
    assert cheap_dropout(values, 1.0).abs().max() == 0
    torch.manual_seed(3)
    first = cheap_dropout(values, 0.3)
    torch.manual_seed(3)
    assert torch.equal(first, cheap_dropout(values, 0.3))  # the global generator: seeds and replays hold


def test_uniform_int16_covers_the_range_evenly_in_every_slot_of_a_draw():
    torch.manual_seed(0)
    numbers = uniform_int16(torch.Size((3, 133_335)), torch.device("cpu"))  # 400,005: not a multiple of 4
    assert numbers.shape == (3, 133_335) and numbers.dtype == torch.int16
    assert numbers.min() == -(1 << 15) and numbers.max() == (1 << 15) - 1
    slots = numbers.flatten()[:400_000].view(-1, 4).to(torch.int64) + (1 << 15)  # each int64 draw gives 4 numbers
    for slot in slots.T:  # each slot alone: 16 equal bins, and a low-bit pattern, as a uniform draw would give
        bins = torch.bincount(slot >> 12, minlength=16).double()
        assert ((bins - 6250) ** 2 / 6250).sum() < 50  # chi-square, 15 degrees of freedom: p < 1e-5 above 50
        assert abs((slot % 2).double().mean().item() - 0.5) < 0.01


def test_cheap_dropout_modules_replace_every_plain_dropout_and_keep_eval_exact(tiny_model_dir):
    model = BertModel.from_pretrained(tiny_model_dir, add_pooling_layer=False, hidden_dropout_prob=0.25)
    layers = model.config.num_hidden_layers
    assert use_cheap_dropout(model) == 1 + 3 * layers  # embeddings; per layer attention probs, two hidden states
    assert not any(type(module) is torch.nn.Dropout for module in model.modules())
    hidden_dropout = model.encoder.layer[0].output.dropout
    assert isinstance(hidden_dropout, CheapDropout) and hidden_dropout.p == 0.25
    values = torch.ones(200_000)
    dropped = hidden_dropout(values)
    assert abs((dropped == 0).float().mean().item() - 0.25) < 0.006
    hidden_dropout.eval()
    assert hidden_dropout(values) is values


def _attention_inputs():
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 2, 7, 4) for _ in range(3))
    mask = torch.zeros(2, 1, 7, 7)
    mask[1, :, :, 5:] = torch.finfo(torch.float32).min  # second row: the last 2 positions are padding
    return query, key, value, mask


def test_training_attention_is_the_softmax_formula_and_drops_only_in_training():
    query, key, value, mask = _attention_inputs()
    module = torch.nn.Module()
    output, weights = cpu_training_attention(module, query, key, value, mask, scaling=0.5, dropout=0.0)
    expected_weights = torch.softmax(query @ key.transpose(2, 3) * 0.5 + mask, dim=-1)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(output, (expected_weights @ value).transpose(1, 2))
    assert weights[1, :, :, 5:].abs().max() == 0  # padding gets no attention
    torch.manual_seed(7)
    dropped, probabilities = cpu_training_attention(module, query, key, value, None, scaling=0.5, dropout=0.5)
    torch.manual_seed(7)  # the same draw: the weights' keep mask, its 1 / P(keep) applied to the output
    keep, rescale = keep_mask(probabilities.shape, 0.5, probabilities.device)
    assert 0.3 < keep.float().mean().item() < 0.7 and rescale == 2.0
    torch.testing.assert_close(probabilities, torch.softmax(query @ key.transpose(2, 3) * 0.5, dim=-1))
    torch.testing.assert_close(dropped, ((probabilities * keep * rescale) @ value).transpose(1, 2))
    module.eval()
    kept, _ = cpu_training_attention(module, query, key, value, None, scaling=0.5, dropout=0.5)
    torch.testing.assert_close(kept, (probabilities @ value).transpose(1, 2))


def _backbone(model_dir, attn_implementation: str) -> BertModel:
    return BertModel.from_pretrained(model_dir, add_pooling_layer=False, attn_implementation=attn_implementation)


def test_training_attention_gives_sdpa_embeddings_and_gradients(tiny_model_dir, xlmr_tokenizer):
    """Dropout 0 (the tiny model): the same embeddings and weight gradients as transformers' sdpa, with gradients
    (the math path) and in inference (sdpa itself)."""
    encoders = {name: DualEncoder(_backbone(tiny_model_dir, name), xlmr_tokenizer) for name in ("sdpa", register())}
    batch = encoders["sdpa"].tokenize(TEXTS, "passage")
    embeddings, gradients = {}, {}
    for name, encoder in encoders.items():
        encoder.train()
        embedding = encoder(**batch)
        embedding.pow(3).sum().backward()
        embeddings[name] = embedding.detach()
        gradients[name] = {n: p.grad for n, p in encoder.named_parameters()}
        with torch.inference_mode():
            torch.testing.assert_close(encoder(**batch), embeddings[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(embeddings[register()], embeddings["sdpa"], atol=1e-6, rtol=0)
    for name, grad in gradients["sdpa"].items():
        torch.testing.assert_close(gradients[register()][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_packed_rows_give_the_padded_embeddings_and_gradients(tiny_model_dir, xlmr_tokenizer, pooling):
    """Padding-free rows (only the real tokens, one packed row) against the same model on padded rows, both with
    the training attention; dropout 0 (the tiny model), so only the order of float operations differs."""
    padded = DualEncoder(_backbone(tiny_model_dir, register()), xlmr_tokenizer)
    padded.settings.pooling = pooling
    packed = copy.deepcopy(padded)
    packed.pack_sequences = True
    packed.length_buckets = 2
    packed_calls = []
    embed_packed = packed._embed_packed
    packed._embed_packed = lambda *args: packed_calls.append(1) or embed_packed(*args)
    assert can_pack(packed.backbone.config) and not can_pack(_backbone(tiny_model_dir, "sdpa").config)
    causal = copy.deepcopy(packed.backbone.config)
    causal.is_decoder = True
    assert not can_pack(causal)  # a packed row has no causal mask
    batch = padded.tokenize(TEXTS + ["x"], "passage")
    assert batch["attention_mask"].float().mean() < 0.6  # mostly padding: packing has something to skip
    results = []
    for encoder in (padded, packed):
        encoder.train()
        embedding = encoder(**batch)
        embedding.pow(3).sum().backward()
        results.append((embedding.detach(), {n: p.grad for n, p in encoder.named_parameters()}))
    assert packed_calls == [1]  # the packed path ran
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_filler_brings_the_packed_row_to_a_multiple_without_longer_rows():
    from hbt_accel.models.dual_encoder import PACKED_TOKEN_MULTIPLE, filler_lengths

    for tokens, longest in [(5000, 96), (5120, 96), (129, 10), (1, 1), (4999, 200)]:
        fill = filler_lengths(tokens, longest)
        assert (tokens + sum(fill)) % PACKED_TOKEN_MULTIPLE == 0 and sum(fill) < PACKED_TOKEN_MULTIPLE
        assert all(0 < n <= longest for n in fill)
    assert filler_lengths(5120, 96) == [] and filler_lengths(5000, 96) == [96, 24]


def test_packed_layout_cuts_length_sorted_groups_out_of_the_packed_row():
    layout = PackedLayout.of(torch.tensor([3, 1, 2, 4]), groups=2)  # tokens 0-2, 3, 4-5, 6-9
    longest_two, shortest_two = layout.groups
    assert (longest_two.rows, longest_two.longest, shortest_two.rows, shortest_two.longest) == (2, 4, 2, 2)
    assert longest_two.tokens.tolist() == [6, 7, 8, 9, 0, 1, 2]  # sequences 3 then 0
    assert longest_two.padded_index.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert shortest_two.tokens.tolist() == [4, 5, 3]  # sequences 2 then 1
    assert shortest_two.padded_index.tolist() == [0, 1, 2]
    assert layout.grouped.tolist() == [6, 7, 8, 9, 0, 1, 2, 4, 5, 3]  # the groups' tokens, one group after the other
    assert layout.grouped[layout.order].tolist() == list(range(10))


@pytest.mark.parametrize("pack", [False, True])
def test_a_forward_without_gradients_draws_the_dropout_of_its_replay(tiny_model_dir, xlmr_tokenizer, pack):
    """GradCache encodes without gradients, then replays the forward with them from the same RNG state: with
    dropout on, both passes must drop the same positions (the no-grad pass must not go to sdpa's own dropout)."""
    backbone = BertModel.from_pretrained(
        tiny_model_dir, add_pooling_layer=False, attn_implementation=register(), attention_probs_dropout_prob=0.5
    )
    encoder = DualEncoder(backbone, xlmr_tokenizer)
    encoder.pack_sequences = pack
    encoder.train()
    batch = encoder.tokenize(TEXTS, "passage")
    state = torch.get_rng_state()
    with torch.no_grad():
        first = encoder(**batch)
    torch.set_rng_state(state)
    replay = encoder(**batch)
    torch.testing.assert_close(replay.detach(), first, atol=1e-6, rtol=0)
    assert not torch.allclose(encoder(**batch).detach(), first)  # a new draw differs: dropout is on


def test_sparse_embedding_gradient_equals_the_dense_one_step_after_step(tiny_encoder):
    """Queries and passages looked up separately (two sparse gradients summed), twice with the buffer reused: the
    gradient handed to the optimizer equals the dense lookup's."""
    dense = tiny_encoder
    dense.length_buckets = 2
    sparse = copy.deepcopy(dense)
    helper = SparseEmbeddingGradient(sparse.backbone.get_input_embeddings())
    for texts in (TEXTS, TEXTS[::-1] + ["another text"]):
        grads = []
        for model in (dense, sparse):
            model.zero_grad(set_to_none=True)
            queries, passages = model(**model.tokenize(texts, "query")), model(**model.tokenize(texts, "passage"))
            (queries @ passages.T).logsumexp(dim=1).sum().backward()
            grads.append(model.backbone.get_input_embeddings().weight.grad)
        assert grads[1].is_sparse and not grads[0].is_sparse
        helper.densify()
        densified = sparse.backbone.get_input_embeddings().weight.grad
        assert densified is helper.buffer
        torch.testing.assert_close(densified, grads[0], atol=1e-7, rtol=1e-6)


def assert_same_weights(a: dict, b: dict, tolerance: float, steps: int, learning_rate: float, share: float) -> None:
    """Equal within `tolerance` but for at most `share` of each tensor (at least one element), the elements whose
    gradient was ~0: Adam's first steps move a weight by ~learning_rate whatever its gradient's size, so rounding can
    flip a near-zero one (fp32: 1 of 8M seen, and 1 of a 1,024-element matrix)."""
    assert a.keys() == b.keys()
    for key in a:
        difference = (a[key] - b[key]).abs()
        assert (difference > tolerance).sum() <= max(1.0, share * difference.numel()), key
        assert difference.max() <= 2 * steps * learning_rate, key


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_recomputes_the_packed_fast_attention_layers_in_backward(tiny_model_dir, checkpointing):
    """The model a run builds on CPU (packed rows, the training attention) with `gradient_checkpointing`: each layer's
    forward runs again in backward, and only then."""
    from hbt_accel.config import parse_config
    from hbt_accel.training.run import build_model

    flags = ["--model_name_or_path", str(tiny_model_dir), "--gradient_checkpointing", str(checkpointing).lower()]
    model = build_model(parse_config(flags), on_cpu=True).train()
    assert model.pack_sequences
    feed_forward = next(module for name, module in model.named_modules() if name.endswith("layer.0.intermediate"))
    calls = []
    feed_forward.register_forward_hook(lambda *_: calls.append(1))  # inside the checkpointed part of the layer
    model(**model.tokenize(TEXTS, "passage")).sum().backward()
    assert len(calls) == (2 if checkpointing else 1)


@pytest.mark.parametrize("precision, steps", [("no", 3), ("bf16", 1)])  # bf16: rounding compounds over steps
def test_speed_paths_train_the_same_weights(tiny_model_dir, mlqa_slice, tmp_path, precision, steps):
    """A full fine-tuning run (word embeddings trained) with both CPU speed paths on gives the weights of runs with
    each off, and of one with gradient checkpointing, through the recipe's entry (dropout 0: the paths differ only in
    the order of float operations)."""
    common = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--max_steps", str(steps)]
    common += ["--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--mixed_precision", precision]
    common += ["--freeze_word_embeddings", "false"]
    runs = {
        "fast": [],
        "dense": ["--sparse_embedding_gradient", "false"],
        "sdpa": ["--cpu_training_attention", "false"],
        "checkpointed": ["--gradient_checkpointing", "true"],  # recomputes the packed, fast-attention forward
    }
    weights = {}
    for name, flags in runs.items():
        train_here(*common, *flags, "--output_dir", str(tmp_path / name))
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    word = "embeddings.word_embeddings.weight"
    assert not torch.allclose(weights["fast"][word], initial[word])  # the embeddings trained: the sparse path ran
    assert_same_weights(weights["fast"], weights["dense"], 1e-5, steps=steps, learning_rate=1e-3, share=1e-5)
    # bf16 autocast: sdpa and the math path round differently, and Adam turns that into ~learning_rate moves
    tolerance, share = (1e-5, 1e-5) if precision == "no" else (1e-3, 0.05)  # seen: 1 of a 32-vector flipped
    assert_same_weights(weights["fast"], weights["sdpa"], tolerance, steps=steps, learning_rate=1e-3, share=share)
    assert_same_weights(weights["fast"], weights["checkpointed"], 1e-5, steps=steps, learning_rate=1e-3, share=1e-5)
