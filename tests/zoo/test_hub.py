"""save_pretrained / from_pretrained: round trip, storage by reference, integrity errors, versions, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo._format as fmt
from fusion_errors import CheckpointError, ConfigError, MissingDependencyError, RegistryError
from zoo.hub import from_pretrained, read_config, save_pretrained


def logits(model, raw):
    with torch.no_grad():
        return model(model.preprocess(**raw)).logits


@pytest.mark.parametrize(("stage", "head"), [("late", "gating"), ("early", "concat"), ("hybrid", "moe")])
def test_round_trip_identical_logits(make_model, raw, tmp_path: Path, stage: str, head: str) -> None:
    model = make_model(stage=stage, fusion_head=head)
    path = save_pretrained(model, tmp_path / "ck", metrics={"test": {"fused": {"accuracy": 0.5}}})
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = from_pretrained(path)
    assert not loaded.training
    torch.testing.assert_close(logits(loaded, raw), logits(model, raw), rtol=0, atol=0)
    assert "| test | fused | 0.5000 |" in (path / "README.md").read_text()


def test_frozen_by_reference_finetuned_in_full(make_model, raw, tmp_path: Path) -> None:
    model = make_model(finetune={"audio": "frozen", "image": "full", "text": "lora"})
    with torch.no_grad():  # move the fine-tuned weights away from their fresh values
        for name, p in model.encoders.named_parameters():
            if "lora_B" in name or name.startswith("image."):
                p.add_(0.1)
    path = save_pretrained(model, tmp_path / "ck")
    keys = list(load_file(str(path / "model.safetensors")))
    assert not any(k.startswith("encoders.audio.") for k in keys)
    assert any(k.startswith("encoders.image.conv") for k in keys)
    text_keys = [k for k in keys if k.startswith("encoders.text.")]
    assert text_keys and all("lora_" in k for k in text_keys)
    stored = {m: r["stored"] for m, r in read_config(path)["encoders"].items()}
    assert stored == {"audio": "reference", "image": "full", "text": "lora"}
    torch.testing.assert_close(logits(from_pretrained(path), raw), logits(model, raw), rtol=0, atol=0)


def test_random_or_changed_frozen_weights_are_stored_in_full(make_model, tmp_path: Path) -> None:
    model = make_model(modalities=("text",))
    with torch.no_grad():
        model.encoders["text"].proj.bias.add_(1.0)  # frozen, but no longer what the registry builds
    path = save_pretrained(model, tmp_path / "ck")
    assert read_config(path)["encoders"]["text"]["stored"] == "full"
    assert torch.equal(from_pretrained(path).encoders["text"].proj.bias, model.encoders["text"].proj.bias)


def test_reference_folder_is_small(make_model, tmp_path: Path) -> None:
    frozen = save_pretrained(make_model(), tmp_path / "frozen")
    full = save_pretrained(make_model(finetune="full"), tmp_path / "full")
    assert (frozen / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size


def test_hash_mismatch(make_model, tmp_path: Path) -> None:
    path = save_pretrained(make_model(), tmp_path / "ck")
    doc = json.loads((path / "config.json").read_text())
    doc["model"]["encoders"]["image"]["options"] = {"seed": 1}  # same names and shapes, other weights
    doc["encoders"]["image"]["options"] = {"seed": 1}
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="image encoder 'zoo-fake-image' has weights sha256.*check_hashes=False"):
        from_pretrained(path)
    assert from_pretrained(path, check_hashes=False) is not None


def test_truncated_weights(make_model, tmp_path: Path) -> None:
    path = save_pretrained(make_model(finetune="full"), tmp_path / "ck")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt.*re-save"):
        from_pretrained(path)


def test_missing_files(make_model, tmp_path: Path) -> None:
    path = save_pretrained(make_model(), tmp_path / "ck")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        from_pretrained(path)
    with pytest.raises(CheckpointError, match="neither a folder nor a zoo model"):
        from_pretrained(tmp_path / "nowhere")


def test_config_and_weights_disagree(make_model, tmp_path: Path) -> None:
    path = save_pretrained(make_model(hidden_dim=8, stage="late"), tmp_path / "ck")
    doc = json.loads((path / "config.json").read_text())
    doc["model"]["hidden_dim"] = 12
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"disagree: shape mismatch .*classifier\.weight"):
        from_pretrained(path)
    doc["model"]["hidden_dim"], doc["model"]["stage"], doc["model"]["fuse_tokens"] = 8, "early", True
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"missing from the weights: .*modality_embed.*unexpected"):
        from_pretrained(path)


def test_unknown_head_names_it(make_model, tmp_path: Path) -> None:
    path = save_pretrained(make_model(), tmp_path / "ck")
    doc = json.loads((path / "config.json").read_text())
    doc["model"]["fusion_head"] = "telepathy"
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match="'telepathy'.*known heads: .*gating"):
        from_pretrained(path)


def test_unknown_key_and_wrong_type(make_model, tmp_path: Path) -> None:
    path = save_pretrained(make_model(), tmp_path / "ck")
    doc = json.loads((path / "config.json").read_text())
    doc["model"]["hiden_dim"] = 8
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="hiden_dim"):
        from_pretrained(path)
    del doc["model"]["hiden_dim"]
    doc["model"]["dropout"] = "lots"
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="config.dropout"):
        from_pretrained(path)


def test_missing_encoder_package(make_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_pretrained(make_model(), tmp_path / "ck")

    def no_package(name: str, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'resemblyzer'", name="resemblyzer")

    monkeypatch.setattr("zoo.checkpoint.create_encoder", no_package)
    with pytest.raises(MissingDependencyError, match="audio encoder 'zoo-fake-audio'.*pip install resemblyzer"):
        from_pretrained(path)


def test_format_versions(make_model, raw, tmp_path: Path) -> None:
    model = make_model()
    path = save_pretrained(model, tmp_path / "ck")
    doc = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**doc, "format_version": fmt.CHECKPOINT_FORMAT + 1}))
    with pytest.raises(CheckpointError, match=f"format_version {fmt.CHECKPOINT_FORMAT + 1}.*pip install -U"):
        from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**doc["model"], "format_version": 0}))  # pre-release layout
    torch.testing.assert_close(logits(from_pretrained(path), raw), logits(model, raw), rtol=0, atol=0)


def test_interrupted_save_keeps_previous(make_model, raw, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_model(stage="late")
    path = save_pretrained(first, tmp_path / "ck")

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("zoo.checkpoint.render_card", boom)  # fails after model.safetensors is written
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(make_model(stage="early"), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp folder left behind
    torch.testing.assert_close(logits(from_pretrained(path), raw), logits(first, raw), rtol=0, atol=0)


def test_refuses_to_replace_a_foreign_folder(make_model, tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_pretrained(make_model(), tmp_path / "stuff")
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"


def test_swap_head_on_loaded_model_keeps_encoders(make_model, tmp_path: Path) -> None:
    model = make_model(finetune="full")
    with torch.no_grad():
        model.encoders["text"].proj.weight.mul_(2.0)
    loaded = from_pretrained(save_pretrained(model, tmp_path / "ck"))
    before = {k: v.clone() for k, v in loaded.encoders.state_dict().items()}
    loaded.swap_fusion_head("gating")
    assert loaded.config.fusion_head == "gating"
    after = loaded.encoders.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(after["text.proj.weight"], model.encoders["text"].proj.weight)


def test_registry_tiny_encoders_round_trip(tmp_path: Path) -> None:
    """The library's own tiny encoders (random init, frozen) are stored in full and reload exactly."""
    from encoders import list_encoders
    from zoo.config import FusionModelConfig
    from zoo.export import default_example
    from zoo.model import FusionModel

    names = {"audio": "mel-cnn", "image": "tiny-image", "text": "tiny-text"}
    if not set(names.values()) <= set(list_encoders()):
        pytest.skip("tiny encoders are not registered")
    model = FusionModel(FusionModelConfig(encoders=names, labels=("x", "y"), hidden_dim=8)).eval()
    path = save_pretrained(model, tmp_path / "ck")
    assert {r["stored"] for r in read_config(path)["encoders"].values()} == {"full"}
    raw = default_example(model)
    torch.testing.assert_close(logits(from_pretrained(path), raw), logits(model, raw), rtol=0, atol=0)
