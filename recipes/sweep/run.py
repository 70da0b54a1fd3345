"""``fusion-zoo sweep``: a grid of fusion heads × stages × seeds on cached encoder features, resumable.

Encoder features are computed once through the feature cache (recipes/sweep/features.py); every cell trains only
the head side. Each finished cell is appended to ``<output-dir>/cells.jsonl`` as one JSON line; a rerun skips the
cells already there (same settings) and finishes only the missing ones. See docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from encoders import check_options
from fusion_errors import ConfigError
from recipes.recipe import load_recipe
from recipes.settings import OptimConfig
from recipes.task import FusionTask
from zoo.config import FusionModelConfig, check_known_keys, field_defaults

from .features import FeatureSet
from .pool import CellJob, resolve_jobs, run_cells
from .report import fmt_seconds, write_results
from .robustness import DEFAULT_NOISE, DEFAULT_TOKEN_DROP, primary_metric
from .train import CELL_PROTOCOL

__all__ = ["SweepSettings", "FeatureSet", "run_sweep", "parse_args", "main", "DEFAULT_HEADS", "DEFAULT_STAGES"]

DEFAULT_HEADS = ("concat", "average", "cross_attention", "gating", "moe")
DEFAULT_STAGES = ("early", "late", "hybrid")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_EPOCHS = 6
DEFAULT_BATCH = 64
_MODEL_FIELDS = {f.name for f in dataclasses.fields(FusionModelConfig)} - {"format_version", "labels"}
_OPTIM_FIELDS = {f.name for f in dataclasses.fields(OptimConfig)}
_GRID_KEYS = ("fusion_head", "stage")  # the grid's --heads / --stages replace the recipe's values
_FIT_ONLY = ("init_from", "train_only_head", "config")  # a cell is a new head-only model: these cannot apply


@dataclass
class SweepSettings:
    """Everything that defines a sweep (its hash decides which finished cells a rerun may reuse)."""

    heads: list[str] = field(default_factory=lambda: list(DEFAULT_HEADS))
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    output_dir: str = "runs/sweep"
    max_epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    noise: list[float] = field(default_factory=lambda: list(DEFAULT_NOISE))
    token_drop: list[float] = field(default_factory=lambda: list(DEFAULT_TOKEN_DROP))
    #: processes training cells at once (0: one per available core); results do not depend on it
    jobs: int = 1

    def signature(self) -> str:
        """Hash of what changes a cell's result (not the grid axes or the output folder)."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("heads", "stages", "seeds", "output_dir", "jobs")}
        keep["protocol"] = CELL_PROTOCOL  # cells of an older protocol are run again, not mixed in
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


FeatureProvider = Callable[[SweepSettings, bool], FeatureSet]  # (settings, need_tokens) -> features
"""Returns train/test features; with ``need_tokens`` False the features may hold pooled vectors only."""


def _cell_key(head: str, stage: str, seed: int) -> str:
    return f"{head}@{stage}@seed{seed}"


