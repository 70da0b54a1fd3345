"""Building a FusionModel from a config: component mistakes are one-line ConfigErrors before any data is read."""

from __future__ import annotations

import pytest

from fusion_errors import ConfigError
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

LABELS = ("bird", "cat", "dog")


def test_an_encoder_of_another_modality_is_refused_before_any_data_is_read() -> None:
    with pytest.raises(ConfigError, match="'tiny-text', which encodes text, not image; give each modality"):
        FusionModel(FusionModelConfig(encoders={"image": "tiny-text"}, labels=LABELS))


@pytest.mark.parametrize(("kw", "needle"), [
    ({"fusion_head": "gating", "head_options": {"floor": "high"}}, "fusion head 'gating': option floor='high' must "
                                                                      "be float, not str"),
    ({"encoders": {"text": {"name": "tiny-text", "options": {"hidden_size": -1}}}},
     r"encoder 'tiny-text': option hidden_size=-1 must be in 1\.\.16384")])
def test_option_values_a_component_cannot_take_are_config_errors(kw, needle) -> None:
    with pytest.raises(ConfigError, match=needle):  # refused by the config, before anything is built
        FusionModelConfig(**{"encoders": {"text": "tiny-text"}, "labels": LABELS, **kw})


def test_predict_after_a_head_swap_uses_the_new_head(tmp_path) -> None:
    import torch

    torch.manual_seed(0)
    model = FusionModel(FusionModelConfig(encoders={"text": "tiny-text", "image": "tiny-image"}, labels=LABELS))
    texts = ["a bird", "a cat"]
    model.predict(text=texts)  # builds the inference copy
    model.swap_fusion_head("gating")
    fresh = FusionModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    got = [r["probs"] for r in model.predict(text=texts, explain=False)]
    want = [r["probs"] for r in fresh.predict(text=texts, explain=False)]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-5)


def test_a_checkpoint_cannot_ask_for_gigantic_images(tmp_path) -> None:
    import json

    import torch

    from zoo import from_pretrained

    torch.manual_seed(0)
    model = FusionModel(FusionModelConfig(encoders={"image": "tiny-image"}, labels=LABELS))
    path = model.save_pretrained(tmp_path / "m")
    doc = json.loads((path / "config.json").read_text())
    for where in (doc["model"]["encoders"]["image"], doc["encoders"]["image"]):
        where["options"] = {**where.get("options", {}), "image_size": 60000}
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"image_size=60000 must be in \d+\.\.1024"):
        from_pretrained(path)
