"""``FusionModel.from_pretrained("owner/name")`` reads a Hub repo through the Hugging Face cache, with no network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fusion_errors import CheckpointError
from zoo import FusionModel
from zoo.checkpoint import hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cached_repo(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay out ``folder``'s files as huggingface_hub's cache holds a downloaded repo (refs/main -> a snapshot)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # any request at all would be a failure of this test: point the Hub at a closed port
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return cache


def test_a_repo_id_loads_from_the_hub_cache_offline(offline_cache: Path, tmp_path: Path) -> None:
    src = FusionModel.from_pretrained("tridigits-late-concat")
    saved = src.save_pretrained(tmp_path / "saved")
    _cached_repo(offline_cache, "someone/tridigits-demo", Path(saved))
    loaded = FusionModel.from_pretrained("someone/tridigits-demo")
    assert loaded.config.labels == src.config.labels
    for (k, a), (_, b) in zip(sorted(src.state_dict().items()), sorted(loaded.state_dict().items()), strict=True):
        assert a.shape == b.shape and bool((a == b).all()), k


def test_a_repo_missing_from_the_cache_is_one_clear_error_offline(offline_cache: Path) -> None:
    with pytest.raises(CheckpointError, match="not in the local Hub cache"):
        FusionModel.from_pretrained("someone/not-downloaded")


def test_what_names_the_hub() -> None:
    assert hub_id("hf-hub:a/b") == "a/b"
    assert hub_id("owner/name") == "owner/name"
    assert hub_id("tridigits-late-concat") is None  # a zoo name
    assert hub_id(Path("owner/name")) is None  # a Path is always a local folder
    assert hub_id("../x/y") is None and hub_id("/abs/folder") is None and hub_id("a/b/c") is None


def test_an_existing_local_folder_wins_over_a_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    FusionModel.from_pretrained("tridigits-late-concat").save_pretrained(tmp_path / "runs" / "model")
    assert hub_id("runs/model") is None
    assert FusionModel.from_pretrained("runs/model").config.fusion_head == "concat"
