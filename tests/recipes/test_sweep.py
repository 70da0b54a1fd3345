"""The sweep on synthetic cached features: outputs, resume after an interruption, CLI parsing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders import ModalityOutput
from fusion_errors import ConfigError
from recipes.sweep import pool as pool_mod
from recipes.sweep import run as sweep_mod
from recipes.sweep.run import FeatureSet, SweepSettings, parse_args, read_cells, run_sweep
from recipes.sweep.train import SplitFeatures

DIMS = {"audio": 6, "image": 8, "text": 5}


def _split(n: int, seed: int, tokens: bool) -> SplitFeatures:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    t = 3 if tokens else 1
    feats = {}
    for m, d in DIMS.items():
        tok = torch.randn(n, t, d, generator=gen)
        tok[:, :, 0] += labels[:, None].float() * 2.0
        feats[m] = ModalityOutput(tok, torch.ones(n, t, dtype=torch.bool), tok.mean(1))
    return SplitFeatures(feats, labels)


def _provider(calls: list[bool]):
    def provide(settings: SweepSettings, tokens: bool) -> FeatureSet:
        calls.append(tokens)
        return FeatureSet(_split(48, 0, tokens), _split(24, 1, tokens), ["a", "b", "c"], "multiclass",
                          {"dataset": "synthetic"})
    return provide


def _settings(out: Path, **kw) -> SweepSettings:
    base = dict(heads=["concat", "gating"], stages=["early", "late"], seeds=[0, 1], output_dir=str(out),
                max_epochs=1, batch_size=16, model={"hidden_dim": 16, "modality_dropout": 0.1, "fuse_tokens": True},
                noise=[0.5, 1.0], token_drop=[0.5])
    return SweepSettings(**(base | kw))


def test_sweep_writes_csv_markdown_and_plots(tmp_path: Path) -> None:
    calls: list[bool] = []
    lines: list[str] = []
    paths = run_sweep(_settings(tmp_path), _provider(calls), echo=lines.append)
    assert calls == [True]  # one encoder pass with tokens serves early and (as a pooled view) late
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 8
    assert {(r["head"], r["stage"], r["seed"]) for r in rows} == {
        (h, s, str(k)) for h in ("concat", "gating") for s in ("early", "late") for k in (0, 1)}
    for col in ("fused_accuracy", "alone_audio", "alone_text", "rob_only:image+text", "rob_image_noise@1",
                "rob_text_drop@0.5", "params", "train_seconds", "latency_ms"):
        assert all(r[col] != "" for r in rows), col
    md = (tmp_path / "results.md").read_text()
    assert "± " in md and ("larger than seed noise" in md or "within seed noise" in md)
    assert "| gating | early | 2 |" in md
    for name in ("accuracy.png", "robustness.png", "gates_early_gating.png", "gates_late_gating.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert not (tmp_path / "gates_early_concat.png").exists()
    assert paths["md"] == tmp_path / "results.md"
    assert any(line.startswith("[8/8] gating@late seed=1") for line in lines)
    assert any("epoch 1/1" in line for line in lines)  # per-run progress


def test_interrupted_sweep_finishes_only_missing_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pool_mod.train_cell
    ran: list[tuple[str, int]] = []

    def flaky(config, *args, **kwargs):
        if len(ran) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the fourth cell
        ran.append((f"{config.fusion_head}@{config.stage}", args[2]))
        return real(config, *args, **kwargs)

    monkeypatch.setattr(pool_mod, "train_cell", flaky)
    settings = _settings(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(settings, _provider([]), echo=lambda s: None)
    assert len(read_cells(tmp_path / "cells.jsonl", settings.signature())) == 3
    assert not (tmp_path / "results.csv").exists()

    # a torn last line (killed mid-write) must not break the rerun
    with open(tmp_path / "cells.jsonl", "a") as f:
        f.write('{"key": "concat@late@seed1", "sign')
    ran.clear()
    monkeypatch.setattr(pool_mod, "train_cell", lambda config, *a, **k: (ran.append(
        (f"{config.fusion_head}@{config.stage}", a[2])), real(config, *a, **k))[1])
    lines: list[str] = []
    run_sweep(settings, _provider([]), echo=lines.append)
    assert len(ran) == 5 and len(set(ran)) == 5
    assert ("concat@late", 0) not in ran and ("concat@late", 1) in ran
    assert sum("(skipped)" in line for line in lines) == 3
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 8
    keys = [json.loads(line)["key"] for line in (tmp_path / "cells.jsonl").read_text().splitlines()
            if line.startswith('{"') and line.endswith("}")]
    assert len(keys) == 8 and len(set(keys)) == 8

    # a third run has nothing left to do (no features needed); changed settings (epochs) do not reuse old cells
    ran.clear()
    calls: list[bool] = []
    run_sweep(settings, _provider(calls), echo=lambda s: None)
    assert ran == [] and calls == []
    run_sweep(_settings(tmp_path, max_epochs=2, seeds=[0], heads=["concat"], stages=["late"]), _provider(calls),
              echo=lambda s: None)
    assert ran == [("concat@late", 0)] and calls == [False]  # a late-only grid needs pooled features only


def test_parse_args_overrides_and_defaults(tmp_path: Path) -> None:
    s = parse_args(["--heads", "concat,moe", "--stages", "late", "--seeds", "3", "--output-dir", str(tmp_path),
                    "--model.hidden_dim", "32", "--model.modality_dropout={image: 0.2}", "--data.batch_size", "8"])
    assert (s.heads, s.stages, s.seeds) == (["concat", "moe"], ["late"], [3])
    assert s.model["hidden_dim"] == 32 and s.model["modality_dropout"] == {"image": 0.2}
    assert s.model.get("encoders") is None  # the default recipe names none: the data's modalities decide
    assert s.data["batch_size"] == 8
    d = parse_args([])
    assert d.heads == ["concat", "average", "cross_attention", "gating", "moe"] and len(d.seeds) == 3
    with pytest.raises(ConfigError, match="unknown sweep option"):
        parse_args(["--trainer.max_epochs", "3"])


def test_a_sweep_compares_variants_of_one_head(tmp_path: Path) -> None:
    """``--heads gating,gating:floor=0.5``: a row each, and the variant's option (on top of the recipe's
    head_options) reaches the head its cell builds."""
    run_sweep(_settings(tmp_path, heads=["concat", "gating", "gating:floor=0.5"], stages=["late"], seeds=[0]),
              _provider([]), echo=lambda s: None)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["head"] for r in rows] == ["concat", "gating", "gating:floor=0.5"]
    records = [json.loads(line) for line in (tmp_path / "cells.jsonl").read_text().splitlines()]
    floored = next(r for r in records if r["head"] == "gating:floor=0.5")
    plain = next(r for r in records if r["head"] == "gating")
    assert floored["params"] == plain["params"]  # same head, another option
    assert "| gating:floor=0.5 | late | 1 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "gates_late_gating-floor=0.5.png").stat().st_size > 1000
    settings = _settings(tmp_path, model={"hidden_dim": 16, "head_options": {"per_unit": True}})
    fs = _provider([])(settings, False)
    config = sweep_mod._cell_config(settings, fs, "gating:floor=0.5", "late")
    assert config.fusion_head == "gating" and config.head_options == {"per_unit": True, "floor": 0.5}
    from zoo.model import FusionModel

    head = FusionModel(config, embed_dims=DIMS).fusion_head
    assert head.floor == 0.5 and head.per_unit


@pytest.mark.parametrize(("entry", "needle"), [("gating:floor", "is not OPTION=VALUE"),
                                               ("gating:flor=0.5", "flor"),
                                               ("gatting:floor=0.5", "not a fusion head"),
                                               ("gating:floor=[0.5", "is not a YAML value")])
def test_a_bad_head_variant_is_a_config_error_before_any_encoding(tmp_path: Path, entry: str, needle: str) -> None:
    calls: list[bool] = []
    with pytest.raises(ConfigError, match=needle):
        run_sweep(_settings(tmp_path, heads=[entry]), _provider(calls), echo=lambda s: None)
    assert calls == []


def test_a_streaming_recipe_is_refused_before_any_encoding(tmp_path: Path) -> None:
    calls: list[bool] = []
    settings = _settings(tmp_path)
    settings.data = {**(settings.data or {}), "streaming": True}
    with pytest.raises(ConfigError, match="data.streaming"):
        run_sweep(settings, _provider(calls), echo=lambda s: None)
    assert calls == []


def test_cli_sweep_bad_option_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recipes.cli import main as cli_main

    assert cli_main(["sweep", "--heads", "nope", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusion-zoo sweep: ConfigError:") and "nope" in err and "\n" not in err


def test_unknown_head_or_stage_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a fusion head"):
        run_sweep(_settings(tmp_path, heads=["nope"]), _provider([]), echo=lambda s: None)
    with pytest.raises(ConfigError, match="stages"):
        run_sweep(_settings(tmp_path, stages=["middle"]), _provider([]), echo=lambda s: None)


def test_cli_sweep_on_tridigits_with_tiny_encoders_reuses_the_feature_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from recipes.cache import FeatureCache
    from recipes.cli import main as cli_main

    common = ["--stages", "early,late", "--seeds", "0", "--max-epochs", "1", "--model.fuse_tokens", "true",
              "--model.encoders={audio: mel-cnn, image: tiny-image, text: tiny-text}", "--model.hidden_dim", "16",
              "--data.max_samples", "16", "--data.cache_dir", str(tmp_path / "cache")]
    assert cli_main(["sweep", "--heads", "concat", "--output-dir", str(tmp_path / "a"), *common]) == 0
    # 3 modalities × train/validation/test (the data module prepares validation with train), encoded once
    assert len(list((tmp_path / "cache").glob("*.features"))) == 9
    rows = list(csv.DictReader((tmp_path / "a" / "results.csv").open()))
    assert [(r["head"], r["stage"]) for r in rows] == [("concat", "early"), ("concat", "late")]
    header = (tmp_path / "a" / "results.md").read_text()
    assert "2x2 pooled patches" in header and "first 16 rows" in header
    printed = "".join(capfd.readouterr())
    assert "[1/2] concat@early" in printed  # the sweep's own progress shows ...
    for noise in ("litlogger", "TPU available", "LeafSpec"):  # ... the cells' Lightning chatter does not
        assert noise not in printed, noise

    def no_encoding(*args, **kwargs):
        raise AssertionError("a second sweep must read the feature cache, not run the encoders")

    FeatureCache.clear_memory()  # force the disk path, as a new process would see it
    monkeypatch.setattr(FeatureCache, "_compute", no_encoding)
    assert cli_main(["sweep", "--heads", "moe", "--output-dir", str(tmp_path / "b"), *common]) == 0
    assert (tmp_path / "b" / "gates_late_moe.png").is_file()


def test_sweep_of_pooled_cells_reads_the_entries_fit_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fit, then a sweep of the same data and encoders (default recipe: one pooled vector per modality): the sweep
    encodes nothing, whatever the stage (issue 10: fit, test, predict and the sweep share one cache)."""
    from recipes.cache import FeatureCache
    from recipes.cli import main as cli_main

    cache = tmp_path / "cache"
    data = ["--data.max_samples", "16", "--data.cache_dir", str(cache)]
    enc = "--model.encoders={image: pixels}"  # no random weights: the same encoder in both processes
    assert cli_main(["fit", enc, "--model.hidden_dim", "16", "--trainer.max_epochs", "1",
                     "--trainer.default_root_dir", str(tmp_path / "runs"), *data]) == 0
    entries = sorted(cache.glob("*.features"))
    assert entries  # the fit cached its frozen image features

    def no_encoding(*args, **kwargs):
        raise AssertionError("the sweep must read the entries fit wrote, not run the encoder")

    FeatureCache.clear_memory()  # a sweep in a new process sees only the disk
    monkeypatch.setattr(FeatureCache, "_compute", no_encoding)
    assert cli_main(["sweep", "--heads", "concat", "--stages", "early,late", "--seeds", "0", "--max-epochs", "1",
                     enc, "--model.hidden_dim", "16", "--output-dir", str(tmp_path / "sweep"), *data]) == 0
    assert sorted(cache.glob("*.features")) == entries  # nothing new written either
    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert [(r["head"], r["stage"]) for r in rows] == [("concat", "early"), ("concat", "late")]