def read_cells(path: Path, signature: str) -> dict[str, dict[str, Any]]:
    """Finished cells in ``cells.jsonl`` with this ``signature``; a torn last line (killed mid-write) is ignored."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("signature") == signature and "key" in rec:
            done[rec["key"]] = rec
    return done


def append_cell(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single ``write`` on an O_APPEND descriptor, then fsync."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and not path.read_bytes().endswith(b"\n"):
            data = b"\n" + data  # a previous run was killed mid-line: start on a fresh line
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def split_model_settings(model: Mapping[str, Any]) -> tuple[dict[str, Any], OptimConfig]:
    """A recipe's ``model:`` section -> (FusionModelConfig keyword values, OptimConfig), checked.

    Keys are FusionTask's flags: an unknown one raises ConfigError naming the closest (``--model.hidden_dimm``
    -> ``--model.hidden_dim``); a fit-only one with a value raises; None (or left out) means the config's default.
    """
    check_known_keys(model, inspect.signature(FusionTask).parameters, "the sweep's model settings", "--model.")
    for key in _FIT_ONLY:
        if model.get(key) is not None:
            raise ConfigError(f"--model.{key} does not apply to a sweep: every cell trains a new head-only model on "
                              f"cached features; drop it (or run fusion-zoo fit).")
    given = {k: v for k, v in model.items() if v is not None}
    optim = OptimConfig.from_dict({k: v for k, v in given.items() if k in _OPTIM_FIELDS}, "--model")
    config = {k: v for k, v in given.items() if k in _MODEL_FIELDS and k not in _GRID_KEYS}
    return config, optim


def parse_head(label: str) -> tuple[str, dict[str, Any]]:
    """A ``--heads`` entry -> (registered head name, its options): ``gating`` or ``gating:floor=0.5`` (options
    after colons, values read as YAML: ``moe:num_experts=8:top_k=2``), so one sweep can compare variants of a
    head. The label itself names the cell and its row in the results."""
    from fusion_heads import _REGISTRY as registered
    from fusion_heads import list_fusion_heads

    name, *parts = label.split(":")
    if name not in list_fusion_heads():
        raise ConfigError(f"--heads names {name!r}, which is not a fusion head; choose from {list_fusion_heads()}.")
    options: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--heads entry {label!r}: {part!r} is not OPTION=VALUE; write e.g. gating:floor=0.5.")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--heads entry {label!r}: {value!r} is not a YAML value ({str(e).splitlines()[0]}); "
                              "write e.g. gating:floor=0.5.") from None
    check_options("fusion head", name, registered.get(name), options, reserved=("modality_dims", "out_dim"))
    return name, options


def _cell_config(settings: SweepSettings, fs: FeatureSet, head: str, stage: str) -> FusionModelConfig:
    model, _ = split_model_settings(settings.model)
    model.setdefault("task", fs.task)
    model["encoders"] = fs.encoders or model.get("encoders") or {m: "cached-features" for m in fs.train.feats}
    model["stage"] = stage  # checked by FusionModelConfig, as every other key
    name, options = parse_head(head)
    if options:  # a variant's options on top of the recipe's head_options
        model["head_options"] = {**(model.get("head_options") or {}), **options}
    return FusionModelConfig(labels=tuple(fs.labels), fusion_head=name, **model)


def run_sweep(
    settings: SweepSettings,
    features: FeatureProvider | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Run the missing cells of the grid, then write results.csv, results.md and the plots.

    Args:
        settings: the grid and the training settings.
        features: where cached features come from (default: the encoders and dataset of ``settings``
            through the feature cache); tests pass synthetic features.
        echo: progress output.
    """
    for h in settings.heads:
        parse_head(h)  # an unknown head or option fails here, before any encoding
    bad = [s for s in settings.stages if s not in DEFAULT_STAGES]
    if bad or not settings.heads or not settings.stages or not settings.seeds:
        raise ConfigError(f"--stages must be a non-empty subset of {DEFAULT_STAGES} (got {bad or 'none'}), "
                          "and --heads/--seeds non-empty.")
    model, optim = split_model_settings(settings.model)  # a typo fails here, before any encoding
    resolve_jobs(settings.jobs, 1)  # ... and a negative --jobs
    if (settings.data or {}).get("streaming"):
        raise ConfigError("a sweep trains every cell on cached features, which data.streaming does not keep; leave "
                          "it out (the feature cache reads a table larger than memory by memory map).")
    if features is None:
        from .features import cached_features

        features = cached_features
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sig = settings.signature()
    (out / "sweep.json").write_text(json.dumps({**asdict(settings), "signature": sig}, indent=2) + "\n")
    cells_path = out / "cells.jsonl"
    done = read_cells(cells_path, sig)
    grid = [(h, s, seed) for h in settings.heads for s in settings.stages for seed in settings.seeds]
    todo = [c for c in grid if _cell_key(*c) not in done]
    echo(f"sweep: {len(grid)} cells ({len(settings.heads)} heads × {len(settings.stages)} stages × "
         f"{len(settings.seeds)} seeds), {len(grid) - len(todo)} already done in {cells_path}")
    start = time.perf_counter()
    fs: FeatureSet | None = None
    if todo:  # one encoder pass serves every stage: late cells read a pooled-only view of the same features
        # early/hybrid cells read tokens only when they fuse tokens; pooled-only features are fit's own cache entries
        fuse_tokens = model.get("fuse_tokens", field_defaults(FusionModelConfig)["fuse_tokens"])
        need_tokens = bool(fuse_tokens) and any(stage != "late" for _, stage, _ in todo)
        fs = features(settings, need_tokens)
        echo(f"features ({fs.info.get('token caps', 'tokens' if need_tokens else 'pooled only')}): "
             f"{fs.info.get('source', '')}, ready after {fmt_seconds(time.perf_counter() - start)}")
        pooled = fs.pooled()
    n_run, cells_start = 0, time.perf_counter()
    jobs = []
    for i, (head, stage, seed) in enumerate(grid, start=1):
        tag = f"[{i}/{len(grid)}] {head}@{stage} seed={seed}"
        if _cell_key(head, stage, seed) in done:
            echo(f"{tag} done earlier (skipped)")
            continue
        assert fs is not None
        config = _cell_config(settings, pooled if stage == "late" else fs, head, stage)
        jobs.append(CellJob(head, stage, seed, config.to_dict(), tag))
    if jobs:
        assert fs is not None
        common = {"max_epochs": settings.max_epochs, "batch_size": settings.batch_size, "optim": optim,
                  "robustness": {"noise": settings.noise, "token_drop": settings.token_drop}}
        for job, result in run_cells(jobs, fs, common, resolve_jobs(settings.jobs, len(jobs)), echo):
            cell_fs = pooled if job.stage == "late" else fs
            metric = primary_metric(cell_fs.task)
            meta = {"labels": list(cell_fs.labels), "task": cell_fs.task, "modalities": sorted(cell_fs.train.feats),
                    "info": {k: v for k, v in cell_fs.info.items() if k != "source"}}
            key = _cell_key(job.head, job.stage, job.seed)
            record = {"key": key, "signature": sig, "head": job.head, "stage": job.stage, "seed": job.seed,
                      "meta": meta, **result}
            append_cell(cells_path, record)
            done[key] = record
            n_run += 1
            elapsed = time.perf_counter() - cells_start
            left = f", ~{fmt_seconds(elapsed / n_run * (len(jobs) - n_run))} left" if n_run < len(jobs) else ""
            echo(f"{job.prefix} {metric}={result['fused'].get(metric, float('nan')):.4f} "
                 f"(train {result['train_seconds']:.1f}s){left}")
    records = [done[_cell_key(*c)] for c in grid]
    meta = records[-1]["meta"]
    metric = primary_metric(meta["task"])
    header = {"dataset": meta["info"].get("dataset", "custom features"), "labels": meta["labels"],
              "cells": f"{len(grid)} ({n_run} run now)", "epochs": settings.max_epochs,
              "batch size": settings.batch_size, "weights evaluated": CELL_PROTOCOL, "signature": sig,
              "wall time of this run": fmt_seconds(time.perf_counter() - start),
              **{k: v for k, v in meta["info"].items() if k != "dataset"}}
    modalities = meta["modalities"]
    paths = write_results(out, records, settings.heads, settings.stages, modalities, metric, header)
    echo(f"sweep done in {fmt_seconds(time.perf_counter() - start)}: {paths['md']} {paths['csv']}")
    return paths


