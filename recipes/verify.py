"""Cards that re-derive: ``fusion-zoo zoo verify`` re-measures a model card's test accuracy on the dataset it names,
and the data section a shipped card carries (source, split sizes, intended use, limits)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["TOLERANCE", "INTENDED_USE", "card_accuracy", "dataset_accuracy", "data_section", "with_data_section",
           "transfer_section", "with_transfer_section", "verify"]

TOLERANCE = 0.005  # card vs re-measured test accuracy (0.5 points)
CARRIES = 0.03  # a modality alone within this of the fused accuracy "carries most of the task" (card wording)

#: what each shipped dataset's models are for (the card's "Data and intended use")
INTENDED_USE = {
    "tridigits": "a fast offline demo of fusion (every stage and head), and a start for `--model.init_from` on "
                 "digits given as speech, words and small images; not a model of real-world speech or handwriting",
    "easyvqa": "answering easy-VQA's questions (colour, shape, yes/no) about 64-px images of one coloured shape, "
               "and a start for `--model.init_from` on small image + question tables; not a general VQA model: "
               "it knows 13 answers and synthetic shapes only",
    "heldout-speakers": "recognising a digit spoken by a speaker never heard in training, with a noisy small image "
                        "of the same digit, and a start for `--model.init_from` on small audio + image tables; "
                        "its voices are synthetic (espeak-ng, English accents), not recordings of people",
}


def data_section(dataset: str, metrics: dict[str, Any]) -> str:
    """The card's data section: source and licence, split sizes, intended use, and the limits the per-modality
    test accuracies show (a model that needs every input says so)."""
    from recipes.data import FusionDataModule
    from recipes.sources import get_source

    source = get_source(dataset)
    if source is None:
        return str(dataset)
    dm = FusionDataModule(dataset=dataset, cache_features=False)
    sizes = ", ".join(f"{role} {len(ds):,}" for role, (ds, _, _) in dm._parts.items())
    test = metrics.get("test") or {}
    alone = {m: v["accuracy"] for m, v in test.items() if m != "fused" and isinstance(v, dict) and "accuracy" in v}
    lines = [f"`--data.dataset {dataset}`: {source.description}. Source: {source.origin}. Rows: {sizes}.", "",
             f"Intended use: {INTENDED_USE.get(dataset, 'see the dataset')}.", ""]
    if alone and "accuracy" in (test.get("fused") or {}):
        fused = test["fused"]["accuracy"]
        each = ", ".join(f"{m} alone {a:.3f}" for m, a in sorted(alone.items()))
        best = max(alone, key=lambda m: alone[m])
        if fused - alone[best] < CARRIES:  # one input does nearly all the work: say so, not "needs all inputs"
            lines.append(f"Known limits: fused test accuracy {fused:.3f} against {each}: {best} alone carries most "
                         f"of the task (the other inputs add {100 * (fused - alone[best]):.1f} points); without "
                         f"{best} the model is much weaker.")
        else:
            lines.append(f"Known limits: fused test accuracy {fused:.3f} against {each}: the model needs all its "
                         "inputs; a missing modality costs accuracy.")
    return "\n".join(lines)


def with_data_section(card: str, dataset: str, metrics: dict[str, Any]) -> str:
    """``card`` with its ``## Data`` section replaced by :func:`data_section`."""
    start = card.index("## Data\n")
    end = card.index("\n## ", start + 1)
    return card[:start] + "## Data\n\n" + data_section(dataset, metrics) + "\n" + card[end:]


def transfer_section(model: str, dataset: str, measured: dict[str, Any]) -> str:
    """The card's "What transfers" section from a ``benchmarks/transfer.py`` result (``transfer_<dataset>`` in
    results.json): test accuracy of ``fit --model.init_from <model>`` against a fit from scratch per training size,
    or "" when that result was measured from another zoo model."""
    if measured.get("model") != model or not measured.get("per_rows"):
        return ""
    rows = ["| training rows | from scratch | from this model | paired gain (min, max) | seeds |",
            "|---|---|---|---|---|"]
    for n, r in sorted(measured["per_rows"].items(), key=lambda kv: int(kv[0])):
        rows.append(f"| {int(n):,} | {r['scratch']:.3f} | {r['zoo']:.3f} | {r['gain']:+.3f} ({r['gain_min']:+.3f}, "
                    f"{r['gain_max']:+.3f}) | {len(r['seeds'])} |")
    return "\n".join([
        f"`fusion-zoo fit --model.init_from {model}` keeps this model's encoders, stage, head and weights and "
        f"fine-tunes them on a small table with the same inputs and labels. Measured on seeded {dataset} training "
        "subsets (400 validation and 2,000 test rows; `python benchmarks/transfer.py`), against the default recipe "
        "from scratch:", "", *rows, "",
        "What transfers is the whole fused head: this model saw the full training split of the same task, so the "
        "gain is what a user with a small table of the same kind gets; a new label set or new inputs start from "
        "scratch (`init_from` refuses other labels)."])


