"""The model card (``README.md``) written next to every fused checkpoint."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["ENCODER_LICENCES", "card_metadata", "licence_of", "render_card", "metrics_table", "with_metadata"]

# licence of each offline encoder's pretrained weights (see docs/encoders.md); tiny test encoders are random
ENCODER_LICENCES: dict[str, str] = {
    "minilm-l6": "Apache-2.0",
    "efficientnet-lite0": "Apache-2.0",
    "efficientnet-lite0-pixels": "Apache-2.0",  # EfficientNet-Lite0's weights; the thumbnail has none
    "whisper-base": "MIT",
    "resemblyzer-lstm": "Apache-2.0",
    "pixels": "no weights",
    "small-cnn": "random init (no weights)",
    "tiny-text": "random init (no weights)",
    "tiny-image": "random init (no weights)",
    "tiny-whisper": "random init (no weights)",
    "tiny-wav2vec2": "random init (no weights)",
    "tiny-torchaudio-wav2vec2": "random init (no weights)",
    "mel-cnn": "random init (no weights)",
}


def licence_of(encoder_name: str) -> str:
    """Licence of an encoder's pretrained weights, or a pointer to the upstream model."""
    return ENCODER_LICENCES.get(encoder_name, "see the upstream model")


#: licences an Apache-2.0 model may build on (the weights it stores or references)
_PERMISSIVE = {"Apache-2.0", "MIT", "no weights", "random init (no weights)"}
_PIPELINE = {("text",): "text-classification", ("image",): "image-classification",
             ("audio",): "audio-classification"}


def card_metadata(doc: dict[str, Any], name: str = "model") -> dict[str, Any]:
    """The card's YAML metadata, in the Hugging Face Hub's model-card conventions, from a ``config.json`` dict.

    ``license`` is ``apache-2.0`` (fusion-zoo's) when every encoder the model stores or references carries a
    permissive licence (Apache-2.0, MIT, no weights), else ``other`` (see the Encoders table). ``pipeline_tag`` is
    set for single-modality classifiers only: the Hub has no tag for fused text/image/audio classification.
    ``model-index`` holds the fused test metrics when they were recorded.
    """
    model = doc.get("model") or {}
    modalities = tuple(sorted(model.get("encoders") or {}))
    names = [str(rec.get("name")) for rec in (doc.get("encoders") or {}).values()]
    meta: dict[str, Any] = {
        "library_name": "fusion-zoo",
        "license": "apache-2.0" if all(licence_of(n) in _PERMISSIVE for n in names) else "other",
        "tags": ["fusion-zoo", "multimodal-fusion", *modalities, f"{model.get('stage')}-fusion",
                 f"{model.get('fusion_head')}-head"],
    }
    task = model.get("task")
    pipeline = _PIPELINE.get(modalities) if task in ("multiclass", "multilabel") else None
    if pipeline:
        meta["pipeline_tag"] = pipeline
    dataset = doc.get("dataset")
    hub_dataset = isinstance(dataset, str) and "/" in dataset and " " not in dataset
    if hub_dataset:
        meta["datasets"] = [dataset]
    test = ((doc.get("metrics") or {}).get("test") or {}).get("fused") or {}
    scores = [{"type": k, "value": round(float(v), 4), "name": f"test {k} (fused)"}
              for k, v in sorted(test.items()) if k in ("accuracy", "f1", "macro_f1", "mae", "rmse", "auroc")
              and isinstance(v, (int, float))]
    if scores:
        meta["metrics"] = [s["type"] for s in scores]
        kind = "regression" if task == "regression" else "classification"
        task_type = pipeline or f"{'-'.join(modalities)}-{kind}"
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": task_type, "name": f"{task} from {'+'.join(modalities)}"},
            "dataset": {"name": str(dataset or "custom"), "type": str(dataset) if hub_dataset else "custom"},
            "metrics": scores}]}]
    return meta


def with_metadata(card: str, meta: dict[str, Any]) -> str:
    """``card`` (markdown) with ``meta`` as its YAML front matter (replacing one it already has)."""
    body = card
    if card.startswith("---\n"):
        end = card.find("\n---\n", 4)
        if end != -1:
            body = card[end + 5:].lstrip("\n")
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table of ``{split: {group: {metric: value}}}`` (also accepts ``{split: {metric: value}}``)."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for split, groups in sorted(metrics.items()):
        if not isinstance(groups, dict):
            rows.append(("-", "-", {split: groups}))
            continue
        flat = {k: v for k, v in groups.items() if not isinstance(v, dict)}
        if flat:
            rows.append((split, "fused", flat))
        for group, values in groups.items():
            if isinstance(values, dict):
                rows.append((split, group, values))
    if not rows:
        return "_No metrics recorded._\n"
    columns = sorted({k for _, _, values in rows for k in values})
    lines = ["| split | inputs | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for split, group, values in rows:
        cells = [_fmt(values[c]) if c in values else "" for c in columns]
        lines.append(f"| {split} | {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_card(doc: dict[str, Any], *, notes: str | None = None, name: str = "model") -> str:
    """Markdown card from a checkpoint's ``config.json`` dict: YAML metadata (:func:`card_metadata`), then model,
    encoders, data, recipe, metrics, licences."""
    model = doc.get("model", {})
    encoders = doc.get("encoders", {})
    labels = model.get("labels", [])
    shown = ", ".join(map(str, labels[:12])) + (" …" if len(labels) > 12 else "")
    out = [
        f"# {name}",
        "",
        f"A fused {'/'.join(sorted(model.get('encoders', {})))} model from fusion-zoo: "
        f"**{model.get('stage')}** fusion with the **{model.get('fusion_head')}** head, "
        f"task **{model.get('task')}** over {len(labels)} output(s) ({shown}).",
        "",
        "```python",
        "from zoo import from_pretrained",
        f"model = from_pretrained({name!r})  # or the folder path",
        "```",
        "",
        "## Encoders",
        "",
        "| modality | encoder | options | fine-tuning | stored | weights licence |",
        "|---|---|---|---|---|---|",
    ]
    for m, rec in sorted(encoders.items()):
        out.append(f"| {m} | {rec.get('name')} | `{rec.get('options') or {}}` | {rec.get('finetune')} | "
                   f"{rec.get('stored')} | {licence_of(str(rec.get('name')))} |")
    out += [
        "",
        "Encoders stored by `reference` are rebuilt from the encoder registry and checked against the sha256 in "
        "config.json; `full` ones are in model.safetensors; `lora` ones store only their adapter weights.",
        "",
        "## Data",
        "",
        str(doc.get("dataset") or "Not recorded."),
        "",
        "## Training recipe",
        "",
    ]
    cmd = doc.get("recipe_command")
    out += (["```bash", str(cmd), "```"] if cmd else ["Not recorded."])
    seed = doc.get("seed")
    if seed is not None:
        out += ["", f"Seed: {seed}."]
    out += ["", "## Metrics", "", "Per split; `fused` is the model on all its inputs, a modality name is the model "
            "fed that modality alone.", "", metrics_table(doc.get("metrics") or {}).rstrip()]
    if notes:
        out += ["", "## Notes", "", notes]
    libs = doc.get("libraries") or {}
    if libs:
        out += ["", "## Saved with", "", ", ".join(f"{k} {v}" for k, v in sorted(libs.items()))]
    out += ["", f"Checkpoint format version {doc.get('format_version')} (docs/checkpoints.md).", ""]
    return with_metadata("\n".join(out), card_metadata(doc, name))
