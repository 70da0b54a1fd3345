"""The model card names the weights licence of every offline encoder a fused model can be built from."""

from __future__ import annotations

import encoders
from zoo.card import ENCODER_LICENCES, card_metadata, licence_of, render_card, with_metadata

# loaded from the Hugging Face Hub / torchaudio at run time: the licence is the upstream model card's
HUB_LOADED = {"hf-text", "hf-audio", "timm-image", "torchaudio-bundle"}


def test_every_offline_encoder_has_a_licence_entry() -> None:
    # the library's own encoders: factories defined in the encoders package (tests register fakes of their own)
    shipped = {n for n in encoders.list_encoders()
               if encoders._REGISTRY.get(n).__module__.split(".")[0] == "encoders"}
    assert {"whisper-base", "minilm-l6", "efficientnet-lite0-pixels"} <= shipped
    missing = sorted(shipped - HUB_LOADED - set(ENCODER_LICENCES))
    assert not missing, f"add these encoders to zoo.card.ENCODER_LICENCES: {missing}"
    assert licence_of("timm-image") == "see the upstream model"


def test_card_of_the_default_encoders_lists_their_licences() -> None:
    doc = {"model": {"encoders": {}, "labels": ["a"], "stage": "early", "fusion_head": "concat"},
           "encoders": {"audio": {"name": "whisper-base", "stored": "reference"},
                        "image": {"name": "efficientnet-lite0-pixels", "stored": "reference"},
                        "text": {"name": "minilm-l6", "stored": "reference"}}}
    card = render_card(doc)
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in card.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in ("audio", "image", "text")}
    assert rows == {"audio": "MIT", "image": "Apache-2.0", "text": "Apache-2.0"}  # docs/encoders.md, licences


def _doc(encoders: dict[str, str], task: str = "multiclass", dataset: str | None = None,
         test: dict | None = None) -> dict:
    return {"model": {"encoders": {m: {} for m in encoders}, "labels": ["a", "b"], "stage": "early",
                      "fusion_head": "concat", "task": task},
            "encoders": {m: {"name": n, "stored": "reference"} for m, n in encoders.items()},
            "dataset": dataset, "metrics": {"test": {"fused": test or {}}}}


def test_the_card_carries_hub_metadata_that_huggingface_hub_parses() -> None:
    from huggingface_hub import ModelCard

    doc = _doc({"image": "efficientnet-lite0", "text": "minilm-l6"}, dataset="org/vqa-set",
               test={"accuracy": 0.91234, "n": 100})
    card = ModelCard(render_card(doc, name="vqa-model"))
    data = card.data.to_dict()
    assert data["library_name"] == "fusion-zoo" and data["license"] == "apache-2.0"
    assert {"fusion-zoo", "image", "text", "early-fusion", "concat-head"} <= set(data["tags"])
    assert data["datasets"] == ["org/vqa-set"] and "pipeline_tag" not in data  # no Hub tag fits fused inputs
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("accuracy", 0.9123, "org/vqa-set")
    assert card.text.lstrip().startswith("# vqa-model")


def test_single_modality_cards_get_a_pipeline_tag_and_unknown_licences_say_other() -> None:
    assert card_metadata(_doc({"text": "minilm-l6"}))["pipeline_tag"] == "text-classification"
    assert "pipeline_tag" not in card_metadata(_doc({"text": "minilm-l6"}, task="regression"))
    meta = card_metadata(_doc({"image": "timm-image"}, dataset="my local folder"))
    assert meta["license"] == "other" and "datasets" not in meta and "model-index" not in meta


def test_metadata_replaces_an_old_front_matter_instead_of_stacking() -> None:
    once = with_metadata("# m\n\ntext\n", {"license": "mit"})
    twice = with_metadata(once, {"license": "apache-2.0"})
    assert twice.count("---\n") == 2 and "license: apache-2.0" in twice and twice.endswith("# m\n\ntext\n")


def test_every_shipped_card_has_the_metadata_its_config_implies() -> None:
    import json

    from huggingface_hub import ModelCard

    from zoo.registry import PRETRAINED_DIR

    shipped = sorted(p for p in PRETRAINED_DIR.glob("*") if (p / "config.json").is_file())
    for folder in shipped:
        doc = json.loads((folder / "config.json").read_text())
        card = ModelCard((folder / "README.md").read_text())
        assert card.data.to_dict() == card_metadata(doc, folder.name), folder.name
