"""The dual encoder: one Hugging Face backbone shared by queries and passages, pooling, LoRA, save/load.

This is the one encoder path for training (`forward`) AND evaluation (`encode`). Settings that change
what an embedding means (pooling, prefixes, max lengths) are stored next to the weights as
`hbt_encoder.json`, so a saved folder encodes the same way it was trained.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from hbt_accel.atomic import usual_mode
from hbt_accel.errors import ConfigError, DataError
from hbt_accel.models.cpu_attention import PackedLayout
from hbt_accel.models.settings import KINDS, POOLINGS, EncoderSettings, LoraSettings
from hbt_accel.models.st_format import write_sentence_transformers_files

__all__ = [
    "DualEncoder",
    "EncoderSettings",
    "LoraSettings",
    "pool",
    "check_num_layers",
    "keep_first_layers",
    "describe_parameters",
    "SETTINGS_FILE",
    "ADAPTER_DIR",
]

SETTINGS_FILE = "hbt_encoder.json"
ADAPTER_DIR = "adapter"
# Weight files of an older save that would shadow or contradict the new one (e.g. a sharded index).
_WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.json")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool `hidden` (N, L, H) with `attention_mask` (N, L) -> (N, H).

    mean: average of non-padding positions; cls: position 0; last: the last non-padding position of each
    row, which is right for left AND right padding.
    """
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (N, H)
    if pooling == "cls":
        return hidden[:, 0]  # (N, H)
    if pooling == "last":
        positions = torch.arange(attention_mask.size(1), device=attention_mask.device)  # (L,)
        last = (attention_mask.bool() * positions).argmax(dim=1)  # (N,) highest position with mask 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (N, H)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _default_lora_targets(model_type: str) -> list[str] | str:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, "all-linear")


def _adds_eos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


_HAS_POOLER = {"bert", "xlm-roberta", "roberta", "camembert", "xlm-roberta-xl", "electra", "mpnet"}


# ---------------------------------------------------------------------------------------------------------------------
# Depth: the first N transformer layers
# ---------------------------------------------------------------------------------------------------------------------
def _layer_count(config, model: str) -> int:
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise ConfigError(f"num_layers: {model} has no num_hidden_layers in its config, so it cannot be cut to depth")
    return count


def _check_depth(num_layers: int, config, model: str) -> None:
    available = _layer_count(config, model)
    if not 0 <= num_layers <= available:
        raise ConfigError(f"num_layers: got {num_layers}, expected 0 (all) or 1 to {available} ({model}'s layers)")


def check_num_layers(name_or_path: str | os.PathLike, num_layers: int) -> None:
    """Fail in one line, from the model's config alone (no weights read), when it has fewer than `num_layers`."""
    from transformers import AutoConfig

    from hbt_accel.models.bundled_e5 import resolve_model_path

    if num_layers:
        _check_depth(num_layers, AutoConfig.from_pretrained(resolve_model_path(str(name_or_path))), str(name_or_path))


def keep_first_layers(backbone: nn.Module, num_layers: int) -> None:
    """Cut a Hugging Face `backbone` to its first `num_layers` transformer layers, in place.

    The layers are the one `nn.ModuleList` as long as `config.num_hidden_layers` (BERT's `encoder.layer`, Qwen's
    `layers`). The config follows (`num_hidden_layers`, per-layer lists such as `layer_types`), so a saved copy loads
    back as the cut model with `AutoModel`, `SentenceTransformer` or `DualEncoder`. The kept layers are the original
    modules, weights untouched.
    """
    if num_layers == 0:
        return
    config = backbone.config
    _check_depth(num_layers, config, config.model_type)
    total = config.num_hidden_layers
    if num_layers == total:
        return
    found = [
        (name, module)
        for name, module in backbone.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == total
    ]
    if len(found) != 1:
        raise ConfigError(f"num_layers: cannot tell which module list holds the {total} layers of {config.model_type}")
    name, layers = found[0]
    owner_name, _, attribute = name.rpartition(".")
    owner = backbone.get_submodule(owner_name) if owner_name else backbone
    setattr(owner, attribute, nn.ModuleList(list(layers)[:num_layers]))
    config.num_hidden_layers = num_layers
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == total and key.startswith("layer"):  # e.g. Qwen3's layer_types
            setattr(config, key, value[:num_layers])