def with_transfer_section(card: str, model: str, dataset: str, measured: dict[str, Any]) -> str:
    """``card`` with a ``## What transfers`` section (replaced if present) before ``## Training recipe``."""
    body = transfer_section(model, dataset, measured)
    if "## What transfers\n" in card:
        start = card.index("## What transfers\n")
        card = card[:start] + card[card.index("\n## ", start + 1) + 1:]
    if not body or "## Training recipe\n" not in card:
        return card
    at = card.index("## Training recipe\n")
    return card[:at] + "## What transfers\n\n" + body + "\n\n" + card[at:]


def card_accuracy(folder: Path, split: str = "test") -> float | None:
    """The fused accuracy a model folder's config.json reports for ``split`` (None when absent)."""
    metrics = json.loads((folder / "config.json").read_text()).get("metrics", {})
    value = metrics.get(split, {}).get("fused", {}).get("accuracy")
    return None if value is None else float(value)


def dataset_accuracy(model: Any, dataset: str, split: str = "test", limit: int | None = None,
                     cache_dir: str | None = None) -> float:
    """Accuracy of ``model`` on a named dataset's split through the data module, as ``fusion-zoo test`` reads it:
    the model's own encoders and preprocessing, each distinct input encoded once (through the feature cache)."""
    import torch

    from recipes.data import FusionDataModule

    dm = FusionDataModule(dataset=dataset, batch_size=256, labels=list(model.config.labels), cache_dir=cache_dir,
                          max_samples=limit)
    dm.attach(model)
    dm.setup("test")
    right = total = 0
    model.eval()
    with torch.no_grad():
        for batch in dm.test_dataloader():
            predicted = model.fuse(batch["inputs"]).logits.argmax(-1)  # [B]
            right += int((predicted == batch["labels"]).sum())
            total += int(batch["labels"].shape[0])
    return right / max(1, total)


def verify(name_or_folder: str | Path, limit: int | None = None) -> dict[str, Any]:
    """Re-derive a model's card: its test accuracy re-measured on the test split of the data its card names.

    Returns ``name``, ``dataset``, ``card_test_accuracy``, ``measured_test_accuracy`` and ``matches`` (within
    :data:`TOLERANCE`), or ``skipped`` with the reason when the data is not available here (a Hub dataset offline,
    a package not installed, a local folder) — never a guess.
    """
    from fusion_errors import FusionZooError
    from recipes.sources import get_source
    from zoo.checkpoint import resolve
    from zoo.hub import from_pretrained

    folder = resolve(name_or_folder)
    doc = json.loads((folder / "config.json").read_text())
    dataset = doc.get("dataset")
    out: dict[str, Any] = {"name": str(name_or_folder), "dataset": dataset,
                           "card_test_accuracy": card_accuracy(folder)}
    if not isinstance(dataset, str) or get_source(dataset) is None:
        return {**out, "skipped": f"the card names no dataset this machine can rebuild ({dataset!r}; named "
                                  "datasets: recipes/sources.py)"}
    if out["card_test_accuracy"] is None:
        return {**out, "skipped": "the card records no fused test accuracy"}
    try:
        measured = dataset_accuracy(from_pretrained(folder), dataset, limit=limit)
    except (FusionZooError, ImportError) as e:
        return {**out, "skipped": f"{type(e).__name__}: {e}"}
    matches = limit is None and abs(measured - out["card_test_accuracy"]) <= TOLERANCE
    return {**out, "measured_test_accuracy": measured, "matches": matches, "rows": "all" if limit is None else limit}
