"""The model card names the weights licence of every offline encoder a fused model can be built from."""

from __future__ import annotations

import encoders
from zoo.card import ENCODER_LICENCES, licence_of, render_card

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