def describe_parameters(counts: dict[str, int]) -> str:
    """The log line of `DualEncoder.parameter_counts()`, in millions."""
    millions = {key: f"{value / 1e6:.1f}M" for key, value in counts.items() if key != "layers"}
    return (
        f"parameters {millions['total']} = {millions['word_embeddings']} word embeddings + "
        f"{millions['without_word_embeddings']} the rest ({counts['layers']} layers); "
        f"trainable {millions['trainable']}"
    )


PACKED_TOKEN_MULTIPLE = 128  # packed rows are filled up to a multiple of this many tokens (`_embed_packed`)


def filler_lengths(tokens: int, longest: int, multiple: int = PACKED_TOKEN_MULTIPLE) -> list[int]:
    """Lengths of the filler sequences that bring `tokens` to a multiple of `multiple`, none longer than `longest`
    (a longer one would widen its attention group's padding)."""
    missing = -tokens % multiple
    return [longest] * (missing // longest) + ([missing % longest] if missing % longest else [])


class DualEncoder(nn.Module):
    """Shared-weight encoder: `forward(input_ids, attention_mask) -> (N, d)` pooled (+ L2 normalised)."""

    def __init__(self, backbone: nn.Module, tokenizer, settings: EncoderSettings | None = None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.settings = settings or EncoderSettings()
        # Training-time speed knobs (see forward); not part of the saved settings.
        self.length_buckets = 1
        self.pack_sequences = False
        if tokenizer.pad_token is None:
            # Decoder LLMs (Qwen, Mistral) ship without a pad token; padding is masked out anyway.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        # Last-token pooling needs the EOS token as the summary position; add it if the tokenizer does not.
        self.append_eos = (
            self.settings.pooling == "last" and tokenizer.eos_token_id is not None and not _adds_eos(tokenizer)
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        settings: EncoderSettings | None = None,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        torch_dtype: torch.dtype | None = None,
        num_layers: int = 0,
        attn_implementation: str | None = None,
        tokenizer=None,
    ) -> DualEncoder:
        """Load backbone + tokenizer from a hub id, a folder, or "embedded" (the bundled multilingual-e5-small).

        Settings: `settings` if given, else the folder's `hbt_encoder.json` if present, else the defaults.
        `num_layers` > 0 keeps the first that many transformer layers (`keep_first_layers`); checked against the
        model's config before the weights are read. `attn_implementation`: transformers' name (None = its default).
        `tokenizer`: one already loaded to use instead of the folder's (a 250k-entry tokenizer takes seconds to load).
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from hbt_accel.models.bundled_e5 import resolve_model_path

        path = resolve_model_path(str(name_or_path))
        config = AutoConfig.from_pretrained(path)
        if num_layers:
            _check_depth(num_layers, config, str(name_or_path))
        saved = Path(path) / SETTINGS_FILE
        if settings is None:
            settings = EncoderSettings.from_json(saved) if saved.is_file() else EncoderSettings()
        load_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        if config.model_type in _HAS_POOLER:
            load_kwargs["add_pooling_layer"] = False  # unused by our pooling; avoids a "newly initialised" warning
        try:
            backbone = AutoModel.from_pretrained(path, **load_kwargs)
        except SafetensorError as error:  # a truncated or overwritten weights file: name it, no traceback
            raise DataError(f"{path}: the model weights cannot be read ({error}); the file is damaged") from None
        keep_first_layers(backbone, num_layers)  # before LoRA and checkpointing wrap the layers
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        backbone = _ready_for_training(backbone, gradient_checkpointing, lora)
        return cls(backbone, tokenizer, settings)

    @property
    def is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.backbone, PeftModel)

    # ------------------------------------------------------------------ encoding
    def tokenize(self, texts: list[str], kind: str):
        """Prefix by `kind` ("query" | "passage"), truncate to that kind's max length, pad to the longest.

        Returns a BatchEncoding with `input_ids` and `attention_mask` (N, L) tensors only, so `model(**batch)`
        works for every architecture.
        """
        texts, max_length = self._prefixed(texts, kind)
        common = {"return_token_type_ids": False, "return_attention_mask": True}
        if not self.append_eos:
            return self.tokenizer(
                texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt", **common
            )
        encoded = self.tokenizer(texts, truncation=True, max_length=max_length - 1, padding=False, **common)
        encoded["input_ids"] = [ids + [self.tokenizer.eos_token_id] for ids in encoded["input_ids"]]
        encoded["attention_mask"] = [mask + [1] for mask in encoded["attention_mask"]]
        return self.tokenizer.pad(encoded, padding=True, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`input_ids`, `attention_mask` (N, L) -> embeddings (N, d), L2-normalised if settings.normalize.

        Both knobs apply in training with right padding only (a training batch's rows are fixed by the sampler, so
        they cannot be length-sorted across batches as `encode` does); both give the same embeddings:
        - `pack_sequences` (set where `cpu_attention.can_pack`): the real tokens only, as one padding-free row,
          whose attention runs in `length_buckets` length-sorted groups;
        - else `length_buckets` > 1: the rows in that many length-sorted groups, each cut to its own longest row.
        """
        if not self.training or self.tokenizer.padding_side != "right":
            return self._embed(attention_mask, input_ids=input_ids)
        if self.pack_sequences:
            return self._embed_packed(input_ids, attention_mask)
        if self.length_buckets <= 1 or len(input_ids) < 2:
            return self._embed(attention_mask, input_ids=input_ids)
        lengths = attention_mask.sum(dim=1)  # (N,)
        order = torch.argsort(lengths, descending=True)  # (N,)
        # ONE word-embedding lookup for all groups: each lookup's backward builds a dense gradient the size of the
        # whole (vocabulary, H) matrix (96M floats for e5-small), so a lookup per group would multiply that cost.
        token_vectors = self.backbone.get_input_embeddings()(input_ids)  # (N, L, H)
        parts = []
        for group in torch.tensor_split(order, min(self.length_buckets, len(order))):
            longest = int(lengths[group].max())
            group_mask = attention_mask[group, :longest]  # (n_g, l)
            parts.append(self._embed(group_mask, inputs_embeds=token_vectors[group, :longest]))  # (n_g, d)
        embeddings = torch.cat(parts)  # (N, d) in `order`
        return embeddings[torch.argsort(order)]  # (N, d) in input order

    def _embed(
        self,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        ).last_hidden_state  # (N, L, H)
        return self._pool(hidden, attention_mask)

    def _embed_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded (N, L) rows -> (N, d), computing only the T real tokens (hbt_accel/models/cpu_attention.py).

        The packed row is filled up to a multiple of `PACKED_TOKEN_MULTIPLE` with filler sequences (no longer than the
        longest real one, attending only to themselves, dropped after): the linear layers then see a few dozen shapes
        in a run instead of a new one every step, and oneDNN's per-shape kernel cache (up to 1,024 kernels, each with
        its reordered weights) stops growing with the steps; the real tokens' values do not change."""
        real = attention_mask.bool()  # (N, L)
        lengths = attention_mask.sum(dim=1)  # (N,)
        ids = input_ids[real]  # (T,)
        positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)[real]  # (T,)
        total, fill = len(ids), filler_lengths(len(ids), int(lengths.max()))
        if fill:
            filler_positions = torch.cat([torch.arange(n, device=ids.device) for n in fill])
            ids = torch.cat([ids, ids.new_full((sum(fill),), int(input_ids[0, 0]))])  # any token: nothing reads it
            positions = torch.cat([positions, filler_positions])
            lengths = torch.cat([lengths, lengths.new_tensor(fill)])
        packed = self.backbone(
            input_ids=ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            packed_layout=PackedLayout.of(lengths, self.length_buckets),
        ).last_hidden_state[0, :total]  # (T, H)
        hidden = packed.new_zeros(*real.shape, packed.shape[-1]).index_put((real,), packed)  # (N, L, H)
        return self._pool(hidden, attention_mask)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeddings = pool(hidden, attention_mask, self.settings.pooling)  # (N, H)
        if self.settings.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=-1)  # (N, H)
        return embeddings

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _without_autograd(self):
        """inference_mode, the faster one, except under DeepSpeed ZeRO-3: the small parameters it keeps gathered
        (param persistence) would be gathered as inference tensors, and the next training step could not use them
        ("Inference tensors cannot be saved for backward"). no_grad there."""
        zero3 = any(hasattr(parameter, "ds_id") for parameter in self.parameters())
        return torch.no_grad() if zero3 else torch.inference_mode()

    def encode(
        self, texts: list[str], kind: str, batch_size: int = 64, bf16: bool = False, progress=None
    ) -> np.ndarray:
        """Embed `texts` -> float32 array (N, d) in input order; eval mode, no grad, batches of similar token length.

        `progress(done, total)`, if given, is called after every batch (texts encoded so far, of `total`).
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not one string")
        texts = list(texts)
        lengths = self.token_lengths(texts, kind)
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # longest first: tight padding
        was_training = self.training
        self.eval()
        chunks = []
        try:
            with self._without_autograd(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                for start in range(0, len(order), batch_size):
                    batch = self.tokenize([texts[i] for i in order[start : start + batch_size]], kind)
                    batch = {name: t.to(self.device) for name, t in batch.items()}
                    chunks.append(self(**batch).float().cpu())
                    if progress is not None:
                        progress(min(start + batch_size, len(order)), len(order))
        finally:
            self.train(was_training)
        if not chunks:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        sorted_embeddings = torch.cat(chunks).numpy()  # (N, d), in `order`
        embeddings = np.empty_like(sorted_embeddings)
        embeddings[order] = sorted_embeddings
        return embeddings.astype(np.float32, copy=False)

    def token_lengths(self, texts: list[str], kind: str) -> list[int]:
        """Tokens per text as `tokenize` makes them (prefix, truncation, EOS), without padding."""
        texts, max_length = self._prefixed(texts, kind)
        limit = max_length - int(self.append_eos)
        ids = self.tokenizer(texts, truncation=True, max_length=limit, return_attention_mask=False)["input_ids"]
        return [len(row) + int(self.append_eos) for row in ids]

    def _prefixed(self, texts: list[str], kind: str) -> tuple[list[str], int]:
        """(texts with the kind's prefix, the kind's max length in tokens)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(texts, str):
            raise TypeError("tokenize() takes a list of texts, not one string")
        prefix = self.settings.query_prefix if kind == "query" else self.settings.passage_prefix
        max_length = self.settings.query_max_length if kind == "query" else self.settings.passage_max_length
        # Stripped: transformers' XLM-R tokenizer drops a trailing-space piece that the reference tokenizer.json keeps
        # (375 XQuAD-R questions end in a space); stripping makes both agree and costs nothing.
        return [prefix + text.strip() for text in texts], max_length

    @property
    def embedding_dim(self) -> int:
        return self.backbone.config.hidden_size

    def parameter_counts(self) -> dict[str, int]:
        """Parameters (a count, not bytes): total, word_embeddings (the vocabulary matrix), without_word_embeddings
        (total minus that: the layers, position embeddings, norms and any LoRA adapters), trainable, and the number
        of transformer layers. ZeRO-3-partitioned parameters count whole."""

        def size(parameter: torch.Tensor) -> int:
            return int(getattr(parameter, "ds_numel", parameter.numel()))

        total = sum(size(p) for p in self.parameters())
        word_embeddings = size(self.backbone.get_input_embeddings().weight)
        return {
            "total": total,
            "word_embeddings": word_embeddings,
            "without_word_embeddings": total - word_embeddings,
            "trainable": sum(size(p) for p in self.parameters() if p.requires_grad),
            "layers": int(self.backbone.config.num_hidden_layers),
        }

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self, output_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Save the backbone, tokenizer, `hbt_encoder.json` and the sentence-transformers files into `output_dir`.

        With LoRA: the adapter goes to `output_dir/adapter` and a merged full model to `output_dir`
        (loadable by `AutoModel.from_pretrained`); the merge runs on a copy, training can go on.
        `state_dict`: this module's full state dict when the live parameters are partitioned (ZeRO-3:
        `accelerator.get_state_dict(model)` on all ranks, then call this on the main process only).
        Files are written to a temporary folder next to `output_dir` and moved in one by one with
        `os.replace`; other files already in `output_dir` stay.
        """
        output_dir = Path(output_dir)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
        staging.chmod(usual_mode(directory=True))  # mkdtemp makes 0700; a saved model must read like any folder
        try:
            self._write(staging, state_dict)
            _move_into(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write(self, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        backbone_state = None
        if state_dict is not None:
            prefix = "backbone."
            backbone_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if self.is_peft:
            self.backbone.save_pretrained(folder / ADAPTER_DIR, state_dict=backbone_state)
            self._merged_copy(backbone_state).save_pretrained(folder)
        else:
            self.backbone.save_pretrained(folder, state_dict=backbone_state)
        self.tokenizer.save_pretrained(folder)
        (folder / SETTINGS_FILE).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")
        write_sentence_transformers_files(folder, self.settings)  # SentenceTransformer(folder) works too

    def _merged_copy(self, backbone_state: dict[str, torch.Tensor] | None) -> nn.Module:
        if backbone_state is None:
            return copy.deepcopy(self.backbone).merge_and_unload()
        # Partitioned live parameters (ZeRO-3) cannot be copied: rebuild from config and load the gathered state.
        from peft import get_peft_model
        from transformers import AutoModel

        base_config = self.backbone.get_base_model().config
        dtype = next(iter(backbone_state.values())).dtype
        with _without_zero3_init():  # only the main process builds this copy: a partitioned init would deadlock
            base = AutoModel.from_config(base_config, dtype=dtype)
        fresh = get_peft_model(base, self.backbone.peft_config["default"])
        if getattr(fresh.get_base_model(), "pooler", None) is not None:
            fresh.get_base_model().pooler = None
        fresh.load_state_dict(backbone_state, strict=True)
        return fresh.merge_and_unload()


@contextlib.contextmanager
def _without_zero3_init():
    """Build a plain (unpartitioned) module even while a ZeRO-3 run is active.

    transformers partitions every model it creates while accelerate's DeepSpeed config is registered; that is a
    collective, so a model built on one rank alone would wait forever for the others.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def stale_save_folders(output_dir: Path) -> list[Path]:
    """What a `save_pretrained` into `output_dir` killed midway leaves: its staging folder beside `output_dir`
    and the replaced sub-folders being retired inside it."""
    beside = output_dir.parent.iterdir() if output_dir.parent.is_dir() else []
    inside = output_dir.iterdir() if output_dir.is_dir() else []
    stale = [p for p in beside if p.name.startswith(f".{output_dir.name}.tmp-")]
    stale += [p for p in inside if p.name.startswith(".") and ".old-" in p.name]
    return sorted(p for p in stale if p.is_dir())


