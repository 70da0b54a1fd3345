"""Sweep results: ``results.csv`` (one row per cell), ``results.md`` (mean ± 95% CI, paired tests vs concat)
and the figures (``accuracy.png``, ``robustness.png``, ``gates_<stage>_<head>.png``)."""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion_common.atomic import atomic_write
from recipes import plots

from .stats import format_mean_ci, paired_ttest, summarize

__all__ = ["cell_row", "write_results"]

BASELINE = "concat"


def cell_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten one cell record into a CSV row: fused_*, alone_*, rob_*, params, seconds, latency."""
    row: dict[str, Any] = {"head": rec["head"], "stage": rec["stage"], "seed": rec["seed"]}
    row |= {f"fused_{k}": v for k, v in rec["fused"].items()}
    row |= {f"alone_{m}": v for m, v in sorted(rec["alone"].items())}
    row |= {f"rob_{k}": v for k, v in rec["robustness"].items()}
    row |= {"params": rec["params"], "train_seconds": round(rec["train_seconds"], 3),
            "latency_ms": round(rec["latency_ms"], 4), "best_epoch": rec.get("best_epoch", "")}
    return row


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in columns})
    return buf.getvalue()


def _by_seed(rows: Sequence[Mapping[str, Any]], head: str, stage: str, column: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[column]) for r in rows
            if r["head"] == head and r["stage"] == stage and r.get(column) not in (None, "")}


def _cell(rows: Sequence[Mapping[str, Any]], head: str, stage: str, column: str, digits: int = 3) -> str:
    vals = list(_by_seed(rows, head, stage, column).values())
    return format_mean_ci(summarize(vals), digits) if vals else "-"


def _num(value: float, digits: int) -> str:
    """``value`` to ``digits`` decimals; "n/a" when undefined (NaN or infinite)."""
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def write_results(
    out_dir: Path,
    records: Sequence[Mapping[str, Any]],
    heads: Sequence[str],
    stages: Sequence[str],
    modalities: Sequence[str],
    metric: str,
    header: Mapping[str, Any],
) -> dict[str, Path]:
    """Write results.csv, results.md and the plots for ``records`` (finished cells); returns the paths."""
    rows = [cell_row(r) for r in sorted(records, key=lambda r: (heads.index(r["head"]), stages.index(r["stage"]),
                                                                  r["seed"]))]
    paths = {"csv": out_dir / "results.csv", "md": out_dir / "results.md"}
    with atomic_write(paths["csv"]) as tmp:
        tmp.write_text(_csv(rows))
    cells = [(h, s) for h in heads for s in stages if _by_seed(rows, h, s, f"fused_{metric}")]
    lines = [f"# Sweep results ({header.get('dataset', '')})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines += [f"Test {metric}: mean ± 95% CI over seeds (Student t, n-1 degrees of freedom). `alone:<m>` is the "
              "fused model fed that modality only. Params: trainable head-side parameters (encoders frozen, "
              "not counted). Latency: median single-sample forward of the head side on cached features. Epoch "
              "kept: per seed, the epoch whose weights were evaluated (lowest validation loss).", ""]
    head_cols = [f"fused {metric}", *(f"alone:{m}" for m in modalities), "params", "train s", "latency ms",
                 "epoch kept"]
    body = []
    for h, s in cells:
        sel = [r for r in rows if r["head"] == h and r["stage"] == s]
        body.append([h, s, str(len(sel)), _cell(rows, h, s, f"fused_{metric}"),
                     *(_cell(rows, h, s, f"alone_{m}") for m in modalities),
                     f"{int(sel[0]['params']):,}", _cell(rows, h, s, "train_seconds", 1),
                     _cell(rows, h, s, "latency_ms", 2),
                     ", ".join(str(r["best_epoch"]) for r in sel if r.get("best_epoch") != "")])
    lines += _table(["head", "stage", "seeds", *head_cols], body) + [""]
    lines += [f"## Paired comparison against `{BASELINE}` at the same stage", "",
              f"Paired t-test over matched seeds of the fused {metric} (two-sided, alpha 0.05).", ""]
    body = []
    for h, s in cells:
        if h == BASELINE:
            continue
        a, b = _by_seed(rows, h, s, f"fused_{metric}"), _by_seed(rows, BASELINE, s, f"fused_{metric}")
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        t = paired_ttest([a[k] for k in seeds], [b[k] for k in seeds])
        body.append([h, s, str(t.n), f"{t.mean_diff:+.4f}", _num(t.t, 3), _num(t.p_value, 4),
                     "n/a (one seed)" if t.n < 2 else t.verdict])
    lines += _table(["head", "stage", "pairs", f"Δ {metric} vs {BASELINE}", "t", "p", "verdict"], body) + [""]
    rob_cols = [c for c in rows[0] if c.startswith("rob_")] if rows else []
    rob = {f"{h}@{s}": {c[4:]: float(np.mean(list(_by_seed(rows, h, s, c).values()))) for c in rob_cols}
           for h, s in cells}
    lines += ["## Robustness (mean over seeds)", "",
              "Conditions: `only:<subset>` = the other modalities absent; `<m>_noise@s` = Gaussian noise of s × the "
              "feature std in feature space; `text_drop@p` = fraction p of text tokens dropped from the mask "
              "(feature noise on pooled-only caches); see docs/sweeps.md.", ""]
    lines += _table(["cell", *(c[4:] for c in rob_cols)],
                    [[k, *(f"{v[c[4:]]:.3f}" for c in rob_cols)] for k, v in rob.items()]) + [""]
    with atomic_write(paths["md"]) as tmp:
        tmp.write_text("\n".join(lines))
    means = {(h, s): summarize(list(_by_seed(rows, h, s, f"fused_{metric}").values())) for h, s in cells}
    paths["accuracy"] = plots.accuracy_bars({k: v.mean for k, v in means.items()},
                                            {k: v.half_width for k, v in means.items()},
                                            [h for h in heads if any(c[0] == h for c in cells)], stages,
                                            out_dir / "accuracy.png", metric)
    if rob:
        paths["robustness"] = plots.robustness_heatmap(rob, out_dir / "robustness.png", metric)
    paths |= _gate_plots(out_dir, records, cells, header.get("labels"))
    return paths


def _gate_plots(out_dir: Path, records: Sequence[Mapping[str, Any]], cells: Sequence[tuple[str, str]],
                labels: Sequence[str] | None) -> dict[str, Path]:
    out = {}
    for h, s in cells:
        gates = [r["gates"] for r in records if r["head"] == h and r["stage"] == s and r.get("gates")]
        if not gates:
            continue
        mat = np.nanmean(np.array([g["matrix"] for g in gates], dtype=float), axis=0)  # [C, K]
        rows = list(labels) if labels and len(labels) == mat.shape[0] else [str(i) for i in range(mat.shape[0])]
        what = "gate weight" if gates[0]["key"] == "gates" else "expert routing probability"
        title = f"{h}@{s}: mean {what} per class ({len(gates)} seed{'s' if len(gates) > 1 else ''})"
        stem = f"gates_{s}_{re.sub(r'[^A-Za-z0-9_.=-]+', '-', h)}"  # a head variant's colons left out of file names
        out[stem] = plots.heatmap(mat, [f"class {r}" for r in rows], gates[0]["columns"], out_dir / f"{stem}.png",
                                  title=title)
    return out


def fmt_seconds(seconds: float) -> str:
    """``"4m 12s"``."""
    return f"{int(seconds // 60)}m {seconds % 60:.0f}s" if seconds >= 60 else f"{seconds:.1f}s"
