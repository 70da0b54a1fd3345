"""The row checks' per-cell helpers keep their answers on their fast paths (recipes/_columns.py): a plain relative
path is joined without pathlib, ASCII text is judged visible without a per-character lookup, labels are encoded
in numpy. Each is pinned against the slow form it replaced."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import datasets
import pytest
import torch

from recipes._columns import LabelEncoder, resolve, visible

PATHS = ["img/0.png", "x.png", "/abs/a.png", "~/a.png", "./a.png", "a//b.png", "a/./b.png", "a/", "a/../b.png",
         ".hidden/a.png", "a/.b.png", "..", "http://host/y.png", "a\\b.png", "dir with space/é.png"]


@pytest.mark.parametrize("base", [Path("/data/set"), Path("rel/base"), Path(".")])
@pytest.mark.parametrize("v", PATHS)
def test_resolve_gives_pathlibs_string(v: str, base: Path) -> None:
    slow = v if Path(v).expanduser().is_absolute() or "://" in v else str(base / v)
    assert resolve(v, base) == slow


def test_visible_agrees_with_the_unicode_categories() -> None:
    def slow(text: str) -> bool:
        return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)

    samples = [chr(a) + chr(b) for a in range(128) for b in (0x00, 0x09, 0x20, 0x41, 0x7F)]
    samples += ["", "   ", "\u200b", "\ufeff a", "\u00a0", "é", "\u2028\u2029"]
    assert [visible(s) for s in samples] == [slow(s) for s in samples]


def test_labels_are_encoded_with_their_dtypes_and_problems() -> None:
    enc = LabelEncoder(["a", "b"], "multiclass", datasets.Value("string"))
    labels, problems = enc.encode(["b", "a", None, "c", " a "])
    assert labels.dtype == torch.long and labels.tolist() == [1, 0, 0, 0, 0]
    assert sorted(problems) == [2, 3]
    multi = LabelEncoder(["a", "b"], "multilabel", datasets.Sequence(datasets.Value("string")))
    targets, problems = multi.encode([["a", "b"], ["b"], ["z"]])
    assert targets.dtype == torch.float32 and targets.tolist() == [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]
    assert list(problems) == [2]
    reg = LabelEncoder(["y"], "regression", datasets.Value("float32"))
    values, problems = reg.encode([1.5, float("inf")])
    assert values.dtype == torch.float32 and values[0].tolist() == [1.5] and list(problems) == [1]
