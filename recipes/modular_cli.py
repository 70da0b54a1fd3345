"""``fusion-zoo decompose | compose | replace``: per-class modules of fused models on the command line.

The core is ``zoo.modular``; this module adds the data (features from the feature cache, as ``fit`` and the sweep
read them) and the flags. Imported by ``recipes.cli`` only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
import types
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from encoders import ModalityOutput
from fusion_common.atomic import atomic_write
from fusion_errors import ConfigError, DataError
from zoo.model import FusionModel
from zoo.modular import (
    ClassModule,
    ModuleError,
    as_modules,
    calibrate,
    calibrate_replacement,
    compose,
    decompose,
    load_module,
    replace_module,
    save_module,
    unit_jaccard,
    weight_jaccard,
)

from .sweep.train import SplitFeatures

__all__ = ["main", "split_features", "accuracy"]

SPLITS = ("train", "val", "test")


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fusion-zoo {command}")
    if command == "decompose":
        p.add_argument("model", help="a fused model folder or zoo name (multiclass, frozen encoders)")
        p.add_argument("--coverage", type=float, default=0.9,
                       help="share of each layer's attribution a module keeps (1.0: every unit used; default 0.9)")
        p.add_argument("--weight-coverage", type=_weight_coverage, default=None,
                       help="share of each weight matrix's attribution a module keeps; the rest is pruned to zero "
                            "(1.0: no weight pruning; default auto: the most pruning that keeps 99%% of the "
                            "model's predictions on --split, docs/modularity.md)")
        p.add_argument("--hidden-coverage", type=_weight_coverage, default=None,
                       help="--coverage of the hidden activation layers (head_hidden, trunk_hidden); default auto: "
                            "the fewest units from --coverage up that keep 99%% of the model's predictions")
        p.add_argument("--split", choices=SPLITS, default="train", help="rows whose activations choose the units")
        p.add_argument("--rows", choices=("all", "own", "own-hidden"), default="all",
                       help="which of those rows choose a class's units: all (default; keeps the units that hold "
                            "the class's score down elsewhere), own (the rows predicted as the class, MODA's rule) "
                            "or own-hidden (own on the hidden activation layers only); docs/modularity.md")
    elif command == "compose":
        p.add_argument("modules", nargs="+", help="module folders written by fusion-zoo decompose")
    else:
        p.add_argument("model", help="the fused model to repair")
        p.add_argument("--label", required=True, help="the class whose module is replaced")
        p.add_argument("--from", dest="source", required=True,
                       help="a module folder (fusion-zoo decompose) or a fused model whose class --label is used")
    p.add_argument("--output", required=True, help="folder to write")
    data = p.add_argument_group("data (decompose: required; compose/replace: optional, calibrates the scores)")
    data.add_argument("--data.dataset", dest="dataset", default=None, help="a registered dataset, e.g. tridigits")
    data.add_argument("--data.data_dir", dest="data_dir", default=None, help="a folder of csv/parquet tables")
    data.add_argument("--data.columns", dest="columns", default=None, help='roles -> columns, JSON: {"text": "q"}')
    data.add_argument("--data.max_samples", dest="max_samples", type=int, default=None, help="rows per split")
    data.add_argument("--data.cache_dir", dest="cache_dir", default=None, help="the feature cache folder")
    return p


def _weight_coverage(text: str) -> float | None:
    """``auto`` (None) or a number in (0, 1]."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1] or 'auto'") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1] (1.0: no pruning; or 'auto')")
    return value


def _data_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    data = {k: getattr(args, k) for k in ("dataset", "data_dir", "max_samples", "cache_dir")
            if getattr(args, k) is not None}
    if args.columns is not None:
        try:
            data["columns"] = json.loads(args.columns)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--data.columns {args.columns!r} is not JSON ({e}); e.g. '{{\"text\": \"q\"}}'.") from e
    return data or None


