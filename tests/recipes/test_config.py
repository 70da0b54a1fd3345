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
