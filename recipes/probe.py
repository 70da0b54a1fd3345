"""Encoders chosen by the data: a quick probe of the fused task on each candidate encoder's cached features.

No single image (or audio) encoder suits every dataset: EfficientNet-Lite0 at 64 px beside a colour thumbnail is
right for tiny degraded images, the 224-px encoder for larger natural ones, speech content and speaker identity
are different audio tasks. When ``fit`` is not told which encoders to use, :func:`probe_encoders` trains the
default head on a bounded, seeded sample of the training split for every offline candidate of each modality
(one modality at a time, the others at their current choice) and scores it on a sample of the validation split.
The default stays unless a candidate beats it on the same validation rows by a paired z of at least
:data:`MIN_Z`: a small validation split (or one that shares speakers with training while the test does not)
must not swap a good default for a worse one on noise. Features go through the feature cache, so a rerun on the
same data probes from disk.

The head's width is chosen the same way on small data: the default head (wide, with the concat head's MLP) learns
interactions from a few thousand rows, while a small or noisy dataset may do better with the compact head (half
the width, a linear concat). When the whole training split fits in the probe's sample and the fit names no width,
both are trained on the chosen encoders' features and the compact head is kept only when it beats the default by
a paired z of at least :data:`HEAD_MIN_Z`. On larger data the sample cannot show what the full split would learn,
so the default stays.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from encoders import ModalityOutput, create_encoder
from fusion_errors import FusionZooError
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

from .batches import FeatureBatches
from .data import encode_inputs
from .task import task_loss, warmup_cosine

__all__ = ["CANDIDATES", "HEAD_MIN_Z", "MIN_Z", "ProbeReport", "compact_head", "paired_z", "probe_encoders",
           "format_probe_table"]

#: offline candidates per modality, the default first (ties keep the earlier one)
CANDIDATES: dict[str, tuple[str, ...]] = {
    "audio": ("whisper-base", "resemblyzer-lstm"),
    "image": ("efficientnet-lite0-pixels", "efficientnet-lite0", "pixels"),
    "text": ("minilm-l6",),
}
#: a candidate replaces the modality's default only when it beats it on the same validation rows by this z
#: (McNemar's, ~2.3% one-sided): a tiny validation split's noise must not swap a good default for a worse one
MIN_Z = 2.0
#: the compact head replaces the default when it beats it on the same validation rows by this z (~16% one-sided):
#: two head widths on the same features are closer kin than two encoders, a smaller bar lets small data choose
HEAD_MIN_Z = 1.0
MAX_TRAIN_ROWS = 2000
MAX_VAL_ROWS = 1000
PROBE_STEPS = 400  # optimizer steps per candidate (at most 40 epochs of the sample)


@dataclass
class ProbeReport:
    """What the probe chose and why: ``choice`` modality -> encoder, one ``rows`` entry per candidate tried."""

    choice: dict[str, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    train_rows: int = 0
    val_rows: int = 0
    #: the head settings the probe changed (``hidden_dim``, ``head_options``); empty: the default head stays
    head: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"choice": dict(self.choice), "candidates": [dict(r) for r in self.rows],
                "seconds": round(self.seconds, 2), "train_rows": self.train_rows, "val_rows": self.val_rows,
                "head": dict(self.head)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeReport:
        return cls(dict(data["choice"]), [dict(r) for r in data["candidates"]], float(data["seconds"]),
                   int(data["train_rows"]), int(data["val_rows"]), dict(data.get("head") or {}))


def compact_head(cfg: FusionModelConfig) -> dict[str, Any]:
    """The compact alternative of ``cfg``'s head: half the width, and the concat head as one linear map."""
    change: dict[str, Any] = {"hidden_dim": max(1, cfg.hidden_dim // 2)}
    if cfg.fusion_head == "concat":
        change["head_options"] = {**cfg.head_options, "hidden_dim": 0}
    return change


def _sample(dm: Any, role: str, limit: int, seed: int) -> None:
    """Keep a seeded sample of at most ``limit`` rows of ``dm``'s split ``role`` (in place, on a copy)."""
    ds, name, ids = dm._parts[role]
    if len(ds) <= limit:
        return
    keep = np.sort(np.random.default_rng(seed).choice(len(ds), size=limit, replace=False))
    dm._parts[role] = (ds.select(keep), name, np.asarray(ids)[keep])


def _score(model: FusionModel, batches: FeatureBatches, task: str) -> tuple[float, float, Tensor]:
    """(accuracy, loss, per-row score [N]) of ``model`` on every batch of ``batches``.

    The per-row score is what a paired comparison of two candidates reads: 1/0 correct (multiclass), the share
    of correct labels (multilabel), minus the squared error (regression; its "accuracy" is minus the MAE).
    """
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for b in batches:
            logits.append(model.fuse(b["inputs"]).logits)
            labels.append(b["labels"])
    z, y = torch.cat(logits), torch.cat(labels)  # [N, C], [N] | [N, C]
    loss = float(task_loss(task, z, y))
    if task == "multiclass":
        rows = (z.argmax(-1) == y).float()
        return float(rows.mean()), loss, rows
    if task == "multilabel":
        rows = ((z > 0) == y.bool()).float().mean(-1)
        return float(rows.mean()), loss, rows
    y = y.float().reshape(z.shape)
    return -float((z - y).abs().mean()), loss, -((z - y) ** 2).mean(-1)


def paired_z(better: Tensor, base: Tensor) -> float:
    """z of the per-row differences ``d = better - base`` [N]: ``sum(d) / sqrt(sum(d^2))``.

    The spread is taken under the null hypothesis (no difference, so E[d] = 0): for 0/1 correctness this is
    McNemar's test, (b - c) / sqrt(b + c), with b the rows only ``better`` gets right and c the rows only ``base``
    gets right. A candidate right on every row where the base is wrong gets sqrt(b), not an undefined 0/0.
    """
    d = (better - base).double()
    spread = float(d.pow(2).sum().sqrt())
    return float(d.sum()) / spread if spread > 0 else 0.0


def _train(model: FusionModel, train: FeatureBatches, task: str, lr: float, seed: int) -> None:
    """The fit's schedule in miniature: AdamW, linear warm-up then cosine decay, gradient clipping at 1."""
    torch.manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    epochs = max(1, min(40, math.ceil(PROBE_STEPS / max(1, len(train)))))
    total, warmup = epochs * len(train), max(1, epochs * len(train) // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
    model.train()
    for epoch in range(epochs):
        train.sampler.set_epoch(epoch)
        for b in train:
            out = model.fuse(b["inputs"])
            loss = task_loss(task, out.logits, b["labels"])
            opt.zero_grad(set_to_none=True)
            (loss + out.aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread (unless the user set ``OMP_NUM_THREADS``): small head steps lose more to thread
    hand-offs than they gain, and on a busy machine far more."""
    saved = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _features(dm: Any, model: FusionModel) -> tuple[dict[str, ModalityOutput], Tensor, dict[str, ModalityOutput],
                                                     Tensor]:
    """Train and validation features of ``model``'s frozen encoders on ``dm``'s (sampled) splits."""
    from .sweep.features import collect

    dm.attach(model)
    train, val = collect(_encoded(dm.train_dataloader(), model)), collect(_encoded(dm.val_dataloader(), model))
    return train.feats, train.labels, val.feats, val.labels


def _encoded(loader: Any, model: FusionModel) -> Any:
    """``loader``'s batches with every input as encoder features (raw ones, from a data module with
    ``cache_features=False``, encoded in memory)."""
    for batch in loader:
        yield {**batch, "inputs": encode_inputs(model, batch["inputs"])}


def _fit_score(cfg: FusionModelConfig, train: tuple[dict[str, ModalityOutput], Tensor],
               val: tuple[dict[str, ModalityOutput], Tensor], lr: float, batch_size: int,
               seed: int) -> tuple[float, float, Tensor]:
    """Train a head of ``cfg`` on ``train`` features (standardised as fit does) and score it on ``val``."""
    torch.manual_seed(seed)
    model = FusionModel(cfg, embed_dims={m: f.dim for m, f in train[0].items()})
    model.fit_feature_norm(train[0])
    with _one_thread():  # a head-only step, as fit runs it (recipes.callbacks.CachedFeatureThreads)
        _train(model, FeatureBatches(train[0], train[1], batch_size=batch_size, shuffle=True, seed=seed,
                                     tokens=False), cfg.task, lr, seed)
    return _score(model, FeatureBatches(val[0], val[1], batch_size=1024, tokens=False), cfg.task)


def probe_encoders(dm: Any, base: FusionModelConfig, candidates: Mapping[str, Sequence[str]] | None = None,
                   lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
                   echo: Any = print, head: bool = False) -> ProbeReport:
    """Choose each modality's encoder among ``candidates`` by the fused task's validation accuracy.

    Args:
        dm: a :class:`recipes.data.FusionDataModule` (not modified: the probe works on a sampled copy).
        base: the model config a fit would build (its encoders are the starting choice; its head is probed).
        candidates: modality -> encoder names (default :data:`CANDIDATES`); modalities with one candidate, or
            not in ``base``, are not probed. ``{}`` probes no encoder.
        lr: peak learning rate of the probe's head.
        batch_size: rows per probe step.
        seed: seed of the row sample and of each probe's training.
        echo: where progress lines go.
        head: also compare ``base``'s head with :func:`compact_head` when the whole training split fits in the
            sample (the choice lands in ``report.head``).

    Returns:
        The choice (every modality of ``base``) and one table row per candidate: modality, encoder, val accuracy
        and loss, the paired z against the modality's starting encoder (a candidate replaces it only with
        ``z >= MIN_Z``; among those, the best accuracy wins), probe seconds (encoding, from the cache or the
        encoder, plus training). Head rows have modality ``head``.
    """
    start = time.perf_counter()
    cands = {m: tuple(c) for m, c in (CANDIDATES if candidates is None else candidates).items()
             if m in base.encoders and len(c) > 1}
    choice = {m: s.name for m, s in base.encoders.items()}
    report = ProbeReport(dict(choice))
    full_rows = len(dm._parts["train"][0])
    head = head and full_rows <= MAX_TRAIN_ROWS
    if not cands and not head:
        return report
    probe_dm = copy.copy(dm)
    probe_dm._parts = dict(dm._parts)
    probe_dm._checked, probe_dm._signature, probe_dm._model, probe_dm.bad_rows = {}, None, None, {}
    probe_dm.trainer = None
    _sample(probe_dm, "train", MAX_TRAIN_ROWS, seed)
    _sample(probe_dm, "validation", MAX_VAL_ROWS, seed + 1)
    report.train_rows, report.val_rows = len(probe_dm._parts["train"][0]), len(probe_dm._parts["validation"][0])
    probe_cfg = base.replace(stage="early", fuse_tokens=False)  # pooled features: what the probe can afford
    feats: dict[str, dict[str, Any]] = {}  # encoder name -> its (train, val) features
    train_y = val_y = torch.zeros(0)

    def encode(names_now: dict[str, str]) -> None:
        nonlocal train_y, val_y
        encoders = {mm: create_encoder(n, finetune="frozen") for mm, n in names_now.items()}
        cfg = probe_cfg.replace(encoders=dict(names_now))
        tr, train_y, va, val_y = _features(probe_dm, FusionModel(cfg, encoders=encoders))
        for mm in tr:
            feats.setdefault(names_now[mm], {"train": tr[mm], "val": va[mm]})

    def split(names_now: Mapping[str, str]) -> tuple[tuple[dict[str, ModalityOutput], Tensor],
                                                     tuple[dict[str, ModalityOutput], Tensor]]:
        return (({mm: feats[names_now[mm]]["train"] for mm in base.encoders}, train_y),
                ({mm: feats[names_now[mm]]["val"] for mm in base.encoders}, val_y))

    metric = "val_accuracy" if base.task != "regression" else "val_neg_mae"
    for m, names in sorted(cands.items()):
        scores, per_row = [], {}
        reference = choice[m]
        for name in names:
            t0 = time.perf_counter()
            names_now = {mm: name if mm == m else choice[mm] for mm in base.encoders}
            if name not in feats:
                try:
                    encode(names_now)
                except (FusionZooError, ImportError, OSError, RuntimeError) as e:
                    if name == reference:
                        raise  # the default itself cannot run: the fit could not either
                    # a candidate this machine cannot run (a missing package, a file it cannot decode) is skipped
                    report.rows.append({"modality": m, "encoder": name, "error": f"{type(e).__name__}: {e}"[:200],
                                        "chosen": False})
                    echo(f"encoder probe {m}: {name} skipped ({type(e).__name__}: {e})")
                    continue
            acc, loss, per_row[name] = _fit_score(probe_cfg, *split(names_now), lr, batch_size, seed)
            row = {"modality": m, "encoder": name, metric: round(acc, 4), "val_loss": round(loss, 4),
                   "seconds": round(time.perf_counter() - t0, 1)}
            report.rows.append(row)
            scores.append((acc, -loss, -names.index(name), name))
            echo(f"encoder probe {m}: {name:<26} val {acc:.4f} (loss {loss:.4f}) {row['seconds']}s")
        if reference in per_row:
            for r in report.rows:
                if r["modality"] == m and r["encoder"] in per_row:
                    r["z_vs_default"] = round(paired_z(per_row[r["encoder"]], per_row[reference]), 2)
            scores = [s for s in scores if s[3] == reference or paired_z(per_row[s[3]], per_row[reference]) >= MIN_Z]
        choice[m] = max(scores)[3]
        for r in report.rows:
            if r["modality"] == m:
                r["chosen"] = r["encoder"] == choice[m]
    if head:
        if any(choice[m] not in feats for m in base.encoders):
            encode(dict(choice))
        heads: dict[str, dict[str, Any]] = {f"default (hidden {base.hidden_dim})": {}}
        compact = compact_head(base)
        heads[f"compact (hidden {compact['hidden_dim']})"] = compact
        head_rows: dict[str, tuple[float, float, Tensor, dict[str, Any]]] = {}
        for label, change in heads.items():
            t0 = time.perf_counter()
            acc, loss, rows = _fit_score(probe_cfg.replace(**change), *split(choice), lr, batch_size, seed)
            head_rows[label] = (acc, loss, rows, change)
            report.rows.append({"modality": "head", "encoder": label, metric: round(acc, 4),
                                "val_loss": round(loss, 4), "seconds": round(time.perf_counter() - t0, 1)})
            echo(f"head probe: {label:<26} val {acc:.4f} (loss {loss:.4f})")
        reference_rows = next(iter(head_rows.values()))[2]
        chosen = next(iter(head_rows))
        for r in report.rows:
            if r["modality"] == "head":
                z = paired_z(head_rows[r["encoder"]][2], reference_rows)
                r["z_vs_default"] = round(z, 2)
                if z >= HEAD_MIN_Z and head_rows[r["encoder"]][0] > head_rows[chosen][0]:
                    chosen = r["encoder"]
        for r in report.rows:
            if r["modality"] == "head":
                r["chosen"] = r["encoder"] == chosen
        report.head = dict(head_rows[chosen][3])
    report.choice, report.seconds = dict(choice), time.perf_counter() - start
    return report


def format_probe_table(report: ProbeReport) -> str:
    """The probe's rows as a small text table (what ``fit`` prints)."""
    if not report.rows:
        return ""
    key = "val_neg_mae" if any("val_neg_mae" in r for r in report.rows) else "val_accuracy"
    lines = [f"encoder probe ({report.train_rows} train / {report.val_rows} validation rows, "
             f"{report.seconds:.1f}s; a candidate replaces the default at z >= {MIN_Z:g}"
             + (f", a head at z >= {HEAD_MIN_Z:g}" if any(r["modality"] == "head" for r in report.rows) else "")
             + "):",
             f"  {'modality':<9}{'encoder':<28}{key:>13}{'val_loss':>10}{'z':>7}{'s':>7}"]
    for r in report.rows:
        if "error" in r:
            lines.append(f"  {r['modality']:<9}{r['encoder']:<28} skipped: {r['error']}")
            continue
        mark = "  <- chosen" if r.get("chosen") else ""
        z = r.get("z_vs_default")
        lines.append(f"  {r['modality']:<9}{r['encoder']:<28}{r[key]:>13.4f}{r['val_loss']:>10.4f}"
                     f"{'-' if z is None else format(z, '.2f'):>7}{r['seconds']:>7.1f}{mark}")
    return "\n".join(lines)