def split_features(model: FusionModel | ClassModule, data: dict[str, Any]) -> dict[str, SplitFeatures]:
    """Train / val / test features of ``data`` (FusionDataModule settings) for the encoders ``model`` reads,
    from the feature cache; labels are the data's own names, kept under ``labels_names``."""
    from .sweep.features import cached_features

    cfg = model.config if isinstance(model, FusionModel) else model.model.config
    specs = {m: {"name": s.name, "options": dict(s.options)} for m, s in cfg.encoders.items()}
    settings = types.SimpleNamespace(data=dict(data), model={"encoders": specs, "task": cfg.task})
    fs = cached_features(settings, cfg.needs_tokens)
    out = {"train": fs.train, "test": fs.test, **({"val": fs.val} if fs.val is not None else {})}
    for split in out.values():
        split.names = list(fs.labels)  # type: ignore[attr-defined]
    return out


def relabel(split: SplitFeatures, labels: Sequence[str]) -> SplitFeatures:
    """The rows of ``split`` whose class is one of ``labels``, re-indexed to ``labels``' order."""
    names = list(getattr(split, "names", labels))
    to_new = torch.tensor([list(labels).index(n) if n in labels else -1 for n in names])
    y = to_new[split.labels.long()]  # [N]
    keep = (y >= 0).nonzero().flatten()
    if keep.numel() == 0:
        raise DataError(f"the data has none of the classes {list(labels)}; give data with those labels.")
    return SplitFeatures({m: f.index(keep) for m, f in split.feats.items()}, y[keep])


@torch.no_grad()
def predictions(model: FusionModel, feats: dict[str, ModalityOutput], batch_size: int = 1024) -> torch.Tensor:
    """Predicted class indices [N] of ``model`` on cached features."""
    model.eval()
    n = int(next(iter(feats.values())).pooled.shape[0])
    return torch.cat([model.fuse({m: f.index(torch.arange(s, min(n, s + batch_size))) for m, f in feats.items()})
                      .logits.argmax(-1) for s in range(0, n, batch_size)])


def accuracy(model: FusionModel, split: SplitFeatures) -> float:
    """Multiclass accuracy of ``model`` on ``split``."""
    return float((predictions(model, split.feats) == split.labels.long()).float().mean())


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")


def _decompose(args: argparse.Namespace, data: dict[str, Any] | None) -> int:
    if data is None:
        data = {"dataset": "tridigits"}
    model = FusionModel.from_pretrained(args.model)
    splits = {k: relabel(v, model.config.labels) for k, v in split_features(model, data).items()}
    if args.split not in splits:
        raise DataError(f"the data has no {args.split} split; use --split train.")
    modules = decompose(model, splits[args.split].feats, args.coverage, source=str(args.model),
                        weight_coverage=args.weight_coverage, rows=args.rows,
                        hidden_coverage=args.hidden_coverage)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for mod in modules:
        save_module(mod, out / _safe(mod.label))
    composed = compose(modules, with_encoders=False)
    test = splits["test"]
    report = {"model": str(args.model), "coverage": args.coverage, "rows": args.rows,
              "weight_coverage": modules[0].stats["weight_coverage"],
              "hidden_coverage": modules[0].stats["hidden_coverage"],
              "split": args.split,
              "modules": {m.label: {"folder": _safe(m.label), "weight_share": m.stats.get("weight_share"),
                                    "units": m.stats["units"]} for m in modules},
              "mean_weight_share": mean(float(m.stats.get("weight_share", 0.0)) for m in modules),
              "mean_jaccard": mean(unit_jaccard(modules)) if len(modules) > 1 else 0.0,
              "layer_jaccard": {k: mean(unit_jaccard(modules, [k])) for k in sorted(modules[0].masks)}
              if len(modules) > 1 else {},
              "mean_weight_jaccard": mean(weight_jaccard(modules)) if len(modules) > 1 else 0.0,
              "test_accuracy_original": accuracy(model, test), "test_accuracy_composed": accuracy(composed, test)}
    _write_json(out / "decomposition.json", report)
    print(f"{len(modules)} modules in {out}: mean weight share {report['mean_weight_share']:.3f}, mean Jaccard "
          f"{report['mean_jaccard']:.3f}; test accuracy composed {report['test_accuracy_composed']:.4f} vs "
          f"original {report['test_accuracy_original']:.4f}")
    for m in modules:
        print(f"  {m.label:<20} weights {float(m.stats.get('weight_share', 0.0)):.3f}  units {m.stats['units']}")
    return 0


