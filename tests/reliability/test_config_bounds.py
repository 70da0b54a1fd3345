"""Issue 30 (1, 4): every size a config or checkpoint can set (image size, clip length, labels, layers, widths,
token caps, heads, experts) is bounded before anything is built, and every option is checked by type and range:
a bad value is one ConfigError naming the option and its range, the same from ``config.json`` as from a flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import encoders
import fusion_heads
from fusion_errors import ConfigError
from zoo.config import MAX_LABELS, FusionModelConfig
from zoo.model import FusionModel


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    cfg = FusionModelConfig(encoders={"text": "tiny-text"}, labels=("a", "b"), hidden_dim=8)
    torch.manual_seed(0)
    return FusionModel(cfg).save_pretrained(tmp_path / "ck")


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any encoder or fusion head factory runs (the check must come first)."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a component was built before its options were checked")

    for registry in (encoders._REGISTRY, fusion_heads._REGISTRY):
        monkeypatch.setattr(registry, "create", refuse)


def _edit(folder: Path, **model: Any) -> None:
    doc = json.loads((folder / "config.json").read_text())
    text = model.pop("text_options", None)
    if text is not None:
        doc["model"]["encoders"]["text"]["options"] = text
    doc["model"].update(model)
    (folder / "config.json").write_text(json.dumps(doc))


def test_a_2kb_config_with_num_layers_100000_is_refused_before_building(saved: Path, nothing_built: None) -> None:
    _edit(saved, text_options={"num_layers": 100_000})  # was 337 s of CPU; 5,000 layers built 1.2 GB
    assert (saved / "config.json").stat().st_size < 4096
    with pytest.raises(ConfigError, match=r"encoder 'tiny-text': option num_layers=100000 must be in 0\.\.64"):
        FusionModel.from_pretrained(saved)


SIZE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "trunk_layers": ({"trunk_layers": 100_000}, r"trunk_layers=100000 must be in 0\.\.64"),
    "hidden_dim": ({"hidden_dim": 10**6}, r"hidden_dim=1000000 must be in 1\.\.16384"),
    "labels": ({"labels": [f"c{i}" for i in range(MAX_LABELS + 1)]}, "labels has 1,000,001 entries, above the limit"),
    "long_label": ({"labels": ["a", "b" * 5000]}, r"labels\[1\] is 5,000 characters long"),
    "label_type": ({"labels": ["a", {"b": 1}]}, r"labels\[1\]=\{'b': 1\} must be a string"),
    "image_size": ({"encoders": {"image": {"name": "tiny-image", "options": {"image_size": 60000}}}},
                   r"option image_size=60000 must be in \d+\.\.1024"),
    "max_length": ({"encoders": {"text": {"name": "tiny-text", "options": {"max_length": 10**9}}}},
                   r"option max_length=1000000000 must be in 1\.\.8192"),
    "hidden_size": ({"encoders": {"text": {"name": "tiny-text", "options": {"hidden_size": 10**6}}}},
                    r"option hidden_size=1000000 must be in 1\.\.16384"),
    "num_heads": ({"encoders": {"text": {"name": "tiny-text", "options": {"num_heads": 10**5}}}},
                  r"option num_heads=100000 must be in 1\.\.256"),
    "clip_length": ({"encoders": {"audio": {"name": "mel-cnn", "options": {"max_seconds": 1e12}}}},
                    r"option max_seconds=1000000000000.0 must be in"),
    "channels": ({"encoders": {"audio": {"name": "mel-cnn", "options": {"channels": [8] * 1000}}}},
                 "option channels has 1000 items, above the limit of 64"),
    "experts": ({"fusion_head": "moe", "head_options": {"num_experts": 10**6}},
                r"fusion head 'moe': option num_experts=1000000 must be in 1\.\.256"),
    "head_layers": ({"fusion_head": "cross_attention", "head_options": {"layers": 100_000}},
                    r"option layers=100000 must be in 0\.\.64"),
    "bottlenecks": ({"fusion_head": "bottleneck", "head_options": {"num_bottlenecks": 10**7}},
                    r"option num_bottlenecks=10000000 must be in 0\.\.256"),
}


@pytest.mark.parametrize("case", sorted(SIZE_CASES))
def test_every_size_a_config_sets_is_bounded_before_building(case: str, nothing_built: None) -> None:
    changes, needle = SIZE_CASES[case]
    data = {"encoders": {"text": "tiny-text"}, "labels": ["a", "b"], **changes}
    with pytest.raises(ConfigError, match=needle):
        FusionModelConfig.from_dict(data)


@pytest.mark.parametrize(("options", "needle"), [
    ({"floor": "high"}, "option floor='high' must be float, not str"),
    ({"floor": float("nan")}, "option floor=nan must be a finite number"),
    ({"floor": 1.5}, r"option floor=1.5 must be in \[0, 1\)"),
    ({"per_unit": 1}, "option per_unit=1 must be bool, not int"),
    ({"hidden_dim": 2.5}, "option hidden_dim=2.5 must be int, not float"),
])
def test_head_options_are_checked_by_type_and_range_before_the_head_is_built(options: dict[str, Any], needle: str,
                                                                             nothing_built: None) -> None:
    with pytest.raises(ConfigError, match=needle):
        fusion_heads.create_fusion_head("gating", {"text": 8, "image": 8}, 8, **options)
    with pytest.raises(ConfigError, match=needle):
        FusionModelConfig(encoders={"text": "tiny-text"}, labels=("a", "b"), fusion_head="gating",
                          head_options=options)


def test_an_invalid_value_in_a_checkpoint_and_on_the_cli_give_the_same_error(saved: Path) -> None:
    from recipes.task import FusionTask

    _edit(saved, fusion_head="gating", head_options={"floor": "high"})
    with pytest.raises(ConfigError) as from_file:
        FusionModel.from_pretrained(saved)
    with pytest.raises(ConfigError) as from_flags:  # what --model.head_options '{"floor": "high"}' builds
        FusionTask(encoders={"text": "tiny-text"}, labels=["a", "b"], fusion_head="gating",
                   head_options={"floor": "high"})
    same = "fusion head 'gating': option floor='high' must be float, not str."
    assert str(from_file.value).endswith(same) and str(from_flags.value).endswith(same)


@pytest.mark.parametrize("name", encoders.list_encoders())
def test_every_integer_option_of_every_encoder_is_bounded(name: str, nothing_built: None) -> None:
    hints = encoders._options._hints(encoders._REGISTRY.get(name))
    ints = [k for k, h in hints.items() if k != "return" and "int" in str(h) and "bool" not in str(h)]
    if not ints:
        pytest.skip(f"{name} takes no integer option")
    for key in ints:
        value = [10**7] if "list" in str(hints[key]) else 10**7
        with pytest.raises(ConfigError, match=f"option {key}="):
            encoders.create_encoder(name, **{key: value})


@pytest.mark.parametrize("name", fusion_heads.list_fusion_heads())
def test_every_integer_option_of_every_head_is_bounded(name: str, nothing_built: None) -> None:
    hints = encoders._options._hints(fusion_heads._REGISTRY.get(name))
    ints = [k for k, h in hints.items() if k not in ("return", "modality_dims", "out_dim") and "int" in str(h)]
    if not ints:
        pytest.skip(f"{name} takes no integer option")
    for key in ints:
        with pytest.raises(ConfigError, match=f"option {key}=10000000 must be in"):
            fusion_heads.create_fusion_head(name, {"text": 8}, 8, **{key: 10**7})