@pytest.mark.slow  # the default image and text encoders' real weights
def test_sweep_with_no_encoders_named_uses_the_modalities_the_data_has(tmp_path: Path) -> None:
    """An image + text table (no audio column) with the default recipe: the sweep encodes image and text only, as
    `fusion-zoo fit` would, instead of stopping on the missing audio column."""
    from PIL import Image

    from recipes.cli import main as cli_main

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for split, n in (("train", 24), ("validation", 8), ("test", 8)):
        lines = ["image,question,answer"]
        for i in range(n):
            label = i % 2
            pixels = (rng.random((8, 8, 3)) * 60 + 190 * label).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "img" / f"{split}{i}.png")
            lines.append(f"img/{split}{i}.png,is it {'bright' if label else 'dark'}?,{'yes' if label else 'no'}")
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "sweep"
    assert cli_main(["sweep", "--heads", "concat", "--stages", "late", "--seeds", "0", "--max-epochs", "1",
                     "--model.encoders=null", "--data.data_dir", str(tmp_path), "--data.cache_dir",
                     str(tmp_path / "cache"), "--output-dir", str(out)]) == 0
    info = (out / "results.md").read_text()
    assert "image" in info and "text" in info and "audio" not in info
    assert f"- dataset: {tmp_path}\n" in info  # the folder swept, not the bundled dataset's name
    assert "(tridigits)" not in info


