"""The sentence-transformers side of a saved model folder, so `SentenceTransformer(folder)` loads what we trained.

`write_sentence_transformers_files(folder, settings)`: modules.json (Transformer -> Pooling -> Normalize),
sentence_bert_config.json, 1_Pooling/config.json, 2_Normalize/ and config_sentence_transformers.json with the
query/passage prompts, so `SentenceTransformer(folder).encode(texts, prompt_name="query")` gives the same vectors as
`DualEncoder.from_pretrained(folder).encode(texts, "query")`. `DualEncoder.save_pretrained` calls it.
"""

from __future__ import annotations

import os
from pathlib import Path

from hbt_accel.atomic import write_json
from hbt_accel.models.settings import EncoderSettings

# Old-style class paths: understood by every sentence-transformers release from 2.x to 6.x (6.x maps them itself).
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
# EncoderSettings.pooling -> the one `pooling_mode_*` flag sentence-transformers' Pooling switches on.
ST_POOLING_FLAGS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last": "pooling_mode_lasttoken",
}
_ALL_POOLING_FLAGS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


def _embedding_dim(folder: Path) -> int:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; save the backbone before the sentence-transformers files")
    config = AutoConfig.from_pretrained(folder)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.hidden_size)


def write_sentence_transformers_files(output_dir: str | os.PathLike, settings: EncoderSettings) -> None:
    """Make the saved Hugging Face folder `output_dir` loadable by `SentenceTransformer(output_dir)` as well.

    Writes modules.json (Transformer at the root, 1_Pooling, 2_Normalize when settings.normalize),
    sentence_bert_config.json (max_seq_length = settings.passage_max_length), 1_Pooling/config.json (mean / cls /
    lasttoken from settings.pooling, prompt tokens included in the pool as DualEncoder does),
    config_sentence_transformers.json: prompts {"query": query_prefix, "passage": passage_prefix, "document":
    passage_prefix} (sentence-transformers' `encode_document` looks for "document" first), no default prompt,
    cosine similarity.

    Equal embeddings need the same prefix and truncation: texts within max_seq_length tokens (prefix included) encode
    identically; sentence-transformers truncates queries at max_seq_length, DualEncoder at query_max_length. With
    pooling "last" DualEncoder appends EOS when the tokenizer does not; sentence-transformers does not.
    """
    folder = Path(output_dir)
    dim = _embedding_dim(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING},
    ]
    if settings.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_NORMALIZE})
    pooling = {"word_embedding_dimension": dim}
    pooling.update({flag: flag == ST_POOLING_FLAGS[settings.pooling] for flag in _ALL_POOLING_FLAGS})
    pooling["include_prompt"] = True
    model_config = {
        "model_type": "SentenceTransformer",
        "prompts": {
            "query": settings.query_prefix,
            "passage": settings.passage_prefix,
            "document": settings.passage_prefix,
        },
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": settings.passage_max_length})
    write_json(folder / "1_Pooling" / "config.json", pooling)
    if settings.normalize:
        (folder / "2_Normalize").mkdir(exist_ok=True)  # Normalize has no parameters; the folder only has to exist
    write_json(folder / "config_sentence_transformers.json", model_config)
    write_json(folder / "modules.json", modules)  # last: its presence says "this is a sentence-transformers folder"
