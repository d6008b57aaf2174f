"""DualEncoder: pooling by hand, a decoder with last-token pooling, LoRA save/reload/merge, encode order, settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hbt_accel.models.dual_encoder import SETTINGS_FILE, DualEncoder, EncoderSettings, LoraSettings, pool


@pytest.fixture
def cached_tokenizer_load(monkeypatch, xlmr_tokenizer):
    """Make AutoTokenizer.from_pretrained return the session XLM-R tokenizer: a real load of its 250k entries
    takes seconds, and these tests are about weights and settings (test_lora_* loads a tokenizer for real)."""
    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: xlmr_tokenizer)


TEXTS = [
    "short",
    "a considerably longer sentence about the Eiffel Tower in Paris",
    "mittellanger deutscher Satz",
    "日本語の文",
    "¿Dónde está la biblioteca?",
]


# ---------------------------------------------------------------- pooling by hand
HIDDEN = torch.tensor(
    [
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
        [[7.0, 8.0], [9.0, 10.0], [11.0, 12.0]],
    ]
)  # (2, 3, 2)


def test_mean_and_cls_pooling_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(HIDDEN, mask, "mean"), torch.tensor([[2.0, 3.0], [9.0, 10.0]]))
    torch.testing.assert_close(pool(HIDDEN, mask, "cls"), torch.tensor([[1.0, 2.0], [7.0, 8.0]]))


def test_last_pooling_right_and_left_padding_by_hand():
    right = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(pool(HIDDEN, right, "last"), torch.tensor([[3.0, 4.0], [7.0, 8.0]]))
    left = torch.tensor([[0, 1, 1], [0, 0, 1]])
    torch.testing.assert_close(pool(HIDDEN, left, "last"), torch.tensor([[5.0, 6.0], [11.0, 12.0]]))
    full = torch.tensor([[1, 1, 1], [0, 1, 1]])
    torch.testing.assert_close(pool(HIDDEN, full, "last"), torch.tensor([[5.0, 6.0], [11.0, 12.0]]))


def test_tokenize_prefix_truncation_and_padding(tiny_encoder, xlmr_tokenizer):
    tiny_encoder.settings = EncoderSettings(query_max_length=6, passage_prefix="passage: ")
    batch = tiny_encoder.tokenize(TEXTS[:2], "query")
    assert set(batch.keys()) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (2, 6)  # the long query was cut to 6 tokens (the short one is padded)
    expected = xlmr_tokenizer("query: short")["input_ids"]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    passages = tiny_encoder.tokenize(["x"], "passage")
    assert passages["input_ids"][0].tolist() == xlmr_tokenizer("passage: x")["input_ids"]
    with pytest.raises(ValueError):
        tiny_encoder.tokenize(["x"], "document")


# ---------------------------------------------------------------- decoder LLM with last-token pooling
def _qwen_like_tokenizer():
    """The XLM-R vocabulary behaving like a decoder LLM's tokenizer: no pad token, no EOS appended, left padding."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import XLMR_TOKENIZER_FILE

    raw = Tokenizer.from_file(str(XLMR_TOKENIZER_FILE))
    raw.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")  # no special tokens added
    raw.no_padding()
    raw.no_truncation()
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", padding_side="left")


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    """Tiny random Qwen2 (decoder) weights."""
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(
        vocab_size=_qwen_like_tokenizer().vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    folder = tmp_path_factory.mktemp("tiny_qwen")
    torch.manual_seed(0)
    Qwen2Model(config).save_pretrained(folder)
    return folder


def test_decoder_last_token_pooling(tiny_qwen_dir, monkeypatch):
    from transformers import AutoTokenizer

    # transformers 5 would swap a saved generic tokenizer for the model type's own class (Qwen2Tokenizer, which
    # needs Qwen's vocabulary); hand the Qwen-like one to from_pretrained instead.
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: _qwen_like_tokenizer())
    settings = EncoderSettings(pooling="last", query_prefix="Query: ", query_max_length=8)
    encoder = DualEncoder.from_pretrained(tiny_qwen_dir, settings=settings)
    assert encoder.backbone.config.use_cache is False
    tokenizer = encoder.tokenizer
    assert tokenizer.pad_token == "</s>"  # was missing: set to EOS
    assert encoder.append_eos

    batch = encoder.tokenize(["hi", TEXTS[1]], "query")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 8)  # truncated to 8 tokens INCLUDING the appended EOS
    assert ids[:, -1].tolist() == [tokenizer.eos_token_id] * 2  # left padding: EOS is the last column
    assert mask[0, 0].item() == 0 and mask[1].all()
    assert ids[0, mask[0].bool()].tolist() == tokenizer("Query: hi")["input_ids"] + [tokenizer.eos_token_id]

    vectors = encoder.encode(TEXTS, "query")
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = vectors @ vectors.T
    assert cosines[~np.eye(len(TEXTS), dtype=bool)].max() < 0.999  # different texts, different vectors

    # The pooled vector is the hidden state at the EOS position, computed by hand.
    with torch.no_grad():
        hidden = encoder.backbone(**batch).last_hidden_state  # (2, 8, 32)
        expected = torch.nn.functional.normalize(hidden[:, -1], dim=-1)
        torch.testing.assert_close(encoder(**batch), expected)


