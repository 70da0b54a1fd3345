"""Long texts on real data: ``python benchmarks/long_text.py [EASYVQA_DIR]`` (docs/encoders.md, "Long texts").

Each easy-VQA question is put after 20 other easy-VQA questions (drawn, seeded, from the validation split), so the
question that decides the answer sits past the first 128-token window (~200 tokens in all). ``minilm-l6`` pooled
features, once truncated (``max_windows=1``) and once read in windows (the default), feed a logistic regression
trained on 3000 train rows and scored on 1000 test rows. Prints one JSON line; needs ``benchmarks/easyvqa.py
prepare`` first (default folder ``~/.cache/fusion-zoo/easyvqa``) and scikit-learn (the ``dev`` extra).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.easyvqa import DEFAULT_DIR, read_rows  # noqa: E402
from encoders import create_encoder  # noqa: E402


def measure(folder: Path, n_train: int = 3000, n_test: int = 1000, distractors: int = 20) -> dict[str, Any]:
    """Test accuracy of the probe with truncated and with windowed text features."""
    from sklearn.linear_model import LogisticRegression

    train, test = read_rows(folder, "train", seed=0)[:n_train], read_rows(folder, "test", seed=0)[:n_test]
    others = [r["question"] for r in read_rows(folder, "validation", seed=0)[:3000]]
    rng = random.Random(1)
    texts = {name: [" ".join(rng.sample(others, distractors)) + " " + r["question"] for r in rows]
             for name, rows in (("train", train), ("test", test))}
    out: dict[str, Any] = {"rows": {"train": len(train), "test": len(test)}, "distractors": distractors}
    for name, windows in (("truncated", 1), ("windows", 8)):
        enc = create_encoder("minilm-l6", max_windows=windows).eval()
        start = time.perf_counter()
        feats = {}
        with torch.inference_mode():
            for split, items in texts.items():
                feats[split] = torch.cat([enc(enc.preprocessor(items[i:i + 64])).pooled
                                          for i in range(0, len(items), 64)]).numpy()  # [N, 384]
        clf = LogisticRegression(max_iter=2000).fit(feats["train"], [r["answer"] for r in train])
        out[f"{name}_accuracy"] = round(float(clf.score(feats["test"], [r["answer"] for r in test])), 4)
        out[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0]).expanduser() if args else DEFAULT_DIR
    print(json.dumps(measure(folder)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
