"""README's results table, rendered from benchmarks/results.json: ``python benchmarks/readme_table.py``.

The table sits between ``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md. The scripts that
measure (``run.py``, ``easyvqa.py``, ``heldout_speakers.py``, ``small_data.py``) write results.json; this script
copies their figures into README, and ``tests/test_readme.py`` fails when README and results.json disagree.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion_common.atomic import atomic_write  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results.json"
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"

#: README's headline rows: results.json key -> what it measures; below them every missed target gets a row too
ROWS: dict[str, str] = {
    "easyvqa_test_accuracy": "easy-VQA, full test split, bare `fit` (cold cache)",
    "easyvqa_seconds": "... its wall time, encoding and encoder probe included (s)",
    "easyvqa_small_test_accuracy": "easy-VQA, 7,000 training rows, full test split",
    "small_data_test_accuracy": "easy-VQA, 400 training rows (mean of 3 seeds)",
    "heldout_speakers_test_accuracy": "held-out-speakers proxy (audio + image)",
    "main_job_seconds": "main job `fusion-zoo fit`, cold cache (s)",
    "cached_step_overhead": "fit's step on cached features / a bare PyTorch step",
}


def _fmt(value: Any) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        if value and abs(value) < 1e-3:
            return f"{value:.2g}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def render(results: dict[str, Any]) -> str:
    """The markdown table: the headline rows, then every other target that was missed, then one line naming the
    targets met and the ones not measured (each key's definition is in docs/benchmarks.md)."""
    targets, met = results.get("targets", {}), results.get("met", {})
    others = sorted(k for k in targets if k not in ROWS)
    missed = [k for k in others if results.get(k) is not None and met.get(k) is False]
    keys = [k for k in ROWS if k in results] + missed
    lines = ["| figure | measured | target | met |", "|---|---|---|---|"]
    for key in keys:
        t = targets.get(key)
        target = f"{t['op']} {t['value']:g}" if t else ""
        ok = {True: "yes", False: "**no**", None: ""}[met.get(key)]
        lines.append(f"| {ROWS.get(key, f'`{key}`')} | {_fmt(results[key])} | {target} | {ok} |")
    passed = [k for k in others if results.get(k) is not None and met.get(k) is True]
    unmeasured = [k for k in others if results.get(k) is None]
    lines.append("")
    lines.append(f"Also met: {len(passed)} more targets ({', '.join(f'`{k}`' for k in passed)})"
                 + (f"; not measured yet: {', '.join(f'`{k}`' for k in unmeasured)}" if unmeasured else "") + ".")
    return "\n".join(lines)


def block(text: str) -> str | None:
    """README's current table (between the markers), or None when the markers are missing."""
    found = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.S)
    return found.group(1).rstrip("\n") if found else None


def sync(readme: Path = README, results: Path = RESULTS) -> bool:
    """Rewrite README's table from results.json; returns whether README changed."""
    text = readme.read_text()
    if block(text) is None:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    new = re.sub(re.escape(START) + r"\n.*?" + re.escape(END),
                 lambda _: f"{START}\n{render(json.loads(results.read_text()))}\n{END}", text, flags=re.S)
    if new != text:
        with atomic_write(readme) as tmp:
            tmp.write_text(new)
    return new != text


if __name__ == "__main__":
    print("README.md updated" if sync() else "README.md already current")
    sys.exit(0)