# ---------------------------------------------------------------- LoRA
def _randomise_lora_b(encoder):
    """peft initialises lora_B to zero (a no-op adapter); give it weights so the checks below can fail."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


def test_lora_trainable_params_save_reload_and_merge(tiny_model_dir, tiny_encoder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    base_vectors = tiny_encoder.encode(TEXTS, "passage")
    encoder = DualEncoder.from_pretrained(tiny_model_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any(".query." in name for name in trainable) and any(".value." in name for name in trainable)
    _randomise_lora_b(encoder)
    vectors = encoder.encode(TEXTS, "passage")
    assert np.abs(vectors - base_vectors).max() > 1e-2  # the adapter changes the embeddings

    out = tmp_path / "checkpoint"
    encoder.save_pretrained(out)
    assert encoder.is_peft and any(p.requires_grad for p in encoder.parameters())  # training can continue
    np.testing.assert_allclose(encoder.encode(TEXTS, "passage"), vectors, atol=1e-6)

    # adapter folder on the original base, through peft
    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model_dir), out / "adapter")
    np.testing.assert_allclose(DualEncoder(reloaded, encoder.tokenizer).encode(TEXTS, "passage"), vectors, atol=1e-5)
    # merged full model with plain AutoModel
    merged = AutoModel.from_pretrained(out)
    np.testing.assert_allclose(DualEncoder(merged, encoder.tokenizer).encode(TEXTS, "passage"), vectors, atol=1e-5)

    # the ZeRO-3 path (gathered state dict, merge rebuilt from config) writes the same model
    out3 = tmp_path / "from_state_dict"
    encoder.save_pretrained(out3, state_dict=encoder.state_dict())
    from_state_dict = DualEncoder(AutoModel.from_pretrained(out3), encoder.tokenizer)
    np.testing.assert_allclose(from_state_dict.encode(TEXTS, "passage"), vectors, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(tiny_model_dir, cached_tokenizer_load):
    grads = []
    for checkpointing in (False, True):
        encoder = DualEncoder.from_pretrained(tiny_model_dir, gradient_checkpointing=checkpointing)
        assert encoder.backbone.is_activation_checkpointing == checkpointing
        encoder.train()
        encoder(**encoder.tokenize(TEXTS, "passage")).pow(3).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- encode and save/load
def test_encode_restores_original_order(tiny_encoder):
    tiny_encoder.train()
    batched = tiny_encoder.encode(TEXTS, "query", batch_size=2)
    assert tiny_encoder.training  # mode restored after encoding
    one_by_one = np.concatenate([tiny_encoder.encode([text], "query") for text in TEXTS])
    assert batched.dtype == np.float32 and batched.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3
    bf16 = tiny_encoder.encode(TEXTS, "query", batch_size=2, bf16=True)
    assert bf16.dtype == np.float32
    assert np.min(np.sum(bf16 * batched, axis=1)) > 0.99  # bf16 autocast: close, not equal


def test_save_load_roundtrip_restores_settings(tiny_model_dir, tmp_path, cached_tokenizer_load):
    settings = EncoderSettings(
        pooling="cls", normalize=False, query_prefix="Q: ", passage_prefix="", query_max_length=16
    )
    encoder = DualEncoder.from_pretrained(tiny_model_dir, settings=settings)
    vectors = encoder.encode(TEXTS, "query")
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("user file")
    encoder.save_pretrained(out)
    encoder.save_pretrained(out)  # overwriting an existing save works

    assert (out / "notes.txt").read_text() == "user file"  # only our files are replaced
    assert json.loads((out / SETTINGS_FILE).read_text())["query_prefix"] == "Q: "
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    loaded = DualEncoder.from_pretrained(out)
    assert loaded.settings == settings
    np.testing.assert_allclose(loaded.encode(TEXTS, "query"), vectors, atol=1e-5)
    # explicit settings win over the saved ones
    assert DualEncoder.from_pretrained(out, settings=EncoderSettings()).settings == EncoderSettings()


def test_settings_validation(tmp_path):
    with pytest.raises(ValueError):
        EncoderSettings(pooling="max")
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"pooling": "mean", "typo_field": 1}))
    with pytest.raises(ValueError, match="typo_field"):
        EncoderSettings.from_json(tmp_path / SETTINGS_FILE)


@pytest.mark.parametrize("architecture", ["bert", "xlm-roberta"])
def test_length_buckets_give_the_same_embeddings_and_gradients(architecture, tiny_encoder, xlmr_tokenizer):
    """Running a batch in length-sorted groups (less padding, one shared word-embedding lookup) must not change
    embeddings or gradients. XLM-R is checked too: it derives position ids from input_ids, BERT from positions."""
    if architecture == "xlm-roberta":
        from transformers import XLMRobertaConfig, XLMRobertaModel

        from tests.conftest import tiny_bert_config

        config = XLMRobertaConfig(**tiny_bert_config(len(xlmr_tokenizer)).to_dict())
        config.pad_token_id, config.max_position_embeddings = xlmr_tokenizer.pad_token_id, 258
        torch.manual_seed(0)
        tiny_encoder = DualEncoder(XLMRobertaModel(config, add_pooling_layer=False), xlmr_tokenizer)
    texts = ["a", "a much longer sentence with many more tokens in it than the first one", "medium length", "x y z"]
    batch = tiny_encoder.tokenize(texts, "passage")
    results = []
    for buckets in (1, 3):
        tiny_encoder.length_buckets = buckets
        tiny_encoder.zero_grad()
        embeddings = tiny_encoder(**batch)
        (embeddings * torch.arange(embeddings.numel()).reshape(embeddings.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in tiny_encoder.named_parameters() if p.grad is not None}
        results.append((embeddings.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_encode_reports_progress_per_batch_and_keeps_the_input_order(tiny_encoder):
    texts = ["a b c d e f g h", "short", "Wer schrieb den Faust?", "ファウストを書いたのは誰？", "x"]
    calls = []
    with_progress = tiny_encoder.encode(
        texts, "passage", batch_size=2, progress=lambda done, total: calls.append(done)
    )
    assert calls == [2, 4, 5]
    one_by_one = np.stack([tiny_encoder.encode([text], "passage")[0] for text in texts])
    np.testing.assert_allclose(with_progress, one_by_one, atol=1e-5)
    assert (
        tiny_encoder.token_lengths(texts, "passage")
        == tiny_encoder.tokenize(texts, "passage")["attention_mask"].sum(dim=1).tolist()
    )


def test_a_saved_model_reads_like_any_other_folder(tiny_encoder, tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        tiny_encoder.save_pretrained(tmp_path / "saved")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "saved").stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE((tmp_path / "saved" / "hbt_encoder.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "saved" / "modules.json").stat().st_mode) == 0o644


# ---------------------------------------------------------------- depth: the first N layers
TINY_LAYER_PARAMETERS = (
    4 * (32 * 32 + 32)  # query, key, value, attention output
    + 2 * 32  # attention LayerNorm
    + (32 * 64 + 64)  # intermediate
    + (64 * 32 + 32)  # output
    + 2 * 32  # output LayerNorm
)  # = 8,544 for hidden 32, intermediate 64


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, xlmr_tokenizer):
    """A tiny random BERT (as conftest's) with 4 layers."""
    from transformers import BertModel

    from tests.conftest import tiny_bert_config

    folder = tmp_path_factory.mktemp("tiny_bert_4")
    config = tiny_bert_config(len(xlmr_tokenizer))
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def test_num_layers_keeps_the_first_layers_and_their_parameters(four_layer_dir, xlmr_tokenizer, cached_tokenizer_load):
    full = DualEncoder.from_pretrained(four_layer_dir)
    cut = DualEncoder.from_pretrained(four_layer_dir, num_layers=2)
    assert cut.backbone.config.num_hidden_layers == 2 and len(cut.backbone.encoder.layer) == 2
    # the kept layers and the embeddings are the original weights
    for index in range(2):
        for name, weight in full.backbone.encoder.layer[index].state_dict().items():
            torch.testing.assert_close(cut.backbone.encoder.layer[index].state_dict()[name], weight, rtol=0, atol=0)
    torch.testing.assert_close(
        cut.backbone.embeddings.word_embeddings.weight, full.backbone.embeddings.word_embeddings.weight
    )
    # counts: exactly two layers fewer; the word embeddings are the vocabulary x 32 matrix
    assert sum(p.numel() for p in full.backbone.encoder.layer[3].parameters()) == TINY_LAYER_PARAMETERS
    full_counts, cut_counts = full.parameter_counts(), cut.parameter_counts()
    assert full_counts["total"] - cut_counts["total"] == 2 * TINY_LAYER_PARAMETERS
    assert cut_counts["word_embeddings"] == full_counts["word_embeddings"] == len(xlmr_tokenizer) * 32
    assert cut_counts["without_word_embeddings"] == cut_counts["total"] - len(xlmr_tokenizer) * 32
    assert (cut_counts["layers"], full_counts["layers"]) == (2, 4) and cut_counts["trainable"] == cut_counts["total"]
    cut.backbone.get_input_embeddings().weight.requires_grad_(False)
    assert cut.parameter_counts()["trainable"] == cut_counts["without_word_embeddings"]
    # the cut model's embedding is the full model's hidden state after its second layer, pooled and normalised
    batch = full.tokenize(TEXTS, "query")
    with torch.no_grad():
        after_two = full.backbone(**batch, output_hidden_states=True).hidden_states[2]  # (N, L, 32)
        expected = torch.nn.functional.normalize(pool(after_two, batch["attention_mask"], "mean"), dim=-1)
        torch.testing.assert_close(cut(**batch), expected)
        assert not torch.allclose(full(**batch), expected, atol=1e-3)  # 4 layers give other vectors


@pytest.mark.parametrize(
    "num_layers, message",
    [(5, "num_layers: got 5, expected 0 (all) or 1 to 4"), (-1, "num_layers: got -1, expected 0 (all) or 1 to 4")],
)
def test_num_layers_beyond_the_model_fails_in_one_line_before_reading_weights(
    four_layer_dir, monkeypatch, num_layers, message
):
    from transformers import AutoModel

    from hbt_accel.errors import ConfigError
    from hbt_accel.models.dual_encoder import check_num_layers

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the layer count was checked")

    monkeypatch.setattr(AutoModel, "from_pretrained", no_weights)
    loaders = [DualEncoder.from_pretrained, check_num_layers]  # the model loader, and train's check at start-up
    for load in loaders:
        with pytest.raises(ConfigError) as error:
            load(four_layer_dir, num_layers=num_layers)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_num_layers_on_a_decoder_trims_its_per_layer_config_and_reloads(tiny_qwen_dir, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: _qwen_like_tokenizer())
    settings = EncoderSettings(pooling="last", query_prefix="Query: ", query_max_length=8)
    cut = DualEncoder.from_pretrained(tiny_qwen_dir, settings=settings, num_layers=1)
    assert len(cut.backbone.layers) == 1 and cut.backbone.config.num_hidden_layers == 1
    if getattr(cut.backbone.config, "layer_types", None) is not None:
        assert len(cut.backbone.config.layer_types) == 1
    vectors = cut.encode(TEXTS, "query")
    cut.save_pretrained(tmp_path / "model")
    assert AutoConfig.from_pretrained(tmp_path / "model").num_hidden_layers == 1
    assert len(AutoModel.from_pretrained(tmp_path / "model").layers) == 1
    np.testing.assert_allclose(
        DualEncoder.from_pretrained(tmp_path / "model").encode(TEXTS, "query"), vectors, atol=1e-5
    )