def test_token_caps_and_pooled_view() -> None:
    from recipes.sweep.features import cap_tokens, pooled_view

    n = 3
    img = ModalityOutput(torch.arange(n * 49 * 2, dtype=torch.float).reshape(n, 49, 2),
                         torch.ones(n, 49, dtype=torch.bool), torch.zeros(n, 2))
    capped = cap_tokens(img, "image")
    assert capped.tokens.shape == (n, 4, 2) and bool(capped.mask.all())
    assert torch.equal(capped.pooled, img.pooled)
    grid = img.tokens.reshape(n, 7, 7, 2)
    assert torch.allclose(capped.tokens[:, 0], grid[:, :4, :4].mean((1, 2)))  # top-left cell of the 2x2 grid
    mask = torch.ones(n, 20, dtype=torch.bool)
    mask[0, 10:] = False
    audio = cap_tokens(ModalityOutput(torch.randn(n, 20, 4), mask, torch.randn(n, 4)), "audio")
    assert audio.tokens.shape[1] == 3 and audio.mask[0].tolist() == [True, True, False]
    view = pooled_view(_split(5, 0, True))
    assert view.feats["text"].tokens.shape == (5, 1, 5)
    assert torch.equal(view.feats["text"].tokens[:, 0], view.feats["text"].pooled)


