"""The Hugging Face Hub and the zoo's names: load by name or folder, push a fused model to the Hub.

Sits above ``zoo.model``: loading a model needs the class; the folder format itself is ``zoo.checkpoint``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fusion_common import atomic_folder
from fusion_errors import CheckpointError, FusionZooError, MissingDependencyError

from . import _format as fmt
from .checkpoint import HF_PREFIX, read_config, resolve, save_pretrained
from .model import FusionModel
from .registry import source_of

__all__ = ["from_pretrained", "load", "save_pretrained", "push_to_hub", "read_config", "resolve", "HF_PREFIX"]


def from_pretrained(name_or_path: str | Path, **kwargs: Any) -> FusionModel:
    """Load a fused model from a folder, a zoo name or ``hf-hub:org/name`` (see ``FusionModel.from_pretrained``)."""
    return FusionModel.from_pretrained(name_or_path, **kwargs)


def load(name: str, **kwargs: Any) -> FusionModel:
    """Load the pretrained zoo model ``name`` (keyword arguments go to ``FusionModel.from_pretrained``)."""
    return FusionModel.from_pretrained(source_of(name), **kwargs)


UPLOADED_FILES = (fmt.CONFIG_FILE, fmt.WEIGHTS_FILE, fmt.CARD_FILE)


def _stage(path_or_model: str | Path | FusionModel, dest: Path) -> Path:
    """Write exactly what ``push_to_hub`` uploads into the new (or empty) folder ``dest``: a model is saved there;
    a folder or zoo name has its checkpoint files copied (config checked first; other files there stay behind)."""
    if isinstance(path_or_model, FusionModel):
        return save_pretrained(path_or_model, dest)
    folder = resolve(path_or_model)  # folder, zoo name or hf-hub:org/name
    read_config(folder)
    dest.mkdir(parents=True, exist_ok=True)
    for name in UPLOADED_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
    return dest


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise CheckpointError(f"repo_id={repo_id!r} must look like 'org/name'.")


def push_to_hub(path_or_model: str | Path | FusionModel, repo_id: str, token: str | None = None,
                private: bool = False, dry_run: str | Path | None = None) -> str:
    """Upload a fused model to the Hugging Face Hub repo ``repo_id`` (created if needed); returns its URL.

    Args:
        path_or_model: a model, a checkpoint folder, a zoo name (``zoo.list_pretrained()``) or ``hf-hub:org/name``.
        repo_id: ``org/name``.
        token: a write token (default: the one ``huggingface-cli login`` stored, or ``HF_TOKEN``).
        private: create the repo as private.
        dry_run: upload nothing; write the exact folder that would be uploaded to this new (or empty) folder and
            return its path.

    Needs network access and a token with write access; failures raise one :class:`FusionZooError` naming the cause.
    """
    _check_repo_id(repo_id)
    if dry_run is not None:
        out = Path(dry_run)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CheckpointError(f"--dry-run folder {out} exists and is not empty; give a new folder.")
        with atomic_folder(out) as tmp:  # the folder appears complete or not at all
            _stage(path_or_model, tmp)
        return str(out)
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise MissingDependencyError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from e
    with tempfile.TemporaryDirectory() as staging:
        folder = _stage(path_or_model, Path(staging) / "model")
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder))
        except Exception as e:
            raise FusionZooError(f"upload to {repo_id} failed: {_cause(e)}") from e
    return f"https://huggingface.co/{repo_id}"


def _cause(e: Exception) -> str:
    """One line naming why a Hub call failed (offline, no token, no permission, other)."""
    text = " ".join(str(e).split())[:200]
    name = type(e).__name__
    chain = [name, *(type(c).__name__ for c in (e.__cause__, e.__context__) if c is not None)]
    if "OfflineModeIsEnabled" in chain:
        return "offline mode is on (HF_HUB_OFFLINE is set); unset it and check the network to upload."
    if any(n in ("ConnectionError", "ConnectError", "OfflineModeIsEnabled", "Timeout", "ConnectTimeout",
                 "NewConnectionError", "MaxRetryError") for n in chain) or "offline" in text.lower():
        return f"cannot reach the Hub ({name}); check the network connection (or a proxy / HF_ENDPOINT)."
    if "401" in text or "token" in text.lower() and "invalid" in text.lower() or name == "LocalTokenNotFoundError":
        return f"not logged in or the token is invalid ({name}); run huggingface-cli login or pass --token."
    if "403" in text:
        return f"the token may not write to this repo ({name}: {text}); use a write token for that org."
    return f"{name}: {text}"
