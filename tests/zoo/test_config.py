"""FusionModelConfig: typed, JSON round trip, validation errors that name the key."""

from __future__ import annotations

import pytest

from fusion_errors import ConfigError
from zoo.config import FORMAT_VERSION, EncoderSpec, FusionModelConfig


def make(**kw: object) -> FusionModelConfig:
    base: dict = {"encoders": {"text": "tiny-text", "image": {"name": "tiny-image", "finetune": "full"}},
                  "labels": ["a", "b"]}
    base.update(kw)
    return FusionModelConfig(**base)


def test_json_round_trip_and_sorted_modalities() -> None:
    cfg = make(stage="early", head_options={"hidden_dim": 4}, modality_dropout={"text": 0.2})
    assert cfg.modalities == ["image", "text"]
    assert cfg.encoders["image"] == EncoderSpec(name="tiny-image", finetune="full")
    assert FusionModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"foo": 1}, "foo"),
        ({"hidden_dim": "big"}, "config.hidden_dim"),
        ({"stage": "middle"}, "stage"),
        ({"task": "ranking"}, "task"),
        ({"labels": ["only"]}, "at least 2 labels"),
        ({"modality_dropout": {"audio": 0.5}}, "audio"),
        ({"modality_dropout": {"text": 1.0}}, "[0, 1)"),
        ({"encoders": {"smell": "x"}}, "smell"),
        ({"encoders": {"text": {"name": "x", "finetune": "some"}}}, "finetune"),
        ({"encoders": {"text": {"name": "x", "colour": 1}}}, "colour"),
        ({"format_version": FORMAT_VERSION + 1}, "upgrade"),
    ],
)
def test_invalid_configs_name_the_key(change: dict, needle: str) -> None:
    data = make().to_dict()
    data.update(change)
    with pytest.raises(ConfigError, match=None) as info:
        FusionModelConfig.from_dict(data)
    assert needle in str(info.value)


def test_missing_required_key_is_named() -> None:
    data = make().to_dict()
    del data["labels"]
    with pytest.raises(ConfigError, match="labels"):
        FusionModelConfig.from_dict(data)


def test_invalid_json_says_how_to_fix() -> None:
    with pytest.raises(ConfigError, match="save_pretrained"):
        FusionModelConfig.from_json("{not json")


def test_unknown_key_names_the_close_match() -> None:
    data = {**make().to_dict(), "hidden_dimm": 64}
    with pytest.raises(ConfigError, match="unknown key hidden_dimm in config; did you mean hidden_dim?"):
        FusionModelConfig.from_dict(data)


def test_defaults_are_the_default_recipe_and_to_dict_writes_every_field() -> None:
    cfg = make()
    # the default recipe (docs/recipes.md): early fusion of one pooled vector per modality, concat head
    assert (cfg.stage, cfg.fuse_tokens, cfg.fusion_head, cfg.hidden_dim, cfg.dropout) == (
        "early", False, "concat", 256, 0.2)
    assert cfg.modality_dropout == 0.1 and cfg.modality_dropout_map == {"image": 0.1, "text": 0.1}  # every modality
    assert cfg.replace(encoders={"text": "tiny-text"}).modality_dropout_map == {"text": 0.1}
    import dataclasses

    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(FusionModelConfig)}
    assert cfg.to_dict()["format_version"] == FORMAT_VERSION


def test_a_version_1_dict_keeps_the_version_1_defaults_for_keys_it_leaves_out() -> None:
    """Models saved before the defaults became the default recipe (format_version 1, e.g. the shipped tridigits
    models, whose config.json has no fuse_tokens) keep their meaning: late, token fusion, dropout 0.1, no
    modality dropout."""
    data = make().to_dict()
    for key in ("stage", "fuse_tokens", "dropout", "modality_dropout"):
        del data[key]
    old = FusionModelConfig.from_dict({**data, "format_version": 1})
    assert (old.stage, old.fuse_tokens, old.dropout, old.modality_dropout_map) == ("late", True, 0.1, {})
    assert old.format_version == FORMAT_VERSION  # every value is explicit now: it saves as the current version
    assert FusionModelConfig.from_json(old.to_json()) == old
    new = FusionModelConfig.from_dict(data)  # no version given: the current defaults
    assert (new.stage, new.fuse_tokens, new.dropout) == ("early", False, 0.2)


def test_a_version_1_model_folder_without_fuse_tokens_loads_as_token_fusion(tmp_path) -> None:
    """The shipped models of the first release had format_version 1 and no fuse_tokens in their config.json; an
    early model of that kind has the token-fusion weights (modality embeddings), which load only as token fusion."""
    import json

    import torch

    from zoo import FusionModel

    torch.manual_seed(0)
    model = FusionModel(make(stage="early", fuse_tokens=True, hidden_dim=8)).eval()
    folder = model.save_pretrained(tmp_path / "v1")
    doc = json.loads((folder / "config.json").read_text())
    del doc["model"]["fuse_tokens"]
    doc["model"]["format_version"] = 1
    (folder / "config.json").write_text(json.dumps(doc))
    loaded = FusionModel.from_pretrained(folder)
    assert loaded.config.needs_tokens and loaded.config.stage == "early"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
