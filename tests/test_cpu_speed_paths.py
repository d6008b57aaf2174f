"""The CPU speed paths keep the numerics: the training attention with its cheaper dropout, and the sparse
word-embedding gradient (hbt_accel/cpu_attention.py, hbt_accel/sparse_embedding.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel

from hbt_accel.cpu_attention import cheap_dropout, cpu_training_attention, register
from hbt_accel.modeling import DualEncoder
from hbt_accel.sparse_embedding import SparseEmbeddingGradient
from tests.test_train import train

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
    torch.manual_seed(3)
    first = cheap_dropout(values, 0.3)
    torch.manual_seed(3)
    assert torch.equal(first, cheap_dropout(values, 0.3))  # the global generator: seeds and replays hold


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
    _, dropped = cpu_training_attention(module, query, key, value, None, dropout=0.5)
    assert 0.3 < (dropped == 0).float().mean().item() < 0.7
    module.eval()
    _, kept = cpu_training_attention(module, query, key, value, None, dropout=0.5)
    assert (kept == 0).sum() == 0


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
    """Equal within `tolerance` but for at most `share` of each tensor, the elements whose gradient was ~0: Adam's
    first steps move a weight by ~learning_rate whatever its gradient's size, so rounding can flip a near-zero one
    (fp32: 1 of 8M seen)."""
    assert a.keys() == b.keys()
    for key in a:
        difference = (a[key] - b[key]).abs()
        assert (difference > tolerance).float().mean() <= share, key
        assert difference.max() <= 2 * steps * learning_rate, key


@pytest.mark.parametrize("precision, steps", [("no", 3), ("bf16", 1)])  # bf16: rounding compounds over steps
def test_speed_paths_train_the_same_weights(tiny_model_dir, mlqa_slice, tmp_path, precision, steps):
    """A full fine-tuning run (word embeddings trained) with both CPU speed paths on gives the weights of runs with
    each off, through the training script (dropout 0: the paths differ only in the order of float operations)."""
    common = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(mlqa_slice), "--max_steps", str(steps)]
    common += ["--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--mixed_precision", precision]
    common += ["--freeze_word_embeddings", "false"]
    runs = {
        "fast": [],
        "dense": ["--sparse_embedding_gradient", "false"],
        "sdpa": ["--cpu_training_attention", "false"],
    }
    weights = {}
    for name, flags in runs.items():
        train(*common, *flags, "--output_dir", str(tmp_path / name))
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    word = "embeddings.word_embeddings.weight"
    assert not torch.allclose(weights["fast"][word], initial[word])  # the embeddings trained: the sparse path ran
    assert_same_weights(weights["fast"], weights["dense"], 1e-5, steps=steps, learning_rate=1e-3, share=1e-5)
    # bf16 autocast: sdpa and the math path round differently, and Adam turns that into ~learning_rate moves
    tolerance, share = (1e-5, 1e-5) if precision == "no" else (1e-3, 0.05)  # seen: 1 of a 32-vector flipped
    assert_same_weights(weights["fast"], weights["sdpa"], tolerance, steps=steps, learning_rate=1e-3, share=share)
