"""Hugging Face Hub upload: check the credentials before training, push a finished folder after it.

`check_hub_access(cfg)` runs before any data is loaded, so a missing or read-only token fails in seconds, not after
hours of training. `push_folder(accelerator, cfg, folder, message)` uploads from the main process only; every process
meets at a barrier afterwards (also when the upload fails, so no rank is left waiting).
The endpoint is huggingface_hub's (`HF_ENDPOINT`); nothing here names huggingface.co.
"""

from __future__ import annotations

import os
from pathlib import Path

from hbt_accel.config import ConfigError, HbtConfig
from hbt_accel.errors import PushFailed
from hbt_accel.run_record import is_checkpoint_name

LOGIN_HINT = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
# Files in a checkpoint-*/ folder that are training state, not model: accelerate's optimizer / scheduler / RNG /
# wrapped-model states and DeepSpeed's shards. The HF model in checkpoint-*/model/ and the reports are kept.
CHECKPOINT_STATE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth", ".safetensors")
CHECKPOINT_STATE_DIRS = ("global_step", "pytorch_model", "optimizer", "scheduler")
TMP_MARKERS = (".tmp", ".lock", ".incomplete")


def _hf_token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def _is_main_process() -> bool:
    from accelerate import PartialState

    try:
        return PartialState().is_main_process
    except Exception:  # no accelerate state: a plain single process
        return True


def check_hub_access(cfg: HbtConfig) -> dict | None:
    """Fail fast (ConfigError, one line) if `push_to_hub` cannot work; returns the whoami answer (main process).

    Checks: a repo id is set, Hub access is not switched off (HF_HUB_OFFLINE), a token exists (HF_TOKEN or the saved
    login), and the main process asks the Hub whether the token is valid, can write, and may write to the repo's
    namespace. Does nothing when push_to_hub is off.
    """
    if not cfg.push_to_hub:
        return None
    from huggingface_hub import HfApi, constants

    if not cfg.hub_model_id:
        raise ConfigError("hub_model_id: push_to_hub is true but no repo id is set (e.g. --hub_model_id user/model)")
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            "push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it or turn push_to_hub off"
        )
    token = _hf_token()
    if not token:
        raise ConfigError(
            f"push_to_hub: no Hugging Face token found for hub_model_id {cfg.hub_model_id!r}; {LOGIN_HINT}, "
            "or set push_to_hub false"
        )
    if not _is_main_process():
        return None
    try:
        identity = HfApi(token=token).whoami(token=token)
    except Exception as error:  # any failure here means "cannot push": say why in one line
        if _http_status(error) in (401, 403):
            raise ConfigError(
                f"push_to_hub: the Hub rejected the token ({_first_line(error)}) at {constants.ENDPOINT}; {LOGIN_HINT}"
            ) from None
        raise ConfigError(
            f"push_to_hub: cannot check the token ({hub_failure(error)}); check the network and HF_ENDPOINT, "
            "or set push_to_hub false"
        ) from None
    role = ((identity.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ConfigError(
            f"push_to_hub: the token of {identity.get('name')!r} is read-only; {LOGIN_HINT} with a write token"
        )
    namespace = cfg.hub_model_id.split("/")[0] if "/" in cfg.hub_model_id else identity.get("name")
    allowed = {identity.get("name")} | {org.get("name") for org in identity.get("orgs") or []}
    if namespace not in allowed:
        raise ConfigError(
            f"hub_model_id: {cfg.hub_model_id!r} is in namespace {namespace!r}, but the token belongs to "
            f"{identity.get('name')!r} (organisations: {', '.join(sorted(n for n in allowed if n)) or 'none'})"
        )
    return identity


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _http_status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def hub_failure(error: Exception) -> str:
    """Why a Hub request failed, as one phrase: the HTTP status and message the Hub answered with, or that it could
    not be reached at all (name resolution, refused connection, timeout): not the same advice."""
    from huggingface_hub import constants

    status = _http_status(error)
    if status is not None:
        return f"HTTP {status} from {constants.ENDPOINT}: {_first_line(error)}"
    return f"cannot reach {constants.ENDPOINT}: {_first_line(error)}"


def push_finished_run(accelerator, cfg: HbtConfig, output_dir: Path) -> str | None:
    """push_folder for a complete run folder; a failure becomes PushFailed: one line that says the local run is
    complete and gives the command that retries the upload alone."""
    try:
        return push_folder(accelerator, cfg, output_dir, "final model")
    except Exception as error:
        raise PushFailed(
            f"push_to_hub: uploading {output_dir} to {cfg.hub_model_id} failed ({hub_failure(error)}); the run is "
            f"complete on disk; retry the upload alone with: python recipes/push.py --run_dir {output_dir}"
        ) from None


def upload_ignore_list(folder: str | os.PathLike, include_checkpoints: bool) -> list[str]:
    """Relative paths (POSIX) under `folder` that must not be uploaded.

    Temporary files and folders (names containing .tmp, locks, partial downloads) are always left out; checkpoint-*
    folders entirely unless `include_checkpoints`, and then their training state (optimizer, scheduler, RNG,
    accelerate's model copy, DeepSpeed shards) still is: only checkpoint-*/model/ and the reports go up.
    """
    folder = Path(folder)
    ignored = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder)
        parts = relative.parts
        if any(marker in part for part in parts for marker in TMP_MARKERS) or "__pycache__" in parts:
            ignored.append(relative.as_posix())
            continue
        if is_checkpoint_name(parts[0]) and len(parts) > 1:
            if not include_checkpoints:
                ignored.append(relative.as_posix())
            elif len(parts) == 2 and path.suffix in CHECKPOINT_STATE_SUFFIXES:
                ignored.append(relative.as_posix())
            elif len(parts) > 2 and parts[1].startswith(CHECKPOINT_STATE_DIRS):
                ignored.append(relative.as_posix())
    return ignored


def _escape(path: str) -> str:
    """A literal path as an fnmatch pattern (huggingface_hub matches ignore_patterns with fnmatch)."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in path)


def push_folder(accelerator, cfg: HbtConfig, folder: str | os.PathLike, message: str) -> str | None:
    """Upload `folder` to `cfg.hub_model_id` (branch `cfg.hub_revision` or main) from the main process.

    Creates the repo (exist_ok, private=cfg.hub_private) and the branch if needed; returns the commit URL on the main
    process, None elsewhere. All processes wait for the upload at `accelerator.wait_for_everyone()`.
    """
    url = None
    try:
        if accelerator.is_main_process:
            from huggingface_hub import HfApi

            api = HfApi(token=_hf_token())
            api.create_repo(cfg.hub_model_id, private=cfg.hub_private, exist_ok=True, repo_type="model")
            revision = cfg.hub_revision or None
            if revision:
                api.create_branch(cfg.hub_model_id, branch=revision, exist_ok=True)
            ignored = upload_ignore_list(folder, include_checkpoints=cfg.hub_push_checkpoints)
            info = api.upload_folder(
                repo_id=cfg.hub_model_id,
                folder_path=str(folder),
                commit_message=message,
                revision=revision,
                ignore_patterns=[_escape(path) for path in ignored] or None,
            )
            url = getattr(info, "commit_url", None) or str(info)
    finally:
        accelerator.wait_for_everyone()  # a failed upload must not leave the other ranks waiting forever
    return url
