"""The offline pretrained defaults load real weights and behave like the models they come from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import encoders
from encoders._weights import efficientnet_lite0_file

pytestmark = pytest.mark.slow  # every test here loads real pretrained weights

ASSETS = Path(__file__).resolve().parents[1] / "assets"
VOICES = [ASSETS / f"voice_{v}_{k}.wav" for v in "ab" for k in "12"]


def test_minilm_ranks_paraphrase_above_unrelated() -> None:
    enc = encoders.create_encoder("minilm-l6")
    assert enc.embed_dim == 384
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    pooled = torch.nn.functional.normalize(enc(enc.preprocessor(texts)).pooled, dim=-1)  # [3, 384]
    paraphrase, unrelated = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    assert paraphrase > 0.6 > unrelated + 0.3, (paraphrase, unrelated)


@pytest.mark.parametrize(("photo", "classes"), [("chelsea", {281, 282, 285}), ("coffee", {967})])
def test_efficientnet_lite0_classifies_real_photos(photo: str, classes: set[int]) -> None:
    from skimage import data as skdata  # a dev dependency: an import error fails the test
    enc = encoders.create_encoder("efficientnet-lite0")
    assert enc.embed_dim == 1280
    state = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    pooled = enc(enc.preprocessor([getattr(skdata, photo)()])).pooled  # [1, 1280] pre-logits
    logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]  # [1, 1000] ImageNet classes
    top5 = set(logits[0].topk(5).indices.tolist())
    assert int(logits[0].argmax()) in classes and classes <= top5, top5


def test_resemblyzer_separates_voices_and_matches_reference() -> None:
    enc = encoders.create_encoder("resemblyzer-lstm")
    pooled = enc(enc.preprocessor([str(p) for p in VOICES])).pooled  # [4, 256], L2-normalised
    sims = pooled @ pooled.T
    same = min(float(sims[0, 1]), float(sims[2, 3]))
    cross = max(float(sims[i, j]) for i in (0, 1) for j in (2, 3))
    assert same > cross + 0.05, (same, cross)

    import resemblyzer  # a core dependency (its wheel ships the weights)
    from resemblyzer.audio import normalize_volume

    reference = resemblyzer.VoiceEncoder("cpu", verbose=False)
    expected = np.stack(
        [reference.embed_utterance(normalize_volume(sf.read(p, dtype="float32")[0], -30, increase_only=True))
         for p in VOICES]
    )
    # measured max abs difference: 4.5e-7 (float32 STFT differences between librosa and torchaudio)
    assert np.abs(pooled.numpy() - expected).max() < 1e-4
