"""Modular models: objectives pinned on exact values, decompose -> compose reproduces the model, module folders,
composition across models, replacement, and composed models that load, predict and export like any zoo model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from encoders import ModalityOutput
from fusion_errors import ConfigError
from fusion_heads import list_fusion_heads
from zoo.config import FusionModelConfig
from zoo.hub import from_pretrained, save_pretrained
from zoo.model import FusionModel
from zoo.modular import (
    WEIGHT_COVERAGES,
    ModuleError,
    calibrate,
    calibrate_replacement,
    class_masks,
    compose,
    decompose,
    load_module,
    modularity_losses,
    replace_module,
    save_module,
    unit_jaccard,
    weight_jaccard,
    weight_masks,
)

from .conftest import FAKE, LABELS

#: decompose -> compose of every module with coverage 1.0 keeps every unit any class uses: the composed logits
#: are the original ones up to float32 summation order
TOLERANCE = 1e-5


def feats(n: int = 24, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, ModalityOutput]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, d in sorted((dims or {"audio": 6, "image": 6, "text": 6}).items()):
        tokens = torch.randn(n, 3, d, generator=g)  # [N, 3, D]
        out[m] = ModalityOutput(tokens, torch.ones(n, 3, dtype=torch.bool), tokens.mean(1))
    return out


def head_only(stage: str = "early", head: str = "concat", seed: int = 0, **kw) -> FusionModel:
    torch.manual_seed(seed)
    cfg = FusionModelConfig(encoders={m: FAKE[m] for m in ("audio", "image", "text")}, labels=LABELS, stage=stage,
                            fusion_head=head, hidden_dim=8, **kw)
    return FusionModel(cfg, embed_dims=dict.fromkeys(("audio", "image", "text"), 6)).eval()


def logits(model: FusionModel, f: dict[str, ModalityOutput]) -> torch.Tensor:
    with torch.no_grad():
        return model.fuse(f).logits


def test_objectives_on_written_out_patterns() -> None:
    """Two classes on disjoint units, two samples each: perfect affinity (0) and dispersion (0); each sample
    has 1 of 4 units on: density 1 / sqrt(4) = 0.5."""
    a = torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, -1.0, 0]])
    out = modularity_losses({"x": a}, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(out["affinity"], torch.tensor(0.0))
    torch.testing.assert_close(out["dispersion"], torch.tensor(0.0))
    torch.testing.assert_close(out["compactness"], torch.tensor(0.5))
    same = modularity_losses({"x": torch.ones(4, 4)}, torch.tensor([0, 0, 1, 1]))  # every sample the same
    torch.testing.assert_close(same["dispersion"], torch.tensor(1.0))
    torch.testing.assert_close(same["compactness"], torch.tensor(1.0))


def test_class_masks_keep_the_fewest_units_covering_the_share() -> None:
    imp = {"x": torch.tensor([[0.5, 0.3, 0.2, 0.0]])}
    assert class_masks(imp, 0, 0.5)["x"].tolist() == [1, 0, 0, 0]
    assert class_masks(imp, 0, 0.8)["x"].tolist() == [1, 1, 0, 0]
    assert class_masks(imp, 0, 1.0)["x"].tolist() == [1, 1, 1, 0]  # a unit with no attribution is never kept


@pytest.mark.parametrize("stage", ["early", "late", "hybrid"])
@pytest.mark.parametrize("head", list_fusion_heads())
def test_decompose_then_compose_all_modules_reproduces_the_model(stage: str, head: str) -> None:
    model = head_only(stage, head)
    f = feats()
    modules = decompose(model, f, coverage=1.0)
    assert [m.label for m in modules] == list(LABELS)
    composed = compose(modules, with_encoders=False)
    torch.testing.assert_close(logits(composed, f), logits(model, f), rtol=0, atol=TOLERANCE)
    assert all(0 < m.stats["weight_share"] <= 1 for m in modules)


def test_smaller_coverage_keeps_fewer_units_and_weights() -> None:
    model = head_only()
    f = feats(48)
    full, small = decompose(model, f, coverage=1.0), decompose(model, f, coverage=0.5)
    for a, b in zip(full, small, strict=True):
        assert sum(b.stats["units"].values()) < sum(a.stats["units"].values())
        assert b.stats["weight_share"] < a.stats["weight_share"]
    overlap = unit_jaccard(small)
    assert len(overlap) == 3 and all(0 <= x <= 1 for x in overlap)


def test_module_folder_round_trip_and_composed_model_is_a_zoo_model(make_model, raw, tmp_path: Path) -> None:
    model = make_model(stage="hybrid", fusion_head="gating")
    batch = model.preprocess(**raw)
    f = model.encode(batch)
    modules = decompose(model, f, coverage=1.0, source="m")
    folders = [save_module(m, tmp_path / "modules" / m.label) for m in modules]
    assert sorted(p.name for p in folders[0].iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = [load_module(p) for p in folders]
    assert loaded[0].encoders == modules[0].encoders and loaded[0].encoders["text"]["weights_sha256"]
    composed = compose(loaded)
    torch.testing.assert_close(logits(composed, f), logits(model, f), rtol=0, atol=TOLERANCE)
    path = save_pretrained(composed, tmp_path / "composed")
    again = from_pretrained(path)
    torch.testing.assert_close(logits(again, f), logits(model, f), rtol=0, atol=TOLERANCE)
    rows = again.predict(**raw)
    assert [r["label"] for r in rows] == [LABELS[i] for i in logits(model, f).argmax(-1).tolist()]
    assert set(rows[0]["explain"]["contribution"]) == {"audio", "image", "text"}


def test_composed_model_exports_to_torchscript(make_model, raw, tmp_path: Path) -> None:
    from zoo.export import export, verify_export

    model = make_model()
    composed = compose(decompose(model, model.encode(model.preprocess(**raw)), coverage=0.9))
    out = export(composed, tmp_path / "m.pt", format="torchscript")
    assert verify_export(composed, out) < 1e-4


def test_compose_refuses_modules_over_other_encoders(make_model, raw) -> None:
    a = make_model()
    b = make_model(modalities=("image", "text"))
    ma = decompose(a, a.encode(a.preprocess(**raw)), 1.0)
    mb = decompose(b, b.encode(b.preprocess(image=raw["image"], text=raw["text"])), 1.0)
    with pytest.raises(ModuleError, match="reads other encoders") as e:
        compose([ma[0], mb[1]])
    assert "\n" not in str(e.value)
    with pytest.raises(ModuleError, match="more than one module"):
        compose([ma[0], ma[0]])


def test_replace_swaps_one_class_and_keeps_the_others() -> None:
    weak, strong = head_only(seed=0), head_only(seed=1)
    f = feats()
    new = next(m for m in decompose(strong, f, 1.0) if m.label == "b")
    repaired = replace_module(weak, "b", new)
    assert len(repaired.parts) == 2  # the rest of the weak model stays one part
    got, w, s = logits(repaired, f), logits(weak, f), logits(strong, f)
    torch.testing.assert_close(got[:, [0, 2]], w[:, [0, 2]], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(got[:, 1], s[:, 1], rtol=0, atol=TOLERANCE)
    with pytest.raises(ModuleError, match="not one of the model's labels"):
        replace_module(weak, "z", new)
    with pytest.raises(ModuleError, match="scores 'b', not 'a'"):
        replace_module(weak, "a", new)


def test_weight_masks_keep_the_fewest_entries_covering_the_share() -> None:
    imp = {"w": torch.tensor([[[4.0, 3.0], [2.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])}  # [C=2, 2, 2]
    assert weight_masks(imp, 0, 0.6)["w"].tolist() == [[1.0, 1.0], [0.0, 0.0]]  # 4 + 3 = 0.7 of 10
    assert weight_masks(imp, 0, 0.3)["w"].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert weight_masks(imp, 0, 1.0)["w"].tolist() == [[1.0, 1.0], [1.0, 1.0]]  # 1.0: no pruning
    with pytest.raises(ConfigError, match="weight_coverage=0"):
        weight_masks(imp, 0, 0.0)


def test_weight_pruning_zeroes_weights_and_shrinks_modules() -> None:
    model = head_only()
    f = feats(48)
    units_only, pruned = decompose(model, f, 1.0), decompose(model, f, 1.0, weight_coverage=0.5)
    for a, b in zip(units_only, pruned, strict=True):
        assert b.stats["weight_share"] < a.stats["weight_share"]
        zero = sum(int((p == 0).sum()) for n, p in b.model.named_parameters() if p.dim() == 2)
        assert zero > 0 and b.model.classifier.bias.equal(model.classifier.bias)  # biases are not pruned
    assert all(x == 1.0 for x in weight_jaccard(units_only))  # unpruned: every module keeps every weight
    assert all(0 <= x < 1 for x in weight_jaccard(pruned))


def test_chosen_weight_coverage_keeps_the_models_predictions() -> None:
    model = head_only()
    f = feats(48)
    modules = decompose(model, f, 1.0, weight_coverage=None)
    chosen = modules[0].stats["weight_coverage"]
    assert chosen in (*WEIGHT_COVERAGES, 1.0) and all(m.stats["weight_coverage"] == chosen for m in modules)
    agree = (logits(compose(modules, with_encoders=False), f).argmax(-1) == logits(model, f).argmax(-1)).float()
    assert float(agree.mean()) >= 0.99
    if chosen > WEIGHT_COVERAGES[0]:  # a smaller coverage was tried and lost predictions
        pruned = decompose(model, f, 1.0, weight_coverage=WEIGHT_COVERAGES[0])
        assert not logits(compose(pruned, with_encoders=False), f).argmax(-1).equal(logits(model, f).argmax(-1))


def test_calibrating_one_class_leaves_the_other_columns_alone() -> None:
    weak, strong = head_only(seed=0), head_only(seed=1)
    f = feats(64)
    repaired = replace_module(weak, "b", decompose(strong, f, 1.0)[1])
    calibrate(repaired, f, logits(strong, f).argmax(-1), classes=[1])
    assert repaired.module_scale[[0, 2]].tolist() == [1.0, 1.0] and repaired.module_bias[[0, 2]].tolist() == [0, 0]
    assert float(repaired.module_scale[1]) != 1.0 or float(repaired.module_bias[1]) != 0.0
    torch.testing.assert_close(logits(repaired, f)[:, [0, 2]], logits(weak, f)[:, [0, 2]], rtol=0, atol=TOLERANCE)


def test_calibration_fits_scale_and_bias_on_validation_data() -> None:
    model = head_only()
    f = feats(64)
    y = logits(model, f).argmax(-1)  # labels the model gets right, then a composed copy with shifted scores
    composed = compose(decompose(model, f, 1.0), with_encoders=False)
    top = int(y.mode().values)  # the class predicted most: its module now scores far too low
    composed.parts[top].classifier.bias.data -= 5.0
    result = calibrate(composed, f, y)
    assert result["val_accuracy_after"] > result["val_accuracy_before"]
    assert float(composed.module_bias[top]) > 1.0 and bool((composed.module_scale > 0).all())


def test_modularity_setting_is_validated_and_old_configs_load() -> None:
    cfg = head_only(modularity={"affinity": 1, "compactness": 0.1}).config
    assert cfg.modularity == {"affinity": 1.0, "compactness": 0.1}
    assert FusionModelConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("modularity", "modules")}
    assert FusionModelConfig.from_dict(old).modularity is None
    with pytest.raises(ConfigError, match="did you mean modularity.affinity"):
        cfg.replace(modularity={"afinity": 1.0})
    with pytest.raises(ConfigError, match=r"modularity.dispersion=-1 must be"):
        cfg.replace(modularity={"dispersion": -1})
    with pytest.raises(ConfigError, match="multiclass"):
        cfg.replace(modularity={"affinity": 1.0}, task="regression")
    assert math.isfinite(float(modularity_losses(head_only().fuse(feats()).units, torch.tensor([0, 1] * 12))
                               ["affinity"]))


def test_hidden_activations_are_unit_layers_and_their_masks_apply_at_inference() -> None:
    """The concat MLP's GELU and the trunk MLP's ReLU are unit layers: recorded in ``units`` and masked in eval
    mode without gradients too (the trunk's fused inference path would skip the mask)."""
    model = head_only()
    f = feats()
    widths = model.unit_widths()
    assert widths["head_hidden"] == 16 and widths["trunk_hidden"] == 16  # 2 x hidden_dim each
    out = model.fuse(f)
    assert out.units["head_hidden"].shape == (24, 16) and out.units["trunk_hidden"].shape == (24, 16)
    assert bool((out.units["trunk_hidden"] >= 0).all())  # post-ReLU
    before = logits(model, f)
    model.set_unit_masks({"trunk_hidden": torch.zeros(16)})
    with torch.no_grad():
        masked = model.fuse(f)
    assert bool((masked.units["trunk_hidden"] == 0).all()) and not torch.allclose(masked.logits, before)


def test_a_deep_copy_masks_its_own_hidden_units() -> None:
    import copy

    model = head_only()
    f = feats()
    twin = copy.deepcopy(model).set_unit_masks({"head_hidden": torch.zeros(16)})
    assert not torch.allclose(logits(twin, f), logits(model, f))
    assert "head_hidden" in model.fuse(f).units and "head_hidden" in twin.fuse(f).units


@pytest.mark.parametrize("head", ["moe", "cross_attention"])
def test_objectives_read_one_row_a_sample_on_every_hidden_layer(head: str) -> None:
    """Routed (expert) and repeated activations are recorded apart and left out of the objectives."""
    model = head_only(head=head)
    units = model.fuse(feats()).units
    per_sample = [k for k in units if "." not in k]
    assert all(units[k].shape[0] == 24 and units[k].dim() == 2 for k in per_sample)
    assert any(k.startswith("head_hidden") for k in units)
    labels = torch.tensor([0, 1, 2] * 8)
    assert math.isfinite(float(modularity_losses(units, labels, hidden=True)["dispersion"]))
    dense = {k: v for k, v in units.items() if "_hidden" not in k}
    for key, value in modularity_losses(units, labels).items():  # training leaves the hidden layers out
        torch.testing.assert_close(value, modularity_losses(dense, labels)[key])


def test_bounded_replacement_calibration_keeps_every_other_class() -> None:
    """The swapped class wins as many of its validation rows as it can while no other class loses more than the
    tolerance against the unrepaired model; only its own scale and bias move."""
    weak, strong = head_only(seed=0), head_only(seed=1)
    f = feats(96)
    y = logits(strong, f).argmax(-1)  # the donor is right on every row
    repaired = replace_module(weak, "b", decompose(strong, f, 1.0)[1])
    reference = logits(weak, f).argmax(-1)
    fit = calibrate_replacement(repaired, f, y, 1, reference, tolerance=0.0)
    pred = logits(repaired, f).argmax(-1)
    for c in (0, 2):
        rows = y == c
        assert int((pred[rows] == c).sum()) >= int((reference[rows] == c).sum())
    recall = float((pred[y == 1] == 1).float().mean())
    assert recall == pytest.approx(fit["target_recall"])
    assert recall >= float((reference[y == 1] == 1).float().mean())
    assert repaired.module_scale[[0, 2]].tolist() == [1.0, 1.0] and repaired.module_bias[[0, 2]].tolist() == [0, 0]
    torch.testing.assert_close(logits(repaired, f)[:, [0, 2]], logits(weak, f)[:, [0, 2]], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("head", ["concat", "moe", "cross_attention"])
def test_batched_weight_attribution_equals_one_pass_a_class(head: str) -> None:
    from zoo.modular import _weight_params, weight_importance

    model = head_only(head=head)
    f = feats(32)
    got = weight_importance(model, f)
    for name, p in _weight_params(model):
        for k in range(3):
            expected = torch.zeros_like(p)
            for start in range(0, 32, 16):
                part = {m: x.index(torch.arange(start, start + 16)) for m, x in f.items()}
                g = torch.autograd.grad(model.fuse(part).logits[:, k].sum(), p, allow_unused=True)[0]
                if g is not None:
                    expected += (p.detach() * g).abs()
            torch.testing.assert_close(got[name][k], expected, rtol=1e-5, atol=1e-6)


def test_own_rows_rule_reads_only_the_rows_predicted_as_the_class() -> None:
    from zoo.modular import unit_importance

    model = head_only()
    f = feats(48)
    pred = logits(model, f).argmax(-1)
    own, every = unit_importance(model, f, rows="own"), unit_importance(model, f, rows="all")
    mixed = unit_importance(model, f, rows="own-hidden")
    for k in pred.unique().tolist():
        alone = unit_importance(model, {m: x.index((pred == k).nonzero().flatten()) for m, x in f.items()})
        for layer in own:
            torch.testing.assert_close(own[layer][k], alone[layer][k], rtol=1e-5, atol=1e-7)
            want = alone if "_hidden" in layer else every
            torch.testing.assert_close(mixed[layer][k], want[layer][k], rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="rows='some'"):
        unit_importance(model, f, rows="some")


def test_hidden_coverage_is_chosen_to_keep_the_predictions() -> None:
    from zoo.modular import HIDDEN_COVERAGES

    model = head_only()
    f = feats(48)
    modules = decompose(model, f, 0.5)  # weight_coverage 1.0: only the hidden layers' coverage is chosen
    chosen = modules[0].stats["hidden_coverage"]
    assert chosen in (0.5, *HIDDEN_COVERAGES) and all(m.stats["hidden_coverage"] == chosen for m in modules)
    agree = (logits(compose(modules, with_encoders=False), f).argmax(-1) == logits(model, f).argmax(-1)).float()
    assert float(agree.mean()) >= 0.99 or chosen == 1.0
    fixed = decompose(model, f, 0.5, hidden_coverage=0.5)
    assert fixed[0].stats["hidden_coverage"] == 0.5
    kept = [sum(m.stats["units"]["trunk_hidden"] for m in mods) for mods in (fixed, modules)]
    assert kept[0] <= kept[1]
