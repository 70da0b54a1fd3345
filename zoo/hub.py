"""The Hugging Face Hub and the zoo's names: load by name or folder, push a fused model to the Hub.

Sits above ``zoo.model``: loading a model needs the class; the folder format itself is ``zoo.checkpoint``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fusion_errors import CheckpointError, FusionZooError, MissingDependencyError

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


def push_to_hub(path_or_model: str | Path | FusionModel, repo_id: str, token: str | None = None,
                private: bool = False) -> str:
    """Upload a checkpoint folder (or a model, saved first to a temp folder) to the Hugging Face Hub.

    Returns the repo URL. Needs network access and a token with write access (``huggingface-cli login``).
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise CheckpointError(f"repo_id={repo_id!r} must look like 'org/name'.")
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise MissingDependencyError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from e
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(path_or_model, (str, Path)):
            folder = Path(path_or_model)
            read_config(folder)
        else:
            folder = save_pretrained(path_or_model, Path(tmp) / "model")
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder))
        except Exception as e:
            raise FusionZooError(f"upload to {repo_id} failed ({type(e).__name__}: {e}); check the token "
                                 "(huggingface-cli login) and the network.") from e
    return f"https://huggingface.co/{repo_id}"
