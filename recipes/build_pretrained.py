"""Regenerate every shipped zoo model: ``python -m recipes.build_pretrained [--only NAME ...] [--epochs N]``.

Each entry of :data:`GRID` is trained with the recipes (``fusion-zoo fit --data.dataset <name>`` with the frozen
offline encoders; tridigits is the bundled demo, easy-VQA real data from the ``easy-vqa`` pip package, the held-out
speakers proxy made here with espeak-ng and scikit-learn's digits), its run's saved model folder is copied to
``zoo/pretrained/<name>/``, and the copy is reloaded and evaluated from raw test inputs to check that it reproduces
the accuracy its card reports (:func:`verify`, also ``fusion-zoo zoo verify NAME``). Runs top to bottom
unattended; a failed entry is reported and the others still run.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusion_common import atomic_folder
from zoo.registry import PRETRAINED_DIR

from .verify import (
    INTENDED_USE,
    TOLERANCE,
    card_accuracy,
    data_section,
    dataset_accuracy,
    verify,
    with_data_section,
    with_transfer_section,
)

__all__ = ["GRID", "INTENDED_USE", "model_name", "build_one", "raw_split", "raw_accuracy", "dataset_accuracy",
           "data_section", "with_data_section", "card_table", "verify", "main"]

DATASET = "tridigits"
# tridigits: every stage, and every one of the five named heads. Real data: easy-VQA with the default recipe and
# with the 3-seed sweep's best cell (concat, late: benchmarks/results.json sweep_easyvqa), and the held-out-speakers
# proxy (audio + image) with the default recipe.
GRID: list[tuple[str, str, str]] = [
    (DATASET, "late", "concat"), (DATASET, "late", "average"), (DATASET, "late", "cross_attention"),
    (DATASET, "late", "gating"), (DATASET, "late", "moe"), (DATASET, "early", "concat"),
    (DATASET, "early", "cross_attention"), (DATASET, "hybrid", "concat"), (DATASET, "hybrid", "gating"),
    ("easyvqa", "early", "concat"), ("easyvqa", "late", "concat"), ("heldout-speakers", "early", "concat"),
]
RUNS_DIR = Path("runs") / "zoo-build"
#: the repository's measurements (a source checkout builds the zoo): the transfer table comes from here
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results.json"


def measured_transfer(dataset: str, results: Path = RESULTS) -> dict[str, Any]:
    """``transfer_<dataset>`` of ``benchmarks/results.json`` (``benchmarks/transfer.py --merge``), or {}."""
    try:
        return dict(json.loads(results.read_text()).get(f"transfer_{dataset}") or {})
    except (OSError, ValueError):
        return {}


def model_name(stage: str, head: str, dataset: str = DATASET) -> str:
    """``<dataset>-<stage>-<head>``, e.g. ``tridigits-late-cross-attention``."""
    return f"{dataset}-{stage}-{head.replace('_', '-')}"


def raw_split(split: str = "test", limit: int | None = None,
              dataset: str = DATASET) -> tuple[dict[str, list[Any]], list[str]]:
    """Raw inputs (strings, PIL images or image paths, ``(waveform, rate)`` or audio paths) and label names of a
    named dataset's split (``recipes/sources.py``)."""
    if dataset != DATASET:
        return _table_split(dataset, split, limit)
    import soundfile as sf

    from recipes.tridigits.dataset import load_tridigits

    ds = load_tridigits(split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    names = ds.features["label"].names
    audio = []
    for blob in ds["audio"]:
        wav, rate = sf.read(io.BytesIO(blob), dtype="float32", always_2d=True)  # [N, channels]
        audio.append((wav.mean(axis=1), int(rate)))
    raw = {"text": list(ds["text"]), "image": list(ds["image"]), "audio": audio}
    return raw, [names[i] for i in ds["label"]]


def _table_split(dataset: str, split: str, limit: int | None) -> tuple[dict[str, list[Any]], list[str]]:
    """A named table dataset's split as the data module reads it: cells of each modality column (relative paths
    made absolute against its folder) and the label column as text."""
    from recipes.data import FusionDataModule, raw_cell

    dm = FusionDataModule(dataset=dataset, cache_features=False)
    ds = dm._parts[split][0]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    # each cell as the data module hands it to the preprocessor: text as written, file paths made absolute
    raw = {m: [raw_cell(m, v, dm._base) for v in ds[dm.columns[m]]] for m in dm.modalities}
    return raw, [str(v) for v in ds[dm.columns["label"]]]


def raw_accuracy(model: Any, split: str = "test", limit: int | None = None, batch_size: int = 64,
                 dataset: str = DATASET) -> float:
    """Accuracy of ``model`` (a ``FusionModel``) on a named dataset's split, fed raw inputs through
    ``model.predict``."""
    raw, labels = raw_split(split, limit, dataset)
    raw = {m: v for m, v in raw.items() if m in model.modalities}
    rows = model.predict(**raw, batch_size=batch_size)
    return sum(r["label"] == y for r, y in zip(rows, labels, strict=True)) / max(1, len(labels))


def card_table(results: Sequence[dict[str, Any]], out_dir: Path = PRETRAINED_DIR) -> str:
    """docs/zoo.md's table of the built models: each card's test accuracy (fused and each modality alone), the
    accuracy re-measured from raw inputs, and the build time."""
    lines = ["| model | fused | text alone | image alone | audio alone | re-measured from raw inputs | build time |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["name"]):
        if "error" in r:
            lines.append(f"| `{r['name']}` | failed: {r['error']} | | | | | |")
            continue
        test = json.loads((out_dir / r["name"] / "config.json").read_text()).get("metrics", {}).get("test", {})
        cells = [f"{test[k]['accuracy']:.3f}" if "accuracy" in test.get(k, {}) else "" for k in
                 ("fused", "text", "image", "audio")]
        lines.append(f"| `{r['name']}` | {' | '.join(cells)} | {r['raw_test_accuracy']:.3f} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def build_one(stage: str, head: str, extra: Sequence[str] = (), out_dir: Path = PRETRAINED_DIR,
              dataset: str = DATASET) -> dict[str, Any]:
    """Train one (dataset, stage, head) with the recipes, ship its model folder, re-check its test accuracy."""
    from recipes.cli import main as recipes_main
    from zoo.hub import from_pretrained

    name = model_name(stage, head, dataset)
    run_dir = RUNS_DIR / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    argv = ["fit", "--data.dataset", dataset, "--model.stage", stage, "--model.fusion_head", head,
            "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false", *extra]
    start = time.time()
    status = recipes_main(argv)
    if status:
        raise RuntimeError(f"fusion-zoo {' '.join(argv)} exited with {status}")
    saved = run_dir / "model"
    if not (saved / "config.json").is_file():
        raise RuntimeError(f"the run wrote no model folder at {saved}")
    target = out_dir / name
    with atomic_folder(target) as tmp:  # the shipped folder is replaced whole, or kept as it was
        shutil.copytree(saved, tmp, dirs_exist_ok=True)
        card = tmp / "README.md"
        if card.is_file():  # the run saved it as "model"; the shipped card carries its zoo name
            from zoo.card import card_metadata, with_metadata

            text = card.read_text().replace("# model\n", f"# {name}\n", 1)
            text = text.replace("from_pretrained('model')", f"from_pretrained({name!r})")
            doc = json.loads((tmp / "config.json").read_text())
            text = with_data_section(text, dataset, doc.get("metrics") or {})
            text = with_transfer_section(text, name, dataset, measured_transfer(dataset))
            card.write_text(with_metadata(text, card_metadata(doc, name)))
    reported = card_accuracy(target)
    measured = raw_accuracy(from_pretrained(target), dataset=dataset)
    ok = reported is not None and abs(measured - reported) <= TOLERANCE
    return {"name": name, "seconds": round(time.time() - start, 1), "card_test_accuracy": reported,
            "raw_test_accuracy": measured, "consistent": ok}


def main(argv: Sequence[str] | None = None) -> int:
    """Build the grid (or ``--only`` names); print one JSON line per model; exit 1 if any failed."""
    parser = argparse.ArgumentParser(prog="python -m recipes.build_pretrained", description=__doc__)
    parser.add_argument("--only", nargs="*", help="model names to build (default: the whole grid)")
    parser.add_argument("--epochs", type=int, help="override trainer.max_epochs")
    parser.add_argument("--out", type=Path, default=PRETRAINED_DIR, help="where the model folders go")
    args = parser.parse_args(argv)
    extra = ["--trainer.max_epochs", str(args.epochs)] if args.epochs else []
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    results = []
    for dataset, stage, head in GRID:
        if args.only and model_name(stage, head, dataset) not in args.only:
            continue
        try:
            result = build_one(stage, head, extra, args.out, dataset)
        except Exception as e:  # keep going: report and build the rest
            result = {"name": model_name(stage, head, dataset), "error": f"{type(e).__name__}: {e}"}
        failed += "error" in result or not result.get("consistent", False)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(card_table(results, args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