def _safe(label: str) -> str:
    """A folder name for a label."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label) or "_"


def _calibrated(model: FusionModel, data: dict[str, Any] | None) -> str:
    """Calibrate every column of the composed ``model`` on the data's validation split (train when there is
    none); returns a note."""
    if data is None:
        return "uncalibrated (raw module logits; pass --data.* to calibrate on a validation split)"
    splits = split_features(model, data)
    split = "val" if "val" in splits else "train"
    fit = calibrate(model, relabel(splits[split], model.config.labels).feats,
                    relabel(splits[split], model.config.labels).labels)
    test = relabel(splits["test"], model.config.labels)
    return (f"calibrated on {split} (accuracy {fit['val_accuracy_before']:.4f} -> {fit['val_accuracy_after']:.4f}); "
            f"test accuracy {accuracy(model, test):.4f}")


def _calibrated_replacement(repaired: FusionModel, model: FusionModel, label: str, data: dict[str, Any] | None
                            ) -> str:
    """Calibrate the swapped-in class of ``repaired`` on the validation split (train when there is none) by the
    bounded rule (``zoo.modular.calibrate_replacement``: no other class loses more than half a point of its
    validation accuracy against ``model``); returns a note."""
    if data is None:
        return "uncalibrated (raw module logits; pass --data.* to calibrate on a validation split)"
    splits = split_features(model, data)
    split = "val" if "val" in splits else "train"
    rows = relabel(splits[split], model.config.labels)
    target = list(repaired.config.labels).index(label)
    fit = calibrate_replacement(repaired, rows.feats, rows.labels, target, predictions(model, rows.feats))
    test = relabel(splits["test"], model.config.labels)
    return (f"{label!r} calibrated on {split} (scale {fit['scale']:.3g}, bias {fit['bias']:.3g}; its recall "
            f"{fit['target_recall']:.4f}, accuracy {fit['val_accuracy_before']:.4f} -> "
            f"{fit['val_accuracy_after']:.4f}, no other class down more than 0.5 points); test accuracy "
            f"{accuracy(repaired, test):.4f}")


def _compose(args: argparse.Namespace, data: dict[str, Any] | None) -> int:
    modules = [load_module(p) for p in args.modules]
    model = compose(modules)
    note = _calibrated(model, data)
    model.save_pretrained(args.output, notes=f"Composed of {len(modules)} modules ({note}); docs/modularity.md.")
    print(f"composed {len(modules)} modules ({', '.join(model.config.labels)}) into {args.output}: {note}")
    return 0


def _replace(args: argparse.Namespace, data: dict[str, Any] | None) -> int:
    model = FusionModel.from_pretrained(args.model)
    source = Path(args.source)
    if (source / "config.json").is_file() and '"fusion-zoo-module"' in (source / "config.json").read_text():
        new = load_module(source)
    else:
        other = FusionModel.from_pretrained(args.source)
        found = [m for m in as_modules(other, str(args.source)) if m.label == args.label]
        if not found:
            raise ModuleError(f"{args.source} has no class {args.label!r}; its labels are {list(other.config.labels)}.")
        new = found[0]
    repaired = replace_module(model, args.label, new, source=str(args.model))
    note = _calibrated_replacement(repaired, model, args.label, data)
    repaired.save_pretrained(args.output, notes=f"{args.model} with class {args.label!r} from {args.source} "
                                                f"({note}); docs/modularity.md.")
    print(f"replaced {args.label!r} with the module from {args.source}: {args.output} ({note})")
    return 0


def main(command: str, argv: Sequence[str]) -> int:
    """Run ``decompose``, ``compose`` or ``replace`` with ``argv`` (the flags after the command)."""
    args = _parser(command).parse_args(list(argv))
    data = _data_settings(args)
    return {"decompose": _decompose, "compose": _compose, "replace": _replace}[command](args, data)
