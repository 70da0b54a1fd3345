"""The model card (``README.md``) written next to every fused checkpoint."""

from __future__ import annotations

from typing import Any

__all__ = ["ENCODER_LICENCES", "licence_of", "render_card", "metrics_table"]

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
    """Markdown card from a checkpoint's ``config.json`` dict: model, encoders, data, recipe, metrics, licences."""
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
    return "\n".join(out)