@pytest.mark.parametrize(("flag", "needle"), [
    ("--model.hidden_dimm", "unknown key --model.hidden_dimm .*did you mean --model.hidden_dim?"),
    ("--model.learning_rate", "unknown key --model.learning_rate"),
    ("--model.warmup_ration", "did you mean --model.warmup_ratio?"),
])
def test_a_typo_in_the_model_settings_names_the_close_match(flag: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_args([flag, "32"])


def test_sweep_cells_are_checked_by_the_configs(tmp_path: Path) -> None:
    """A grid given directly (not through parse_args) is checked before any features are computed; optimizer and
    model values go through OptimConfig / FusionModelConfig."""
    calls: list[bool] = []
    with pytest.raises(ConfigError, match="did you mean --model.dropout?"):
        run_sweep(_settings(tmp_path, model={"dropuot": 0.1}), _provider(calls), echo=lambda s: None)
    with pytest.raises(ConfigError, match="lr=-1 must be a finite number > 0"):
        run_sweep(_settings(tmp_path, model={"lr": -1}), _provider(calls), echo=lambda s: None)
    with pytest.raises(ConfigError, match="init_from does not apply to a sweep"):
        run_sweep(_settings(tmp_path, model={"init_from": "tridigits-late-gating"}), _provider(calls),
                  echo=lambda s: None)
    assert calls == []  # nothing was encoded


def test_a_cell_reports_the_weights_of_its_lowest_validation_loss_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation labels are the training labels reversed, so every epoch of training raises the validation loss:
    the lowest is after epoch 1, and the cell must be evaluated with those weights, not the last epoch's."""
    import torch.nn.functional as F

    from recipes.settings import OptimConfig
    from recipes.sweep import train as train_mod
    from zoo.config import FusionModelConfig

    train, test = _split(96, 0, False), _split(24, 1, False)
    val = SplitFeatures(train.feats, 2 - train.labels)  # same inputs, labels 0 <-> 2
    seen = []
    monkeypatch.setattr(train_mod, "head_latency_ms", lambda model, split: seen.append(model) or 0.0)
    config = FusionModelConfig(encoders={m: "cached-features" for m in DIMS}, labels=("a", "b", "c"),
                               fusion_head="concat", stage="early", hidden_dim=16)
    result = train_mod.train_cell(config, train, test, seed=0, max_epochs=4, batch_size=16,
                                  optim=OptimConfig(lr=3e-3), robustness={"noise": [0.5], "token_drop": [0.5]},
                                  echo=lambda _: None, val=val)
    losses = result["val_losses"]
    assert len(losses) == 4 and losses[0] < losses[-1]
    assert result["best_epoch"] == 1 + losses.index(min(losses))
    model = seen[0].eval()
    with torch.no_grad():
        logits = model.fuse({m: f.index(torch.arange(len(val))) for m, f in val.feats.items()}).logits
    assert abs(float(F.cross_entropy(logits, val.labels)) - min(losses)) < 1e-4  # the restored weights


def test_a_cell_without_validation_reports_its_last_epoch() -> None:
    from recipes.settings import OptimConfig
    from recipes.sweep.train import train_cell
    from zoo.config import FusionModelConfig

    config = FusionModelConfig(encoders={m: "cached-features" for m in DIMS}, labels=("a", "b", "c"),
                               fusion_head="concat", stage="early", hidden_dim=16)
    result = train_cell(config, _split(48, 0, False), _split(24, 1, False), seed=0, max_epochs=2, batch_size=16,
                        optim=OptimConfig(), robustness={"noise": [0.5], "token_drop": [0.5]}, echo=lambda _: None)
    assert result["best_epoch"] == 2 and result["val_losses"] == []


def test_a_cell_with_balanced_class_weights_weighs_its_own_training_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model.class_weights balanced` in a sweep: the validation loss a cell keeps is the cross-entropy weighted
    by N / (C * n_c) over that cell's training labels (written out here from the counts)."""
    import torch.nn.functional as F

    from recipes.settings import OptimConfig
    from recipes.sweep import train as train_mod
    from zoo.config import FusionModelConfig

    train, test = _split(96, 0, False), _split(24, 1, False)
    keep = torch.cat([torch.nonzero(train.labels != 2)[:, 0], torch.nonzero(train.labels == 2)[:4, 0]])
    train = SplitFeatures({m: f.index(keep) for m, f in train.feats.items()}, train.labels[keep])  # class c is rare
    seen = []
    monkeypatch.setattr(train_mod, "head_latency_ms", lambda model, split: seen.append(model) or 0.0)
    config = FusionModelConfig(encoders={m: "cached-features" for m in DIMS}, labels=("a", "b", "c"),
                               fusion_head="concat", stage="early", hidden_dim=16)
    result = train_mod.train_cell(config, train, test, seed=0, max_epochs=2, batch_size=16,
                                  optim=OptimConfig(lr=3e-3, class_weights="balanced"),
                                  robustness={"noise": [0.5], "token_drop": [0.5]}, echo=lambda _: None, val=test)
    counts = torch.bincount(train.labels, minlength=3).float()
    assert counts[2] == 4
    weight = len(train) / (3 * counts)
    with torch.no_grad():
        logits = seen[0].eval().fuse({m: f.index(torch.arange(len(test))) for m, f in test.feats.items()}).logits
    kept = min(result["val_losses"])
    assert abs(float(F.cross_entropy(logits, test.labels, weight=weight)) - kept) < 1e-4
    assert abs(float(F.cross_entropy(logits, test.labels)) - kept) > 1e-3  # and not the unweighted loss


def test_results_md_shows_no_test_for_zero_variance_paired_differences(tmp_path: Path) -> None:
    from recipes.sweep.report import write_results

    def rec(head: str, seed: int, acc: float) -> dict:
        return {"head": head, "stage": "late", "seed": seed, "fused": {"accuracy": acc}, "alone": {"audio": acc},
                "robustness": {"all": acc}, "params": 10, "train_seconds": 1.0, "latency_ms": 0.1}

    accs = {"concat": [0.94, 0.93], "gating": [0.95, 0.94], "moe": [0.97, 0.92]}  # gating - concat: 0.01 twice
    records = [rec(h, k, v) for h, vals in accs.items() for k, v in enumerate(vals)]
    write_results(tmp_path, records, list(accs), ["late"], ["audio"], "accuracy", {"dataset": "synthetic"})
    md = (tmp_path / "results.md").read_text()
    gating = next(line for line in md.splitlines() if line.startswith("| gating | late | 2 | +0.0100"))
    assert gating.endswith("| n/a | 1.0000 | zero variance in paired differences: no test |")
    moe = next(line for line in md.splitlines() if line.startswith("| moe | late | 2 | +0.0100"))
    assert moe.endswith("| 0.500 | 0.7048 | within seed noise |")  # differences 0.03, -0.01: a finite t


def test_a_cell_standardises_with_its_own_training_features(monkeypatch: pytest.MonkeyPatch) -> None:
    from recipes.settings import OptimConfig
    from recipes.sweep.train import train_cell
    from zoo.config import FusionModelConfig
    from zoo.model import FusionModel

    fitted: list[int] = []
    real = FusionModel.fit_feature_norm

    def spy(self: FusionModel, feats: dict, refit: bool = False) -> list[str]:
        fitted.append(next(iter(feats.values())).batch_size)
        return real(self, feats, refit)

    monkeypatch.setattr(FusionModel, "fit_feature_norm", spy)
    config = FusionModelConfig(encoders={m: "cached-features" for m in DIMS}, labels=("a", "b", "c"),
                               fusion_head="concat", stage="early", hidden_dim=16)
    train_cell(config, _split(48, 0, False), _split(24, 1, False), seed=0, max_epochs=1, batch_size=16,
               optim=OptimConfig(), robustness={"noise": [0.5], "token_drop": [0.5]}, echo=lambda _: None)
    assert fitted == [48]  # the 48 training rows, not the test rows


def _fused(path: Path) -> dict[str, float]:
    return {r["key"]: r["fused"]["accuracy"] for r in map(json.loads, path.read_text().splitlines())}


def test_cells_in_worker_processes_give_the_inline_results(tmp_path: Path) -> None:
    """Two spawned workers (features sent once, in shared memory) train the same cells to the same numbers: each cell
    seeds itself and runs on one thread, wherever it runs."""
    kw = {"heads": ["concat"], "stages": ["early", "late"], "seeds": [0, 1]}
    run_sweep(_settings(tmp_path / "inline", jobs=1, **kw), _provider([]), echo=lambda s: None)
    lines: list[str] = []
    run_sweep(_settings(tmp_path / "pool", jobs=2, **kw), _provider([]), echo=lines.append)
    assert "sweep: 2 worker processes, one thread each" in lines
    inline, pooled = _fused(tmp_path / "inline" / "cells.jsonl"), _fused(tmp_path / "pool" / "cells.jsonl")
    assert len(inline) == 4 and pooled == inline
    rows = list(csv.DictReader((tmp_path / "pool" / "results.csv").open()))
    assert [(r["stage"], r["seed"]) for r in rows] == [("early", "0"), ("early", "1"), ("late", "0"), ("late", "1")]


def test_jobs_resolve_to_cores_and_never_more_than_the_cells(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_mod, "available_cores", lambda: 4)
    assert pool_mod.resolve_jobs(0, 10) == 4 and pool_mod.resolve_jobs(0, 3) == 3 and pool_mod.resolve_jobs(8, 2) == 2
    assert pool_mod.resolve_jobs(1, 10) == 1
    assert parse_args(["--jobs", "3"]).jobs == 3 and parse_args([]).jobs == 0
    with pytest.raises(ConfigError, match="--jobs -1 must be >= 0"):
        run_sweep(_settings(Path("unused"), jobs=-1), _provider([]))


def test_killing_the_sweep_stops_its_workers(tmp_path: Path) -> None:
    """A sweep killed with SIGKILL (no cleanup) must not leave its worker processes training (Linux: the kernel
    stops a worker whose parent died)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    args = ["--heads", "concat,gating", "--stages", "early", "--seeds", "0,1", "--max-epochs", "500", "--jobs", "2",
            "--model.encoders={image: tiny-image, text: tiny-text}", "--model.hidden_dim", "16",
            "--data.max_samples", "16", "--data.cache_dir", str(tmp_path / "cache"),
            "--output-dir", str(tmp_path / "o")]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "recipes.cli", "sweep", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    training: set[str] = set()
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until both workers train (two cells' first epoch lines appear)
        if "epoch 1/500" in line:
            training.add(line.split("]")[0])
            if len(training) >= 2:
                break
        assert time.time() < deadline, "the workers never started"
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert len(workers) >= 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [p for p in workers if os.path.exists(f"/proc/{p}") and "Z" not in
                 open(f"/proc/{p}/stat").read().split(")")[-1].split()[:1]]
    assert not alive, f"workers {alive} outlived the killed sweep"
