"""Shared fixtures: the real XLM-R tokenizer and a tiny random BERT dual encoder built on it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from hbt_accel.models.bundled_e5 import reference_tokenizer_file

XLMR_TOKENIZER_FILE = reference_tokenizer_file()
# One folder, removed when the session ends, holds the converted corpora (not the user's Hugging Face cache) and the
# temp files of the processes the tests launch (torch's elastic agent leaves a torchelastic_* folder behind per
# multi-process launch). mkdtemp fixes this process's own temp folder before TMPDIR changes, so pytest's tmp_path and
# this process's temp files stay where they were.
SESSION_FOLDER = Path(tempfile.mkdtemp(prefix="hbt_test_session_"))
os.environ.setdefault("HBT_CORPUS_CACHE", str(SESSION_FOLDER / "corpus_cache"))
(SESSION_FOLDER / "tmp").mkdir()
os.environ["TMPDIR"] = str(SESSION_FOLDER / "tmp")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # runs trained in this process: no fork warning


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """After each test, clear what an Accelerator or `setup()` left: accelerate's process-wide settings refuse to
    change once set, and runs trained in this process (`tests/test_train.py::train_here`) would inherit another
    test's precision or device. accelerate's own test cases do the same."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import PartialState

        from hbt_accel.distributed import forget_accelerator_state

        forget_accelerator_state()
        PartialState._reset_state()  # the device too: the next test may run on another


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_FOLDER, ignore_errors=True)


def tiny_bert_config(vocab_size: int, dropout: float = 0.0):
    """A 2-layer, 32-wide BERT; dropout off by default so outputs are deterministic."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


@pytest.fixture(scope="session")
def xlmr_tokenizer():
    """The multilingual-e5-small (XLM-R sentencepiece) tokenizer, 250,002 ids, pads on the right."""
    from transformers import XLMRobertaTokenizerFast

    if not XLMR_TOKENIZER_FILE.is_file():
        pytest.skip(f"tokenizer file missing: {XLMR_TOKENIZER_FILE}")
    return XLMRobertaTokenizerFast(tokenizer_file=str(XLMR_TOKENIZER_FILE))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, xlmr_tokenizer) -> Path:
    """A saved Hugging Face folder (random tiny BERT, seed 0, dropout 0 + the XLM-R tokenizer)."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(len(xlmr_tokenizer))).save_pretrained(folder)
    xlmr_tokenizer.save_pretrained(folder)
    return folder


def load_tiny_encoder(model_dir, tokenizer):
    """`DualEncoder` on the saved tiny BERT without re-reading the tokenizer (a 250k-entry load takes seconds)."""
    from transformers import BertModel

    from hbt_accel.models.dual_encoder import DualEncoder

    # No pooler: DualEncoder.from_pretrained drops it too (unused parameters break DDP).
    return DualEncoder(BertModel.from_pretrained(model_dir, add_pooling_layer=False), tokenizer)


@pytest.fixture
def tiny_encoder(tiny_model_dir, xlmr_tokenizer):
    """A fresh `DualEncoder` (default settings: mean pooling, e5 prefixes) on the tiny BERT; same weights every
    time. The tokenizer object is the shared session one: do not mutate it."""
    return load_tiny_encoder(tiny_model_dir, xlmr_tokenizer)


@pytest.fixture(scope="session")
def mlqa_slice(tmp_path_factory) -> Path:
    """64 MLQA-R ids in en, de and es as JSONL (real text, read from ../shared at test time)."""
    from hbt_accel.data import lareqa_training_rows, load_lareqa_benchmark

    by_id: dict[str, list[dict]] = {}
    for row in lareqa_training_rows(load_lareqa_benchmark("mlqa-r", languages=["en", "de", "es"])):
        by_id.setdefault(row["id"], []).append(row)
    ids = [i for i, rows in by_id.items() if len(rows) == 3][:64]
    path = tmp_path_factory.mktemp("data") / "mlqa_slice.jsonl"
    with path.open("w") as handle:
        for example_id in ids:
            for row in sorted(by_id[example_id], key=lambda row: ["en", "de", "es"].index(row["lang"])):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo_world(rank: int, world_size: int, port: int) -> None:
    """The environment accelerate reads to make this spawned process rank `rank` of a CPU (gloo) group."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
    )