def _csv_list(text: str, cast: type = str) -> list[Any]:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def _apply_overrides(recipe: dict[str, Any], extra: Sequence[str]) -> None:
    """``--model.X V``, ``--model.X=V``, ``--data.X V``: values parsed as YAML (``0.1``, ``{a: 1}``, ``null``)."""
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith(("--model.", "--data.")):
            raise ConfigError(f"unknown sweep option {arg!r}; see fusion-zoo sweep --help.")
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
        elif i + 1 < len(extra):
            name, value = arg[2:], extra[i + 1]
            i += 1
        else:
            raise ConfigError(f"{arg} needs a value, e.g. {arg} 64.")
        section, _, key = name.partition(".")
        parsed = yaml.safe_load(value)
        target = recipe[section]
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = parsed
        i += 1


def parse_args(argv: Sequence[str]) -> SweepSettings:
    """Command line -> SweepSettings (the recipe's model/data sections with the overrides applied)."""
    p = argparse.ArgumentParser(prog="fusion-zoo sweep", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="base recipe YAML (default: the default recipe)")
    p.add_argument("--heads", default=",".join(DEFAULT_HEADS),
                   help="comma-separated fusion heads; a variant's options after colons, e.g. gating:floor=0.5")
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES), help="comma-separated stages")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds")
    p.add_argument("--output-dir", default=None, help="results folder (default runs/sweep-<time>)")
    p.add_argument("--max-epochs", type=int, default=DEFAULT_EPOCHS, help="epochs per cell")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="training batch size per cell")
    p.add_argument("--noise", default=",".join(map(str, DEFAULT_NOISE)), help="image/audio feature noise levels")
    p.add_argument("--token-drop", default=",".join(map(str, DEFAULT_TOKEN_DROP)), help="text token drop rates")
    p.add_argument("--jobs", type=int, default=0,
                   help="cells trained at once, one process and one thread each (default 0: one per available core; "
                        "1: in this process)")
    args, extra = p.parse_known_args(list(argv))
    recipe = load_recipe(args.config)
    _apply_overrides(recipe, extra)
    split_model_settings(recipe["model"])  # unknown keys name the close match before anything runs
    return SweepSettings(
        heads=_csv_list(args.heads), stages=_csv_list(args.stages), seeds=_csv_list(args.seeds, int),
        output_dir=args.output_dir or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}",
        max_epochs=args.max_epochs, batch_size=args.batch_size, model=recipe["model"], data=recipe["data"],
        noise=_csv_list(args.noise, float), token_drop=_csv_list(args.token_drop, float), jobs=args.jobs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``fusion-zoo sweep [options]``; returns the exit status."""
    import sys

    settings = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    run_sweep(settings)
    return 0
