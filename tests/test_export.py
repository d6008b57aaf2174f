"""A saved model folder loads three ways with the same vectors; LoRA adapter + merged model; the model card.

Three ways: `DualEncoder.from_pretrained(path)`, `SentenceTransformer(path)` with the stored prompts, and plain
`AutoModel` + pooling + L2 norm with the prefix typed by hand. Equal = row-wise cosine >= 0.99999.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml

from hbt_accel.config import HbtConfig
from hbt_accel.models.dual_encoder import DualEncoder, EncoderSettings, LoraSettings
from hbt_accel.models.st_format import write_sentence_transformers_files
from hbt_accel.publishing.model_card import CARD_MARKER, write_model_card
from hbt_accel.run_record import BatchArithmetic, TrainSummary

QUERIES = [
    "Who wrote Faust?",
    "Wer schrieb den Faust?",
    "¿Quién escribió Fausto?",
    "ファウストを書いたのは誰？",
    "من كتب فاوست؟",
]
PASSAGES = [
    "Johann Wolfgang von Goethe wrote Faust in two parts.",
    "Goethe schrieb den Faust.",
    "Берлин — столица Германии.",
]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def assert_same_vectors(a, b, what: str) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, what
    assert cosine_rows(a, b).min() >= 0.99999, f"{what}: min cosine {cosine_rows(a, b).min()}"


def save_with_st_files(encoder: DualEncoder, path) -> None:
    encoder.save_pretrained(path)
    write_sentence_transformers_files(path, encoder.settings)  # idempotent if save_pretrained already wrote them


def by_hand(path, queries: list[str], passages: list[str], settings: EncoderSettings) -> tuple[np.ndarray, np.ndarray]:
    """AutoModel + pooling + L2 norm, the prefixes typed by hand: what a user without this package would do."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()  # loaded once
    return (
        encode_by_hand(tokenizer, model, settings, queries, settings.query_prefix, settings.query_max_length),
        encode_by_hand(tokenizer, model, settings, passages, settings.passage_prefix, settings.passage_max_length),
    )