def _move_into(staging: Path, output_dir: Path) -> None:
    """Move every entry of `staging` into `output_dir`, replacing same-named entries only."""
    if not output_dir.exists():
        os.replace(staging, output_dir)  # one atomic rename
        staging.mkdir()  # the caller's cleanup expects it
        return
    new_names = {entry.name for entry in staging.iterdir()}
    for pattern in _WEIGHT_PATTERNS:
        for stale in output_dir.glob(pattern):
            if stale.name not in new_names:
                stale.unlink()
    for entry in staging.iterdir():
        target = output_dir / entry.name
        if target.is_dir() and entry.is_dir():
            retired = Path(tempfile.mkdtemp(prefix=f".{entry.name}.old-", dir=output_dir))
            os.replace(target, retired / entry.name)
            os.replace(entry, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(entry, target)


def _ready_for_training(backbone, gradient_checkpointing: bool, lora: LoraSettings | None):
    """The backbone without its pooler head and KV cache, with activation checkpointing and LoRA when asked."""
    if getattr(backbone, "pooler", None) is not None:
        # BERT-style pooler head: never used by our pooling, and its parameters would receive no
        # gradient (DDP raises on unused parameters). Dropped; saved folders lack it.
        backbone.pooler = None
    if getattr(backbone.config, "use_cache", None):
        backbone.config.use_cache = False  # no KV cache for encoding; required with checkpointing
    if gradient_checkpointing:
        if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5 name
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is None:
        return backbone
    from peft import LoraConfig, TaskType, get_peft_model

    targets = (
        lora.target_modules if lora.target_modules is not None else _default_lora_targets(backbone.config.model_type)
    )
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        task_type=TaskType.FEATURE_EXTRACTION,
    )  # fmt: skip
    return get_peft_model(backbone, config)
