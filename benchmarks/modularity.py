"""Modular fused models on real data (issue 32): ``python benchmarks/modularity.py [--data-dir DIR] [--seeds 3]``.

On cached encoder features (the feature cache ``fusion-zoo fit`` fills), with and without the modular objectives,
per seed: trains a default-recipe head (early fusion, concat), decomposes it into class modules (``--coverage``),
and measures

* ``decompose_cost``: test accuracy of the original minus that of all its modules composed (no calibration);
* ``module_share`` / ``overlap``: mean head-side weight share of a module, mean pairwise Jaccard of kept units
  (and ``weight_overlap``: of non-zero weights);
* ``reuse_gap``: a model trained on half of the classes alone minus the modules of those classes composed
  (calibrated on validation rows of those classes), with the compute ratio a user of shipped modules sees
  (training time / compose + calibrate time) and, apart, the one-time decomposition's (training / decompose);
* ``replace_gain``: a model trained with one class at 5% of its rows, repaired with that class's module from a
  model trained on all rows (the swapped class calibrated on validation by the bounded rule,
  ``calibrate_replacement``, and for comparison by cross-entropy): the target class's accuracy gain and the
  largest change of another class's accuracy;
* ``train_overhead``: training time per epoch with the objectives over without, measured apart from the rest:
  plain and modular fits alternate (``--overhead-rounds``), and the median of the per-round ratios is kept, so
  that load from other processes falls on both sides alike (the load average is recorded with it).

Figures are merged into benchmarks/results.json (``modular_*`` keys; the others kept) and written up in
docs/modularity.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path
from statistics import mean, median
from typing import Any

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes.modular_cli import accuracy, predictions, relabel  # noqa: E402
from recipes.settings import OptimConfig  # noqa: E402
from recipes.sweep.features import cached_features  # noqa: E402
from recipes.sweep.train import CachedFeatureTask, SplitFeatures, feature_loader  # noqa: E402
from zoo.config import FusionModelConfig  # noqa: E402
from zoo.model import FusionModel  # noqa: E402
from zoo.modular import (  # noqa: E402
    calibrate,
    calibrate_replacement,
    compose,
    decompose,
    replace_module,
    unit_jaccard,
    weight_jaccard,
)

__all__ = ["TARGETS", "train", "run_seed", "overhead", "main"]

TARGETS = {"modular_decompose_cost": ("<=", 0.01), "modular_module_share": ("<=", 0.4),
           "modular_overlap": ("<=", 0.3), "modular_reuse_gap": ("<=", 0.02),
           "modular_replace_gain": (">=", 0.10), "modular_replace_other_change": ("<=", 0.01),
           "modular_reuse_compute_ratio": (">=", 10.0), "modular_train_overhead": ("<=", 1.3)}
DEFAULT_WEIGHTS = {"affinity": 1.0, "dispersion": 1.0, "compactness": 0.3}


def train(cfg: FusionModelConfig, data: SplitFeatures, val: SplitFeatures, seed: int, epochs: int,
          batch_size: int = 128) -> tuple[FusionModel, float]:
    """A head-only model trained on cached features; returns it (eval mode) and the seconds per epoch."""
    pl.seed_everything(seed, verbose=False)
    task = CachedFeatureTask(cfg.to_dict(), data.embed_dims, OptimConfig())
    task.model.fit_feature_norm(data.feats)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         gradient_clip_val=1.0)
    start = time.perf_counter()
    trainer.fit(task, train_dataloaders=feature_loader(data, batch_size, True, seed))
    return task.model.eval(), (time.perf_counter() - start) / epochs


def per_class(model: FusionModel, split: SplitFeatures) -> list[float]:
    """Test accuracy of each class [C]."""
    pred, y = predictions(model, split.feats), split.labels.long()
    return [float((pred[y == c] == c).float().mean()) if bool((y == c).any()) else float("nan")
            for c in range(model.config.num_outputs)]


def _subsample(split: SplitFeatures, label: int, share: float, seed: int) -> SplitFeatures:
    g = torch.Generator().manual_seed(seed)
    y = split.labels.long()
    rows = (y == label).nonzero().flatten()
    keep_l = rows[torch.randperm(len(rows), generator=g)[: max(1, int(share * len(rows)))]]
    keep = torch.cat([(y != label).nonzero().flatten(), keep_l]).sort().values
    return SplitFeatures({m: f.index(keep) for m, f in split.feats.items()}, y[keep])


def overhead(cfg: FusionModelConfig, weights: dict[str, float], data: SplitFeatures, rounds: int, epochs: int
             ) -> dict[str, Any]:
    """Epoch time with the objectives over without: ``rounds`` alternating plain / modular fits of ``epochs``
    epochs each; the median per-round ratio, the per-round seconds and the load average before and after."""
    load_before = os.getloadavg()
    plain, modular = [], []
    for r in range(rounds):
        plain.append(train(cfg, data, data, r, epochs)[1])
        modular.append(train(cfg.replace(modularity=weights), data, data, r, epochs)[1])
    return {"ratio": median(m / p for m, p in zip(modular, plain, strict=True)), "plain_epoch_s": plain,
            "modular_epoch_s": modular, "rounds": rounds, "epochs": epochs,
            "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())}}


def _other_rows_change(weak: FusionModel, repaired: FusionModel, split: SplitFeatures, target: int) -> float:
    """Accuracy change on the rows of every class but ``target``, together (per class, one test row can be
    several points)."""
    y = split.labels.long()
    rows = y != target
    before, after = predictions(weak, split.feats)[rows], predictions(repaired, split.feats)[rows]
    return float((after == y[rows]).float().mean() - (before == y[rows]).float().mean())


def layer_overlap(modules: list[Any]) -> dict[str, float]:
    """Mean pairwise Jaccard of kept units, per unit layer."""
    return {layer: mean(unit_jaccard(modules, [layer])) for layer in sorted(modules[0].masks)}


def tradeoff(model: FusionModel, va: SplitFeatures, te: SplitFeatures, coverages: list[float],
             weight_coverage: float | None, rules: tuple[str, ...] = ("all",)) -> dict[str, dict[str, Any]]:
    """Module share, unit overlap (all layers and per layer) and decompose cost at each unit ``coverages`` and
    each rule of choosing a class's units (``rules``: decompose's ``rows``; keys ``"<coverage>"`` for "all",
    ``"<coverage>/<rule>"`` for the others), on one trained model."""
    acc = accuracy(model, te)
    out = {}
    for rule in rules:
        for cov in coverages:
            modules = decompose(model, va.feats, cov, weight_coverage=weight_coverage, rows=rule)
            out[str(cov) if rule == "all" else f"{cov}/{rule}"] = {
                "module_share": mean(float(m.stats["weight_share"]) for m in modules),
                "overlap": mean(unit_jaccard(modules)), "layer_overlap": layer_overlap(modules),
                "weight_coverage": float(modules[0].stats["weight_coverage"]),
                "hidden_coverage": float(modules[0].stats["hidden_coverage"]),
                "decompose_cost": acc - accuracy(compose(modules, with_encoders=False), te)}
    return out


def run_seed(fs: Any, cfg: FusionModelConfig, seed: int, epochs: int, coverage: float,
             weight_coverage: float | None = None, coverages: list[float] | None = None,
             rules: tuple[str, ...] = ("all",)) -> dict[str, Any]:
    """Every figure for one seed and one config (with or without the objectives); ``coverages``: also the
    share / overlap / cost trade-off at those unit coverages."""
    labels = list(cfg.labels)
    tr, va, te = fs.train, fs.val, fs.test
    model, epoch_s = train(cfg, tr, va, seed, epochs)
    t = time.perf_counter()
    modules = decompose(model, va.feats, coverage, weight_coverage=weight_coverage)
    decompose_s = time.perf_counter() - t
    composed = compose(modules, with_encoders=False)
    acc, acc_c = accuracy(model, te), accuracy(composed, te)
    # reuse: the first half of the classes; the compute a user spends is compose + calibrate (modules are
    # decomposed once and shipped), decomposition is timed apart
    sub = labels[: len(labels) // 2]
    tr_s, va_s, te_s = (relabel(s, sub) for s in (tr, va, te))
    t = time.perf_counter()
    alone, _ = train(cfg.replace(labels=tuple(sub)), tr_s, va_s, seed, epochs)
    sub_train_s = time.perf_counter() - t
    t = time.perf_counter()
    reused = compose([m for m in modules if m.label in sub], with_encoders=False)
    calibrate(reused, va_s.feats, va_s.labels)
    compose_s = time.perf_counter() - t
    # replacement: the last class under-represented; the swapped class calibrated by the bounded rule
    # (calibrate_replacement) and, for comparison, by cross-entropy
    target = len(labels) - 1
    weak, _ = train(cfg, _subsample(tr, target, 0.05, seed), va, seed, epochs)
    donor = modules[target]
    before = per_class(weak, te)
    repaired = replace_module(weak, labels[target], donor)
    calibrate(repaired, va.feats, va.labels, classes=[target])
    ce = per_class(repaired, te)
    ce_rows = _other_rows_change(weak, repaired, te, target)
    fit = calibrate_replacement(repaired, va.feats, va.labels, target, predictions(weak, va.feats))
    after = per_class(repaired, te)

    def other_change(x: list[float]) -> float:
        return max(abs(a - b) for i, (a, b) in enumerate(zip(x, before, strict=True)) if i != target)

    return {
        "accuracy": acc, "composed_accuracy": acc_c, "decompose_cost": acc - acc_c,
        "module_share": mean(float(m.stats["weight_share"]) for m in modules),
        "overlap": mean(unit_jaccard(modules)), "weight_overlap": mean(weight_jaccard(modules)),
        "layer_overlap": layer_overlap(modules),
        "weight_coverage": float(modules[0].stats["weight_coverage"]),
        "hidden_coverage": float(modules[0].stats["hidden_coverage"]),
        "reuse_gap": accuracy(alone, te_s) - accuracy(reused, te_s),
        "subset_train_s": sub_train_s, "compose_calibrate_s": compose_s, "decompose_s": decompose_s,
        "reuse_compute_ratio": sub_train_s / max(compose_s, 1e-9),
        "decompose_compute_ratio": sub_train_s / max(decompose_s, 1e-9),
        "replace_gain": after[target] - before[target],
        "replace_other_change": other_change(after),
        "replace_other_rows_change": _other_rows_change(weak, repaired, te, target),
        "replace_val_target_recall": fit["target_recall"],
        "replace_gain_ce": ce[target] - before[target], "replace_other_change_ce": other_change(ce),
        "replace_other_rows_change_ce": ce_rows,
        "epoch_seconds": epoch_s,
        **({"tradeoff": tradeoff(model, va, te, coverages, weight_coverage, rules)} if coverages else {}),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="a prepared folder (e.g. ~/.cache/fusion-zoo/easyvqa); "
                                                   "default: the bundled tridigits")
    p.add_argument("--columns", default=None, help='roles -> columns, JSON, e.g. {"text": "question", "label": '
                                                   '"answer"}')
    p.add_argument("--name", default="tridigits", help="the dataset's name in results.json")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--coverage", type=float, default=0.9)
    p.add_argument("--weight-coverage", type=float, default=None, help="default: chosen per model (decompose's "
                                                                       "weight_coverage=None)")
    p.add_argument("--overhead-rounds", type=int, default=5)
    p.add_argument("--tradeoff", default="", help="unit coverages to also measure share / overlap / cost at on "
                                                  "seed 0, comma-separated, e.g. 0.8,0.7,0.6")
    p.add_argument("--configs", default="plain,modular", help="which trainings to measure: plain, modular or both "
                                                              "(the headline figures need modular)")
    p.add_argument("--tradeoff-rows", default="all", help="rules choosing a class's units for the trade-off "
                                                          "(decompose's rows), comma-separated: all,own,own-hidden")
    p.add_argument("--no-write", action="store_true", help="print the figures, leave results.json alone")
    p.add_argument("--no-headline", action="store_true",
                   help="write only modular_<name> (the summary), not the headline modular_* figures")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data: dict[str, Any] = {"data_dir": args.data_dir} if args.data_dir else {"dataset": "tridigits"}
    if args.columns:
        data["columns"] = json.loads(args.columns)
    fs = cached_features(types.SimpleNamespace(data=data, model={}), False)
    if fs.val is None:
        raise SystemExit("the data has no validation split; modules are chosen and calibrated on it.")
    for split in (fs.train, fs.val, fs.test):
        split.names = list(fs.labels)  # what relabel maps from
    base = FusionModelConfig(encoders=fs.encoders, labels=tuple(fs.labels))
    results: dict[str, Any] = {}
    for name, weights in (("plain", None), ("modular", DEFAULT_WEIGHTS)):
        if name not in args.configs.split(","):
            continue
        covs = [float(x) for x in args.tradeoff.split(",") if x]
        rows = [run_seed(fs, base.replace(modularity=weights), s, args.epochs, args.coverage, args.weight_coverage,
                         covs if s == 0 else None, tuple(args.tradeoff_rows.split(","))) for s in range(args.seeds)]
        results[name] = {k: mean(r[k] for r in rows) for k in rows[0] if k not in ("tradeoff", "layer_overlap")}
        results[name]["layer_overlap"] = {k: mean(r["layer_overlap"][k] for r in rows)
                                          for k in rows[0]["layer_overlap"]}
        results[name]["per_seed"] = [{k: v for k, v in r.items() if k != "tradeoff"} for r in rows]
        if covs:
            results[name]["tradeoff_seed0"] = rows[0]["tradeoff"]
        print(name, json.dumps(results[name], indent=1), flush=True)
    mod, plain = results.get("modular", {}), results.get("plain", {})
    cost = overhead(base, DEFAULT_WEIGHTS, fs.train, args.overhead_rounds, 3)
    print("overhead", json.dumps(cost), flush=True)
    summary = {"dataset": args.name, "seeds": args.seeds, "epochs": args.epochs, "coverage": args.coverage,
               "weight_coverage": args.weight_coverage, "weights": DEFAULT_WEIGHTS, "plain": plain, "modular": mod,
               "accuracy_change": mod["accuracy"] - plain["accuracy"] if mod and plain else None, "overhead": cost,
               "host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    values = {f"modular_{args.name}": summary, **({
        "modular_decompose_cost": mod["decompose_cost"], "modular_module_share": mod["module_share"],
        "modular_overlap": mod["overlap"], "modular_reuse_gap": mod["reuse_gap"],
        "modular_replace_gain": mod["replace_gain"], "modular_replace_other_change": mod["replace_other_change"],
        "modular_reuse_compute_ratio": mod["reuse_compute_ratio"],
        "modular_train_overhead": cost["ratio"],
    } if mod else {})}
    print(json.dumps({k: v for k, v in values.items() if not k.startswith("modular_" + args.name)}, indent=1))
    if args.no_headline:
        values = {f"modular_{args.name}": summary}
    if not args.no_write:
        from benchmarks.easyvqa import merge_results

        merge_results(values, targets=TARGETS)
    return values


if __name__ == "__main__":
    main()