def encode_by_hand(tokenizer, model, settings: EncoderSettings, texts: list[str], prefix: str, max_length: int):
    batch = tokenizer(
        [prefix + t for t in texts], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    if settings.pooling == "mean":
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    elif settings.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        raise ValueError(settings.pooling)
    if settings.normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy()


def sentence_transformer(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def check_three_ways(path, reference_queries: np.ndarray, reference_passages: np.ndarray, settings: EncoderSettings):
    """The saved folder encodes like the reference through DualEncoder, SentenceTransformer and AutoModel by hand;
    returns the first two loaded models for further checks."""
    loaded = DualEncoder.from_pretrained(path)
    assert loaded.settings == settings
    assert_same_vectors(loaded.encode(QUERIES, "query"), reference_queries, "DualEncoder.from_pretrained, queries")
    assert_same_vectors(
        loaded.encode(PASSAGES, "passage"), reference_passages, "DualEncoder.from_pretrained, passages"
    )

    st = sentence_transformer(path)
    assert_same_vectors(st.encode(QUERIES, prompt_name="query"), reference_queries, "SentenceTransformer query")
    assert_same_vectors(st.encode(PASSAGES, prompt_name="passage"), reference_passages, "SentenceTransformer passage")
    if hasattr(st, "encode_query"):
        assert_same_vectors(st.encode_query(QUERIES), reference_queries, "SentenceTransformer.encode_query")
        assert_same_vectors(st.encode_document(PASSAGES), reference_passages, "SentenceTransformer.encode_document")
    if settings.normalize:  # the Normalize module is there: unit vectors, not merely parallel ones
        np.testing.assert_allclose(np.linalg.norm(st.encode(QUERIES, prompt_name="query"), axis=1), 1.0, atol=1e-5)

    manual_q, manual_p = by_hand(path, QUERIES, PASSAGES, settings)
    assert_same_vectors(manual_q, reference_queries, "AutoModel by hand, queries")
    assert_same_vectors(manual_p, reference_passages, "AutoModel by hand, passages")
    return loaded, st


# ---------------------------------------------------------------------------------------------------------------------
# sentence-transformers files
# ---------------------------------------------------------------------------------------------------------------------
def test_sentence_transformers_files_content(tiny_encoder, tmp_path):
    save_with_st_files(tiny_encoder, tmp_path / "model")
    folder = tmp_path / "model"
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 32
    assert [k for k, v in pooling.items() if k.startswith("pooling_mode") and v] == ["pooling_mode_mean_tokens"]
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"]["query"] == "query: " and st_config["prompts"]["passage"] == "passage: "
    assert st_config["default_prompt_name"] is None and st_config["similarity_fn_name"] == "cosine"
    assert json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    assert not list(folder.rglob("*.tmp")), "atomic writes leave no temporary files"


@pytest.mark.parametrize(
    "settings",
    [
        EncoderSettings(),
        EncoderSettings(pooling="cls", normalize=False, query_prefix="Q> ", passage_prefix="", passage_max_length=96),
    ],
    ids=["mean-normalized-e5-prefixes", "cls-unnormalized-custom-prefixes"],
)
def test_saved_folder_loads_three_ways_with_equal_embeddings(tiny_model_dir, tmp_path, settings):
    encoder = DualEncoder.from_pretrained(tiny_model_dir, settings=settings)
    reference_q, reference_p = encoder.encode(QUERIES, "query"), encoder.encode(PASSAGES, "passage")
    save_with_st_files(encoder, tmp_path / "model")
    modules = json.loads((tmp_path / "model" / "modules.json").read_text())
    assert len(modules) == (3 if settings.normalize else 2)
    check_three_ways(tmp_path / "model", reference_q, reference_p, settings)
    if not settings.normalize:  # without normalisation the vectors must match in length too
        np.testing.assert_allclose(
            sentence_transformer(tmp_path / "model").encode(QUERIES, prompt_name="query"),
            reference_q,
            rtol=1e-4,
            atol=1e-5,
        )


def test_lora_adapter_and_merged_model(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    encoder = DualEncoder.from_pretrained(tiny_model_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero (adapter = identity); make it matter
        for name, parameter in encoder.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    base_q = DualEncoder.from_pretrained(tiny_model_dir).encode(QUERIES, "query")
    reference_q, reference_p = encoder.encode(QUERIES, "query"), encoder.encode(PASSAGES, "passage")
    assert cosine_rows(base_q, reference_q).min() < 0.999, "the adapter should change the embeddings"

    folder = tmp_path / "model"
    save_with_st_files(encoder, folder)
    assert (folder / "adapter" / "adapter_config.json").is_file()
    # the merged model at the root, three ways
    check_three_ways(folder, reference_q, reference_p, encoder.settings)
    # the adapter on the base model, with peft
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model_dir), folder / "adapter").eval()
    with_adapter = DualEncoder(peft_model, encoder.tokenizer, encoder.settings)
    assert_same_vectors(with_adapter.encode(QUERIES, "query"), reference_q, "peft adapter on the base model")


def test_a_model_cut_to_two_layers_saves_and_loads_three_ways_with_two_layers(
    tiny_model_dir, xlmr_tokenizer, tmp_path
):
    """num_layers: the saved folder IS the 2-layer model (config and weights), for every loader, same vectors."""
    from safetensors import safe_open
    from transformers import AutoModel, BertModel

    from tests.conftest import tiny_bert_config

    source = tmp_path / "four_layers"
    shutil.copytree(tiny_model_dir, source)  # the tokenizer files
    config = tiny_bert_config(len(xlmr_tokenizer))
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(source)

    encoder = DualEncoder.from_pretrained(source, num_layers=2)
    reference_q, reference_p = encoder.encode(QUERIES, "query"), encoder.encode(PASSAGES, "passage")
    folder = tmp_path / "model"
    encoder.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
    with safe_open(folder / "model.safetensors", "pt") as weights:
        layers = {int(key.split(".")[2]) for key in weights.keys() if key.startswith("encoder.layer.")}
    assert layers == {0, 1}
    assert len(AutoModel.from_pretrained(folder).encoder.layer) == 2
    loaded, st = check_three_ways(folder, reference_q, reference_p, encoder.settings)
    assert st[0].auto_model.config.num_hidden_layers == 2
    assert loaded.parameter_counts() == encoder.parameter_counts()


@pytest.mark.slow
def test_embedded_model_loads_three_ways(tmp_path):
    encoder = DualEncoder.from_pretrained("embedded")
    reference_q, reference_p = encoder.encode(QUERIES, "query"), encoder.encode(PASSAGES, "passage")
    save_with_st_files(encoder, tmp_path / "e5")
    check_three_ways(tmp_path / "e5", reference_q, reference_p, encoder.settings)
    # a multilingual retriever: the German and the English passage about Faust beat the Russian one for each query
    scores = reference_q @ reference_p.T  # (5, 3)
    assert (scores[:, :2].min(axis=1) > scores[:, 2]).all()


# ---------------------------------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------------------------------
LANGS = ["de", "en", "th"]
GRID = {f"{q}-{p}": round(0.5 + 0.1 * i + 0.01 * j, 4) for i, q in enumerate(LANGS) for j, p in enumerate(LANGS)}
RESULTS = {
    "benchmark": "xquad-r",
    "languages": LANGS,
    "mono_map": 0.612,
    "cross_map": 0.587,
    "multi_map": 0.455,
    "rank_distance": 123.4,
    "recall_at_1": 0.5,
    "recall_at_10": 0.8,
    "grid": GRID,
    "multi_map_per_language": {"de": 0.4, "en": 0.5, "th": 0.465},
    "rank_distance_per_language": {"de": 100.0, "en": 120.0, "th": 150.2},
    "n_queries": 30,
    "seconds": 12.5,
}


def run_summary(cfg: HbtConfig) -> TrainSummary:
    """A finished 2-process run of `cfg`: 40 steps in 3725 s."""
    batch = BatchArithmetic.of(cfg, world_size=2)
    return TrainSummary(cfg, batch, steps=40, train_seconds=3725.0, batch_counts={"X-X": 21, "X-Y": 19})


def split_card(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.S)
    assert match, "README.md must start with YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


def test_model_card_front_matter_and_grid(tmp_path):
    cfg = HbtConfig(hub_model_id="alice/hbt-e5-small", per_device_train_batch_size=32, num_hard_negatives=1)
    path = write_model_card(tmp_path, run_summary(cfg), RESULTS)
    metadata, body = split_card(path.read_text())
    assert metadata["library_name"] == "sentence-transformers"
    assert {"sentence-similarity", "feature-extraction", "hybrid-batch-training"} <= set(metadata["tags"])
    assert metadata["base_model"] == "intfloat/multilingual-e5-small"
    assert metadata["language"] == LANGS and metadata["license"] == "cc-by-nc-4.0"
    (entry,) = metadata["model-index"]
    assert entry["name"] == "alice/hbt-e5-small"
    (result,) = entry["results"]
    assert result["dataset"]["name"] == "XQuAD-R"
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert values["monolingual mAP"] == 0.612 and values["cross-lingual mAP"] == 0.587
    assert values["multilingual mAP"] == 0.455 and values["rank distance (language bias, lower is better)"] == 123.4

    assert CARD_MARKER in body
    # the full grid: one row per query language, every cell printed with 3 decimals
    for q in LANGS:
        row = next(line for line in body.splitlines() if line.startswith(f"| **{q}** |"))
        assert row == f"| **{q}** | " + " | ".join(f"{GRID[f'{q}-{p}']:.3f}" for p in LANGS) + " |"
    # batch arithmetic: 64 queries, 64 * 2 - 1 = 127 negatives per query (63 in-batch + 64 hard)
    assert "global batch 64 queries = 32 per device x 2 process(es)" in body
    assert "negatives per query 127 (63 in-batch + 64 hard" in body
    assert "1:02:05 (h:mm:ss)" in body  # 3725 s

    assert "arXiv 2408.10536" in body and "2004.05484" in body
    assert "CC BY-NC 4.0" in body and "CC BY-SA 4.0" in body
    assert 'prompt_name="query"' in body
    limitations = body.split("## Limitations")[1].split("## Usage")[0]
    assert "lie 123.4 ranks apart on average" in limitations  # this run's rank distance
    assert "Zero-shot languages" not in limitations  # this summary records no training languages: nothing claimed


def test_model_card_limitations_name_the_languages_never_trained_on(tmp_path):
    cfg = HbtConfig(train_languages=["de", "en"])
    body = split_card(write_model_card(tmp_path, run_summary(cfg), RESULTS).read_text())[1]
    assert "- **Zero-shot languages.** Evaluated but never trained on: th." in body
    assert "(MLQA-R; de, en)." in body
    # MMTEB's MLQARetrieval validation split is MLQA dev = the training data: the card must say so
    assert (
        "**Overlap with public benchmarks.**" in body and "`MLQARetrieval` (its validation split is MLQA dev" in body
    )


def test_overlapping_benchmarks_are_named_per_training_source():
    from hbt_accel.publishing.model_card import overlapping_benchmarks

    assert [line.split(":")[0] for line in overlapping_benchmarks(["mlqa-r:train", "mmarco:/d?languages=en"])] == [
        "mlqa-r",
        "mmarco",
    ]
    assert overlapping_benchmarks(["/data/rows.jsonl"]) == []


def test_a_model_trained_on_a_split_keeps_its_data_licence(tmp_path):
    cfg = HbtConfig(train_data=["mlqa-r:train"], eval_benchmark="mlqa-r:validation")
    results = {**RESULTS, "benchmark": "mlqa-r:validation"}
    metadata, body = split_card(write_model_card(tmp_path, run_summary(cfg), results).read_text())
    assert metadata["license"] == "cc-by-nc-4.0"  # the split is part of the non-commercial MLQA-R files
    assert "- Training data MLQA-R: CC BY-NC 4.0 (non-commercial)." in body
    assert metadata["model-index"][0]["results"][0]["dataset"]["name"] == "MLQA-R (validation split)"


def test_model_card_names_the_language_bias_options_only_when_on(tmp_path):
    default_body = split_card(write_model_card(tmp_path / "a", run_summary(HbtConfig()), RESULTS).read_text())[1]
    assert "| loss | InfoNCE, temperature 0.05 |" in default_body and "mining" not in default_body
    cfg = HbtConfig(
        sampling="multilingual",
        multi_positive=True,
        passage_alignment_weight=0.3,
        hard_negative_mining=True,
        num_hard_negatives=4,
    ).validate()
    body = split_card(write_model_card(tmp_path / "b", run_summary(cfg), RESULTS).read_text())[1]
    assert (
        "InfoNCE, temperature 0.05, multi-positive (the query's answer in every language of the batch), + 0.3 x"
        in body
    )
    assert (
        "| hard-negative mining | 4 per query, mined once, at the start; 50% in the query's language, margin 0.95 |"
        in body
    )
    assert "**multilingual** (multilingual: every row is a query with its answer" in body


def test_model_card_is_parsed_by_huggingface_hub(tmp_path):
    from huggingface_hub import ModelCard

    path = write_model_card(tmp_path, run_summary(HbtConfig(hub_model_id="alice/m")), RESULTS)
    card = ModelCard.load(path)
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["multilingual mAP"] == 0.455
    assert {r.dataset_name for r in card.data.eval_results} == {"XQuAD-R"}


def test_model_card_without_results_and_foreign_readme(tmp_path):
    path = write_model_card(tmp_path, run_summary(HbtConfig()), None)
    metadata, body = split_card(path.read_text())
    assert "model-index" not in metadata
    assert "Evaluation was not run" in body
    # ours is replaced ...
    write_model_card(tmp_path, run_summary(HbtConfig()), RESULTS)
    assert "model-index" in split_card(path.read_text())[0]
    # ... a README someone else wrote is not
    path.write_text("# my own notes\n")
    with pytest.warns(UserWarning, match="not written by hbt-accel"):
        assert write_model_card(tmp_path, run_summary(HbtConfig()), RESULTS) is None
    assert path.read_text() == "# my own notes\n"
