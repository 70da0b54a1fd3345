"""Modular fused models: the modular training objectives, per-class decomposition, composition and replacement.

A fused model's head side (per-modality projections -> fusion head -> trunk -> classifier) has three kinds of
unit layers (``FusionModel.unit_widths``): each modality's input to the head (``proj_<m>``), the head's output
(``head``) and the trunk's output (``trunk``). docs/modularity.md explains the whole scheme:

* **objectives** (MODA, Ngo et al. 2024): on each unit layer, intra-class *affinity* (samples of a class share an
  activation pattern), inter-class *dispersion* (classes have different patterns) and *compactness* (few units
  carry each sample);
* **decomposition**: the module of class c is the model with unit masks that keep the units class c's score
  depends on (attribution ``|a_u * dz_c/da_u|`` on the decomposition data, the smallest set per layer holding
  ``coverage`` of it) plus its classifier row, and each weight matrix pruned to the entries holding
  ``weight_coverage`` of the class's weight attribution ``|w * dz_c/dw|``;
* **composition**: a composed ``FusionModel`` runs each module's masked sub-network and takes its class score;
  scores are made comparable by a per-class scale and bias (identity, or fitted on validation data).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from encoders import ModalityOutput
from fusion_errors import CheckpointError, ConfigError, FusionZooError

from . import _format as fmt
from .config import FusionModelConfig
from .model import FusionModel

__all__ = ["ModuleError", "ClassModule", "modularity_losses", "unit_importance", "class_masks", "extract_module",
           "decompose", "weight_share", "unit_jaccard", "weight_importance", "weight_masks", "weight_jaccard",
           "compose", "calibrate", "calibrate_replacement", "replace_module", "save_module", "load_module",
           "encoder_records", "MODULE_FORMAT", "WEIGHT_COVERAGES",
           "HIDDEN_COVERAGES"]

MODULE_FORMAT = "fusion-zoo-module"
_EPS = 1e-8


class ModuleError(FusionZooError, ValueError):
    """Modules that cannot be composed or replaced (different encoders, unknown label, ...)."""


# objectives --------------------------------------------------------------------------------------------------
def modularity_losses(units: Mapping[str, Tensor], labels: Tensor, hidden: bool = False) -> dict[str, Tensor]:
    """The three modular objectives, each averaged over the unit layers (lower is more modular).

    Args:
        units: layer -> activations [B, W] (``FusionModelOutput.units``).
        labels: class indices [B].
        hidden: also regulate the hidden activation layers (``head_hidden*``, ``trunk_hidden*``). Off in training:
            it cost accuracy and made modules larger (docs/modularity.md has the figures).

    Returns:
        ``affinity``: mean over same-class pairs of 1 - cosine(|a_i|, |a_j|); ``dispersion``: mean over
        different-class pairs of cosine(|a_i|, |a_j|); ``compactness``: mean over samples of
        ||a||_1 / (sqrt(W) ||a||_2), a scale-free density in [1/sqrt(W), 1] (an L1 penalty could be met by
        shrinking a layer and growing the next). Rows that are all zero (a missing modality) are left out, and so
        are layers with fewer than two such rows.

    Layers of one width are stacked and their pairwise cosines taken in one batched matmul, with pair masks as
    weights instead of boolean indexing: no Python loop over pairs and no host sync, so the objectives cost a
    small fraction of a head-only training step.
    """
    y = labels.long().reshape(-1)  # [B]
    same = (y[:, None] == y[None, :]).float()  # [B, B]
    off_diag = 1.0 - torch.eye(len(y), device=y.device)  # [B, B]
    by_width: dict[int, list[Tensor]] = {}
    for layer in sorted(units):
        if "." not in layer and (hidden or not _hidden(layer)):  # token, later-call and routed activations: the
            # objectives read one row a sample
            by_width.setdefault(units[layer].shape[-1], []).append(units[layer])
    terms: dict[str, list[Tensor]] = {"affinity": [], "dispersion": [], "compactness": []}
    counts: dict[str, list[Tensor]] = {"affinity": [], "dispersion": [], "compactness": []}
    for width, group in by_width.items():
        a = torch.stack(group).float().abs()  # [L, B, W]
        norm = a.norm(dim=-1)  # [L, B]
        valid = (norm > _EPS).float()  # [L, B]
        used = (valid.sum(-1) >= 2).float()  # [L] layers with a pair of valid rows
        n = a / norm.clamp_min(_EPS)[..., None]  # [L, B, W]
        sim = n @ n.transpose(1, 2)  # [L, B, B], in [0, 1]
        pair = valid[:, :, None] * valid[:, None, :] * off_diag  # [L, B, B]
        for key, weight, value in (("affinity", pair * same, 1 - sim), ("dispersion", pair * (1 - same), sim)):
            count = weight.sum((1, 2))  # [L]
            has = used * (count > 0).float()  # [L]
            terms[key].append(((value * weight).sum((1, 2)) / count.clamp_min(1)) * has)
            counts[key].append(has)
        density = a.sum(-1) / (norm.clamp_min(_EPS) * width**0.5) * valid  # [L, B]
        terms["compactness"].append(density.sum(-1) / valid.sum(-1).clamp_min(1) * used)
        counts["compactness"].append(used)
    zero = next(iter(units.values())).new_zeros((), dtype=torch.float32)
    return {k: torch.cat(v).sum() / torch.cat(counts[k]).sum().clamp_min(1) if v else zero
            for k, v in terms.items()}


# decomposition -----------------------------------------------------------------------------------------------
def _batches(feats: Mapping[str, ModalityOutput], n: int, batch_size: int) -> Any:
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        yield idx, {m: f.index(idx) for m, f in feats.items()}


def _rows(feats: Mapping[str, ModalityOutput]) -> int:
    return int(next(iter(feats.values())).pooled.shape[0])


def unit_importance(model: FusionModel, feats: Mapping[str, ModalityOutput], batch_size: int = 512,
                    rows: str = "all") -> dict[str, Tensor]:
    """Per class and unit, the mean attribution ``|a_u * dz_c/da_u|`` of class c's logit to unit u (eval mode):
    layer -> [C, W]. ``rows`` "all": over every row of ``feats``, not only class c's, so that the units that keep
    z_c low on other classes stay in c's module too (its score then ranks like the original's); "own": over the
    rows the model predicts as c only (MODA's rule: the units the class activates); "own-hidden": "own" on the
    hidden activation layers (``*_hidden*``), "all" on the others."""
    if rows not in ("all", "own", "own-hidden"):
        raise ConfigError(f"rows={rows!r} must be 'all', 'own' or 'own-hidden'.")

    def own(layer: str) -> bool:
        return rows == "own" or (rows == "own-hidden" and _hidden(layer))

    model.eval()
    c = model.config.num_outputs
    sums: dict[str, Tensor] = {}
    n = _rows(feats)
    counts = torch.zeros(c)
    for _, batch in _batches(feats, n, batch_size):
        with torch.enable_grad():
            out = model.fuse(batch)
            pred = out.logits.detach().argmax(-1).cpu()  # [b]
            counts += torch.bincount(pred, minlength=c).float()
            layers = sorted(out.units)
            for k in range(c):
                grads = torch.autograd.grad(out.logits[:, k].sum(), [out.units[name] for name in layers],
                                            retain_graph=k < c - 1, allow_unused=True)
                for name, g in zip(layers, grads, strict=True):
                    a = out.units[name].detach()  # [b, W] or [b, T, W] (tokens count for their layer)
                    if g is None:
                        score = torch.zeros(a.shape[-1])  # [W]
                    else:
                        att = (a * g).abs()
                        if own(name) and a.shape[0] == len(pred):  # routed expert rows: every row counts
                            att = att * (pred == k).to(att.dtype).view(-1, *([1] * (att.dim() - 1)))
                        score = att.reshape(-1, a.shape[-1]).sum(0)  # [W]
                    sums.setdefault(name.split(".")[0], torch.zeros(c, a.shape[-1]))[k] += score.float().cpu()
    return {name: s / (counts.clamp_min(1)[:, None] if own(name) else max(n, 1)) for name, s in sums.items()}


def class_masks(importance: Mapping[str, Tensor], label: int, coverage: float) -> dict[str, Tensor]:
    """The unit masks of class ``label``: per layer, the fewest units whose importance sums to ``coverage`` of the
    layer's total (1.0: every unit with any importance). Returns layer -> [W] float (1 = keep)."""
    if not 0.0 < coverage <= 1.0:
        raise ConfigError(f"coverage={coverage} must be in (0, 1].")
    masks = {}
    for layer, imp in importance.items():
        row = imp[label]  # [W]
        order = row.argsort(descending=True)
        total = float(row.sum())
        keep = torch.zeros_like(row)
        if total <= 0:
            masks[layer] = keep
            continue
        if coverage >= 1.0:
            masks[layer] = (row > 0).float()
            continue
        cum = row[order].cumsum(0) / total  # [W]
        count = int((cum < coverage).sum()) + 1
        keep[order[:count]] = 1.0
        masks[layer] = keep
    return masks


def _weight_params(model: FusionModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The head side's weight matrices (2-D parameters): what weight pruning acts on (biases and norms stay)."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("encoders.")]


def weight_importance(model: FusionModel, feats: Mapping[str, ModalityOutput], batch_size: int = 16
                      ) -> dict[str, Tensor]:
    """Per class, the first-order attribution ``|w * dz_c/dw|`` of each head-side weight entry, summed over
    batches of ``batch_size`` rows of ``feats`` (small batches: signed gradients of different rows cancel less):
    parameter name -> [C, *shape]. Memory: C x the head side's weight entries, float32.

    The C backward passes of a batch run as one batched (vmapped) backward; where an operation of the head has no
    batched rule, one pass a class (the same sums)."""
    model.eval()
    c = model.config.num_outputs
    params = _weight_params(model)
    sums = {n: torch.zeros(c, *p.shape) for n, p in params}
    batched = True
    for _, batch in _batches(feats, _rows(feats), batch_size):
        with torch.enable_grad():
            logits = model.fuse(batch).logits  # [b, C]
            if batched:
                eye = torch.eye(c, dtype=logits.dtype, device=logits.device)[:, None, :]  # [C, 1, C]
                try:
                    grads = torch.autograd.grad(logits, [p for _, p in params], eye.expand(c, *logits.shape),
                                                retain_graph=True, is_grads_batched=True, allow_unused=True)
                    for (name, p), g in zip(params, grads, strict=True):
                        if g is not None:  # [C, *shape]
                            sums[name] += (p.detach() * g).abs().float().cpu()
                    continue
                except RuntimeError:
                    batched = False
            for k in range(c):
                grads = torch.autograd.grad(logits[:, k].sum(), [p for _, p in params], retain_graph=k < c - 1,
                                            allow_unused=True)
                for (name, p), g in zip(params, grads, strict=True):
                    if g is not None:
                        sums[name][k] += (p.detach() * g).abs().float().cpu()
    return sums


def weight_masks(importance: Mapping[str, Tensor], label: int, coverage: float) -> dict[str, Tensor]:
    """Per weight matrix, the fewest entries whose importance for class ``label`` sums to ``coverage`` of the
    matrix's total: parameter name -> mask of its shape (1 = keep). ``coverage`` 1.0 keeps every entry."""
    if not 0.0 < coverage <= 1.0:
        raise ConfigError(f"weight_coverage={coverage} must be in (0, 1] (1.0: no weight pruning).")
    masks = {}
    for name, imp in importance.items():
        row = imp[label].flatten()  # [N]
        keep = torch.ones_like(row)
        total = float(row.sum())
        if coverage < 1.0 and total > 0:
            order = row.argsort(descending=True)
            count = int((row[order].cumsum(0) / total < coverage).sum()) + 1
            keep.zero_()
            keep[order[:count]] = 1.0
        masks[name] = keep.view_as(imp[label])
    return masks


@dataclass
class ClassModule:
    """One class's module: the source model's head side with the class's unit masks, scoring ``label``.

    Attributes:
        label: the class it scores.
        class_index: that class's index among the source model's labels.
        model: the head-only source model with ``set_unit_masks`` applied.
        encoders: modality -> the frozen encoder it expects (name, options, weights sha256).
        source: where it came from (a folder or a description).
        stats: ``weight_share`` (head-side weights it uses) and ``units`` (layer -> units kept).
    """

    label: str
    class_index: int
    model: FusionModel
    encoders: dict[str, dict[str, Any]]
    source: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Layer -> [W] unit mask (1 = kept)."""
        holder = cast(torch.nn.Module, self.model._modules["unit_masks"])
        return {k: v.clone() for k, v in holder.named_buffers()}


def encoder_records(model: FusionModel) -> dict[str, dict[str, Any]]:
    """Modality -> ``{name, options, weights_sha256}`` of the frozen encoders ``model`` reads (what a module
    references); a fine-tuned encoder is part of one model, not shared, and is refused."""
    out = {}
    for m, spec in model.config.encoders.items():
        if spec.finetune != "frozen":
            raise ModuleError(f"the {m} encoder {spec.name!r} is fine-tuned ({spec.finetune}); modules share frozen "
                              "encoders by name and hash only (decompose a model with frozen encoders).")
        enc: Any = model.encoders[m] if m in model.encoders else None
        sha = fmt.reference_hash(enc, "reference") if enc is not None else fmt._fresh_hash(spec, "reference")
        out[m] = {"name": spec.name, "options": dict(spec.options), "weights_sha256": sha}
    return out


def _head_only(model: FusionModel) -> FusionModel:
    """A head-only copy of ``model`` (no encoders), same weights and buffers, eval mode."""
    copy = FusionModel(model.config, embed_dims=model.embed_dims)
    masks = model._modules.get("unit_masks")
    if masks is not None:
        copy.set_unit_masks(dict(masks.named_buffers()))
    copy.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("encoders.")})
    return copy.eval()


def head_parameter_count(model: FusionModel) -> int:
    """Trainable head-side parameters (everything but encoders)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoders."))


def weight_share(model: FusionModel, feats: Mapping[str, ModalityOutput], label: int, rows: int = 256) -> float:
    """Share of the head-side weights that class ``label``'s score uses under ``model``'s unit masks: non-zero
    entries with a non-zero gradient of z_label on up to ``rows`` rows of ``feats`` (masked units cut their
    weights off; pruned weights are zero)."""
    model.eval()
    params = [(n, p) for n, p in model.named_parameters() if not n.startswith("encoders.")]
    used = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params}
    n_rows = min(rows, _rows(feats))
    for _, batch in _batches(feats, n_rows, 64):
        with torch.enable_grad():
            z = model.fuse(batch).logits[:, label]  # [b]
            grads = torch.autograd.grad(z.sum(), [p for _, p in params], allow_unused=True)
        for (n, p), g in zip(params, grads, strict=True):
            if g is not None:
                used[n] |= (g != 0) & (p.detach() != 0)
    total = sum(p.numel() for _, p in params)
    return float(sum(int(u.sum()) for u in used.values()) / max(total, 1))


def extract_module(model: FusionModel, label: int, masks: Mapping[str, Tensor], source: str = "",
                   feats: Mapping[str, ModalityOutput] | None = None,
                   weights: Mapping[str, Tensor] | None = None,
                   records: dict[str, dict[str, Any]] | None = None) -> ClassModule:
    """The module of class ``label``: a head-only copy of ``model`` with unit ``masks`` and, if given, its weight
    matrices multiplied by ``weights`` (``weight_masks``: pruned entries are zero); ``feats`` (optional) measure
    its weight share. ``records``: ``encoder_records(model)`` when already known (a head-only model rebuilds its
    encoders to hash them)."""
    records = records if records is not None else encoder_records(model)
    part = _head_only(model).set_unit_masks(masks)
    if weights:
        with torch.no_grad():
            for name, p in _weight_params(part):
                if name in weights:
                    p.mul_(weights[name].to(p.dtype))
    stats: dict[str, Any] = {"units": {k: int(v.sum()) for k, v in masks.items()},
                             "unit_widths": part.unit_widths()}
    if feats is not None:
        stats["weight_share"] = weight_share(part, feats, label)
    return ClassModule(model.config.labels[label], label, part, records, source, stats)


#: the weight coverages ``decompose(weight_coverage=None)`` tries, most pruning first
WEIGHT_COVERAGES = (0.8, 0.85, 0.9, 0.95)
#: the unit coverages of the hidden activation layers ``decompose(hidden_coverage=None)`` tries (from
#: ``coverage`` up), fewest units first
HIDDEN_COVERAGES = (0.9, 0.95, 0.99, 1.0)


def _hidden(layer: str) -> bool:
    """A hidden activation layer (``head_hidden*``, ``trunk_hidden*``)."""
    return "_hidden" in layer


def _layer_masks(importance: Mapping[str, Tensor], label: int, coverage: float, hidden_coverage: float
                 ) -> dict[str, Tensor]:
    """``class_masks`` at ``coverage`` on the unit layers and ``hidden_coverage`` on the hidden ones."""
    dense = class_masks({k: v for k, v in importance.items() if not _hidden(k)}, label, coverage)
    hidden = class_masks({k: v for k, v in importance.items() if _hidden(k)}, label, hidden_coverage)
    return {k: (hidden if _hidden(k) else dense)[k] for k in importance}


def decompose(model: FusionModel, feats: Mapping[str, ModalityOutput], coverage: float = 0.9,
              source: str = "", batch_size: int = 512, weight_coverage: float | None = 1.0,
              agreement: float = 0.99, rows: str = "all", hidden_coverage: float | None = None
              ) -> list[ClassModule]:
    """One module per class of ``model`` (multiclass): unit masks from ``unit_importance`` on ``feats`` at
    ``coverage`` (``hidden_coverage`` on the hidden activation layers), and below ``weight_coverage`` 1.0 each
    weight matrix pruned to the entries holding that share of the class's ``weight_importance`` (units alone leave
    every weight between two kept units in the module).

    ``weight_coverage`` None chooses it: the most pruning among ``WEIGHT_COVERAGES`` whose composed modules
    predict the class ``model`` predicts on at least ``agreement`` of ``feats``' rows (1.0 if none does); how
    much pruning a model takes differs by data and training. ``hidden_coverage`` None chooses it the same way
    among ``HIDDEN_COVERAGES`` from ``coverage`` up (the fewest hidden units that, at the chosen weight coverage,
    keep the predictions; weight pruning is chosen first: it is what makes a module small). The choices are in
    each module's ``stats``. ``rows``: which rows choose a class's units (``unit_importance``: "all", "own"
    (MODA's rule) or "own-hidden")."""
    if model.config.task != "multiclass" or model.config.modules:
        raise ModuleError("decompose takes an ordinary multiclass model (not regression, multilabel or composed).")
    if weight_coverage is not None and not 0.0 < weight_coverage <= 1.0:
        raise ConfigError(f"weight_coverage={weight_coverage} must be in (0, 1] (1.0: no weight pruning).")
    records = encoder_records(model)  # once: a head-only model rebuilds each encoder to hash it
    importance = unit_importance(model, feats, batch_size, rows)
    c = model.config.num_outputs
    w_imp = weight_importance(model, feats) if weight_coverage is None or weight_coverage < 1.0 else None
    hidden_options = [hidden_coverage] if hidden_coverage is not None else \
        sorted({coverage, *(h for h in HIDDEN_COVERAGES if h > coverage)})
    weight_options = [weight_coverage] if weight_coverage is not None else [*WEIGHT_COVERAGES, 1.0]
    choice = (weight_options[-1], hidden_options[-1])
    if len(weight_options) > 1 or len(hidden_options) > 1:
        reference = _predicted(model, feats)  # [N]
        choice = next(((wc, hc) for wc in weight_options for hc in hidden_options
                       if _agreement(model, feats, importance, w_imp, wc, coverage, hc, records, reference)
                       >= agreement), choice)
    weight_coverage, hidden = choice
    modules = [extract_module(model, k, _layer_masks(importance, k, coverage, hidden), source, feats,
                              weight_masks(w_imp, k, weight_coverage) if w_imp is not None and weight_coverage < 1.0
                              else None, records)
               for k in range(c)]
    for mod in modules:
        mod.stats.update(coverage=coverage, weight_coverage=weight_coverage, hidden_coverage=hidden, rows=rows)
    return modules


@torch.no_grad()
def _predicted(model: FusionModel, feats: Mapping[str, ModalityOutput], batch_size: int = 1024) -> Tensor:
    """Predicted class indices [N]."""
    model.eval()
    return torch.cat([model.fuse(b).logits.argmax(-1) for _, b in _batches(feats, _rows(feats), batch_size)])


def _agreement(model: FusionModel, feats: Mapping[str, ModalityOutput], importance: Mapping[str, Tensor],
               w_imp: Mapping[str, Tensor] | None, weight_coverage: float, coverage: float, hidden_coverage: float,
               records: dict[str, dict[str, Any]], reference: Tensor) -> float:
    """Share of rows on which the composed modules at these coverages predict ``reference`` (the model's)."""
    parts = [extract_module(model, k, _layer_masks(importance, k, coverage, hidden_coverage),
                            weights=weight_masks(w_imp, k, weight_coverage)
                            if w_imp is not None and weight_coverage < 1.0 else None, records=records)
             for k in range(model.config.num_outputs)]
    return float((_predicted(compose(parts, with_encoders=False), feats) == reference).float().mean())


def unit_jaccard(modules: Sequence[ClassModule], layers: Sequence[str] | None = None) -> list[float]:
    """Pairwise Jaccard overlap of the modules' kept units (all layers together, or only ``layers``), one value
    per pair."""
    flat = [torch.cat([m.masks[k] for k in sorted(m.masks) if layers is None or k in layers]) > 0 for m in modules]
    out = []
    for a, b in combinations(flat, 2):
        union = int((a | b).sum())
        out.append(float((a & b).sum()) / union if union else 0.0)
    return out


def weight_jaccard(modules: Sequence[ClassModule]) -> list[float]:
    """Pairwise Jaccard overlap of the modules' non-zero head-side weight entries (a pruned weight is zero; a
    masked unit's weights count as kept here, ``weight_share`` leaves them out), one value per pair."""
    flat = [torch.cat([p.detach().flatten() != 0 for _, p in _weight_params(m.model)]) for m in modules]
    out = []
    for a, b in combinations(flat, 2):
        union = int((a | b).sum())
        out.append(float((a & b).sum()) / union if union else 0.0)
    return out


# composition -------------------------------------------------------------------------------------------------
def _check_encoders(modules: Sequence[ClassModule]) -> dict[str, dict[str, Any]]:
    first = modules[0].encoders
    for mod in modules[1:]:
        if mod.encoders != first:
            diff = sorted(m for m in set(first) | set(mod.encoders) if first.get(m) != mod.encoders.get(m))
            names = {m: (first.get(m) or {}).get("name") for m in diff}
            other = {m: (mod.encoders.get(m) or {}).get("name") for m in diff}
            raise ModuleError(f"module {mod.label!r} ({mod.source or 'unnamed'}) reads other encoders than module "
                              f"{modules[0].label!r} for {diff} ({other} vs {names}, or other weights); compose "
                              "modules of models with the same frozen encoders.")
    return first


def compose(modules: Sequence[ClassModule], with_encoders: bool = True) -> FusionModel:
    """An ordinary zoo model over the modules' classes (in the order given): each output is its module's masked
    class logit, scale 1 and bias 0 (``calibrate`` fits them). ``with_encoders`` False builds it head-only."""
    if not modules:
        raise ModuleError("compose needs at least one module.")
    labels = [m.label for m in modules]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ModuleError(f"labels {twice} come from more than one module; give one module per label.")
    _check_encoders(modules)
    base = modules[0].model.config
    entries = [{"labels": [m.label], "class_indices": [m.class_index], "config": m.model.config.to_dict(),
                "source": m.source} for m in modules]
    cfg = FusionModelConfig.from_dict({**base.to_dict(), "labels": labels, "modules": entries,
                                       "standardize": False, "modality_dropout": 0.0, "modularity": None})
    embed_dims = modules[0].model.embed_dims
    if any(m.model.embed_dims != embed_dims for m in modules):
        raise ModuleError("modules expect features of different widths; compose modules of one encoder set.")
    composed = FusionModel(cfg) if with_encoders else FusionModel(cfg, embed_dims=embed_dims)
    if with_encoders and encoder_records(composed) != modules[0].encoders:
        raise ModuleError("the encoders built from the modules' names have other weights than the modules "
                          "reference (sha256 differs); install the encoder version the modules were made with.")
    for part, mod in zip(composed.parts, modules, strict=True):
        part.load_state_dict(mod.model.state_dict())
    return composed.eval()


@torch.no_grad()
def _scores(model: FusionModel, feats: Mapping[str, ModalityOutput], batch_size: int = 1024) -> Tensor:
    """Uncalibrated composed scores [N, C] (scale 1, bias 0)."""
    model.eval()
    scale, bias = model.module_scale.clone(), model.module_bias.clone()
    model.module_scale.fill_(1.0)
    model.module_bias.fill_(0.0)
    try:
        return torch.cat([model.fuse(b).logits.float() for _, b in _batches(feats, _rows(feats), batch_size)])
    finally:
        model.module_scale.copy_(scale)
        model.module_bias.copy_(bias)


def calibrate(model: FusionModel, feats: Mapping[str, ModalityOutput], labels: Tensor, steps: int = 200,
              classes: Sequence[int] | None = None) -> dict[str, float]:
    """Fit the composed model's per-class scale and bias on validation data (cross-entropy of the composed
    logits, L-BFGS; scales kept positive). Makes scores of modules from different models comparable.

    Args:
        classes: the output columns to fit (None: all). A repaired model fits only the swapped-in class: the
            other columns are the original model's own logits, and refitting them on a small validation set
            would move classes the repair should leave alone.

    Returns the validation accuracy before and after."""
    if not model.config.modules:
        raise ModuleError("calibrate takes a composed model (zoo.modular.compose).")
    z = _scores(model, feats)  # [N, C]
    y = labels.long()
    free = torch.zeros(z.shape[1], dtype=torch.bool)  # [C]
    free[list(range(z.shape[1])) if classes is None else list(classes)] = True
    log_scale = torch.zeros(z.shape[1], requires_grad=True)
    bias = torch.zeros(z.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([log_scale, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def fitted() -> tuple[Tensor, Tensor]:
        return torch.where(free, log_scale, 0.0).exp(), torch.where(free, bias, 0.0)  # [C], [C]

    def closure() -> Tensor:
        opt.zero_grad()
        scale, shift = fitted()
        loss = F.cross_entropy(z * scale + shift, y) + 1e-3 * (scale.log().pow(2).sum() + shift.pow(2).sum())
        loss.backward()
        return loss

    before = float((z.argmax(-1) == y).float().mean())
    opt.step(closure)
    with torch.no_grad():
        scale, shift = fitted()
        model.module_scale.copy_(scale)
        model.module_bias.copy_(shift)
        after = float(((z * scale + shift).argmax(-1) == y).float().mean())
    return {"val_accuracy_before": before, "val_accuracy_after": after}


def calibrate_replacement(model: FusionModel, feats: Mapping[str, ModalityOutput], labels: Tensor, target: int,
                          reference: Tensor, tolerance: float = 0.005) -> dict[str, Any]:
    """Fit the swapped-in class's scale and bias of a repaired model (``replace_module``) so that no other class
    pays for the repair: the (scale, bias) with the highest validation recall of ``target`` among those that drop
    no other class's validation accuracy by more than ``tolerance`` below the model before the repair.

    Every other column is the original model's own logit, so the only rows that change are those where the new
    score of ``target`` starts or stops winning. For each scale on a grid (0.25 to 4, log-spaced, and 1), the
    rows ``target`` wins grow with the bias; the bias is set just below the row that would first push some other
    class past its allowed loss. Ties in recall go to the higher validation accuracy, then to the scale nearest 1.
    Cross-entropy (``calibrate``) does not bound the other classes, which it can move by several points
    (docs/modularity.md).

    Args:
        labels: validation class indices [N].
        target: the swapped-in class's column.
        reference: the unrepaired model's predictions on the same rows [N] (the accuracy each class keeps).
        tolerance: the largest drop of another class's validation accuracy, a fraction (0.005 = half a point).

    Returns the chosen ``scale`` and ``bias``, the validation ``target_recall`` and ``accuracy`` before (the
    unrepaired model) and after."""
    if not model.config.modules:
        raise ModuleError("calibrate_replacement takes a repaired model (zoo.modular.replace_module).")
    z = _scores(model, feats)  # [N, C]
    y, ref = labels.long(), reference.long()
    n, c = z.shape
    others = z.clone()
    others[:, target] = float("-inf")
    best_other, other_pred = others.max(-1)  # [N], [N]
    counts = torch.bincount(y, minlength=c).float()  # [C]
    ref_right = torch.bincount(y[ref == y], minlength=c).float()  # [C]
    keep_right = torch.bincount(y[other_pred == y], minlength=c).float()  # [C] right while target never wins
    allowed = keep_right - torch.ceil((ref_right / counts.clamp_min(1) - tolerance) * counts - 1e-6)  # [C]
    allowed[target] = float("inf")
    scales = sorted({1.0, *torch.logspace(-2, 2, 25, base=2.0).tolist()})
    best: tuple[float, float, float] | None = None  # (recall, accuracy, -|log scale|) of ``choice``
    choice = (1.0, float(best_other.min() - z[:, target].max() - 1.0))
    for scale in scales:
        t = best_other - scale * z[:, target]  # [N] the target wins row i once bias > t_i
        order = t.argsort()
        lost = F.one_hot(y[order], c).float() * (other_pred[order] == y[order]).float()[:, None]  # [N, C]
        ok = (lost.cumsum(0) <= allowed).all(-1)  # [N] the first k+1 rows can go to the target
        k = int(ok.long().cumprod(0).sum())  # rows the target may win
        ts = t[order]
        bias = float(ts[k - 1] + (ts[k] - ts[k - 1]) / 2) if 0 < k < n else \
            float(ts[-1] + 1.0) if k == n else float(ts[0] - 1.0)
        pred = torch.where(scale * z[:, target] + bias > best_other, target, other_pred)  # [N]
        recall = float((pred[y == target] == target).float().mean()) if bool((y == target).any()) else 0.0
        key = (recall, float((pred == y).float().mean()), -abs(math.log(scale)))
        if best is None or key > best:
            best, choice = key, (scale, bias)
    assert best is not None
    with torch.no_grad():
        model.module_scale.fill_(1.0)
        model.module_bias.fill_(0.0)
        model.module_scale[target], model.module_bias[target] = choice
    return {"scale": choice[0], "bias": choice[1], "target_recall": best[0],
            "val_accuracy_before": float((ref == y).float().mean()), "val_accuracy_after": best[1]}


def as_modules(model: FusionModel, source: str = "") -> list[ClassModule]:
    """Every class of ``model`` as a module without masks (all units kept): exact, no data needed. A composed
    model gives back its parts' modules."""
    if model.config.modules:
        out = []
        records = encoder_records(model)
        for part, entry in zip(model.parts, model.config.modules, strict=True):
            head = _head_only(cast(FusionModel, part))  # one copy per part: its classes stay one part
            for name, idx in zip(entry["labels"], entry["class_indices"], strict=True):
                out.append(ClassModule(name, idx, head, records, entry["source"]))
        return out
    records = encoder_records(model)
    head = _head_only(model).set_unit_masks({})
    return [ClassModule(name, k, head, records, source) for k, name in enumerate(model.config.labels)]


def replace_module(model: FusionModel, label: str, new: ClassModule, source: str = "") -> FusionModel:
    """``model`` with class ``label`` scored by ``new`` (same encoders) and every other class as before: a
    composed model of two parts (the rest of ``model`` unmasked, and ``new``). Calibrate it when the two come
    from different models."""
    if label not in model.config.labels:
        raise ModuleError(f"label {label!r} is not one of the model's labels {list(model.config.labels)}.")
    if new.label != label:
        raise ModuleError(f"the replacement module scores {new.label!r}, not {label!r}; give {label!r}'s module.")
    kept = [m for m in as_modules(model, source) if m.label != label]
    modules = [*kept, new]
    _check_encoders(modules)
    order = list(model.config.labels)
    grouped = _group(modules)
    cfg_entries = [{"labels": [m.label for m in g], "class_indices": [m.class_index for m in g],
                    "config": g[0].model.config.to_dict(), "source": g[0].source} for g in grouped]
    base = model.config if not model.config.modules else FusionModelConfig.from_dict(model.config.modules[0]["config"])
    cfg = FusionModelConfig.from_dict({**base.to_dict(), "labels": order, "modules": cfg_entries,
                                       "standardize": False, "modality_dropout": 0.0, "modularity": None})
    out = FusionModel(cfg, encoders={m: model._encoder(m) for m in model.encoders}) if len(model.encoders) \
        else FusionModel(cfg, embed_dims=model.embed_dims)
    for part, g in zip(out.parts, grouped, strict=True):
        part.load_state_dict(g[0].model.state_dict())
    return out.eval()


def _group(modules: Sequence[ClassModule]) -> list[list[ClassModule]]:
    """Modules that share one head-side model (same object) become one part scoring several classes."""
    groups: list[list[ClassModule]] = []
    for m in modules:
        for g in groups:
            if g[0].model is m.model:
                g.append(m)
                break
        else:
            groups.append([m])
    return groups


# module folders ----------------------------------------------------------------------------------------------
def save_module(module: ClassModule, folder: str | Path) -> Path:
    """Write ``module`` as a folder: ``config.json`` (the source config, the class, the encoders it references
    by name and sha256, its stats), ``model.safetensors`` (head-side weights and unit masks) and ``README.md``."""
    doc = {"format": MODULE_FORMAT, "format_version": 1, "label": module.label, "class_index": module.class_index,
           "source": module.source, "encoders": module.encoders, "stats": module.stats,
           "model": module.model.config.to_dict()}
    state = {k: v.detach().contiguous().cpu() for k, v in module.model.state_dict().items()}
    with fmt.atomic_folder(Path(folder)) as tmp:
        (tmp / fmt.CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        save_file(state, str(tmp / fmt.WEIGHTS_FILE))
        (tmp / fmt.CARD_FILE).write_text(_module_card(module))
    return Path(folder)


def _module_card(module: ClassModule) -> str:
    cfg = module.model.config
    units = ", ".join(f"{k} {v}/{module.stats.get('unit_widths', {}).get(k, '?')}"
                      for k, v in sorted(module.stats.get("units", {}).items()))
    share = module.stats.get("weight_share")
    encs = ", ".join(f"{m}: {r['name']} (sha256 {str(r['weights_sha256'])[:12]}…)"
                     for m, r in sorted(module.encoders.items()))
    return "\n".join([
        f"# module `{module.label}`", "",
        f"The class module of `{module.label}` (class {module.class_index} of {len(cfg.labels)}) decomposed from "
        f"`{module.source or 'a fused model'}`: its {cfg.stage}-fusion {cfg.fusion_head} head side with unit masks "
        "(docs/modularity.md).", "",
        f"- frozen encoders, by reference: {encs}",
        f"- units kept: {units or 'all'}",
        f"- head-side weights used: {share:.3f}" if isinstance(share, float) else "- head-side weights used: -",
        "", "Compose modules into a model: `fusion-zoo compose MODULE... --output MODEL`.", ""])


def load_module(folder: str | Path) -> ClassModule:
    """Read a module folder written by :func:`save_module`; errors name the folder."""
    folder = Path(folder)
    config = folder / fmt.CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{folder} has no {fmt.CONFIG_FILE}; give a module folder written by "
                              "`fusion-zoo decompose`.")
    try:
        doc = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config} is not valid JSON ({e}).") from e
    if not isinstance(doc, dict) or doc.get("format") != MODULE_FORMAT:
        raise CheckpointError(f"{folder} is not a module folder (no \"format\": \"{MODULE_FORMAT}\"); modules come "
                              "from `fusion-zoo decompose`.")
    cfg = FusionModelConfig.from_dict(doc["model"])
    state = load_file(str(folder / fmt.WEIGHTS_FILE))
    dims = {m: int(state[f"feature_norm.{m}.mean"].shape[0]) for m in cfg.modalities} if cfg.standardize else \
        _dims_from_state(cfg, state)
    model = FusionModel(cfg, embed_dims=dims)
    model.set_unit_masks({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("unit_masks.")})
    model.load_state_dict(state)
    return ClassModule(str(doc["label"]), int(doc["class_index"]), model.eval(), dict(doc["encoders"]),
                       str(doc.get("source") or folder), dict(doc.get("stats") or {}))


def _dims_from_state(cfg: FusionModelConfig, state: Mapping[str, Tensor]) -> dict[str, int]:
    """Encoder widths from the first layer that reads each modality's features."""
    dims = {}
    for m in cfg.modalities:
        key = next((k for k in (f"proj.{m}.weight", f"proj.{m}.0.weight", f"late_encoders.{m}.0.weight")
                    if k in state), None)
        if key is None:
            raise CheckpointError(f"cannot tell the {m} feature width from the module's weights.")
        dims[m] = int(state[key].shape[1])
    return dims
