"""FusionTask: losses, per-module learning rates, NaN guard, metrics protocol and self-describing checkpoints.

Also defines the small fake encoders and the toy data module that tests/recipes/test_cli.py reuses.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from encoders import Encoder, ModalityOutput, Preprocessor, list_encoders, register_encoder
from fusion_errors import CheckpointError, ConfigError, FusionZooError
from recipes.task import FusionTask, warmup_cosine

LABELS = ["a", "b", "c"]
FAKES = {"audio": "fake-audio", "image": "fake-image", "text": "fake-text"}


class FakePreprocessor(Preprocessor):
    """Items are 4-d vectors (or None): -> {"x": [B, 4], "present": [B]}."""

    def __call__(self, items):
        x = torch.stack([torch.zeros(4) if i is None else torch.as_tensor(i, dtype=torch.float) for i in items])
        return {"x": x, "present": torch.tensor([i is not None for i in items])}


class FakeEncoder(Encoder):
    """A linear map 4 -> embed_dim over one token, with fixed ("pretrained") initial weights."""

    def __init__(self, embed_dim: int = 8) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.lin = nn.Linear(4, embed_dim)
        g = torch.Generator().manual_seed(embed_dim)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(embed_dim, 4, generator=g))
            self.lin.bias.zero_()
        self.preprocessor = FakePreprocessor()

    def encode(self, batch):
        z = self.lin(batch["x"])  # [B, D]
        return ModalityOutput(z[:, None], torch.ones(z.shape[0], 1, dtype=torch.bool, device=z.device), z)


for _modality, _name in FAKES.items():
    if _name not in list_encoders():
        register_encoder(_name)(type(f"Fake{_modality.title()}Encoder", (FakeEncoder,), {"modality": _modality}))


class ToyDataModule(pl.LightningDataModule):
    """Cached-feature batches with class-dependent features; ``labels`` is set right after __init__.

    Like the real data module it reads the encoder widths from ``trainer.lightning_module.model`` in setup.
    """

    def __init__(self, num_samples: int = 24, batch_size: int = 8, missing_text_every: int = 0) -> None:
        super().__init__()
        self.num_samples, self.batch_size, self.missing_text_every = num_samples, batch_size, missing_text_every
        self.labels = list(LABELS)

    def setup(self, stage: str | None = None) -> None:
        dims = self.trainer.lightning_module.model.embed_dims
        self.splits = {s: self._make(dims, seed) for seed, s in enumerate(("train", "validation", "test"))}

    def _make(self, dims: dict[str, int], seed: int) -> list[dict]:
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, len(self.labels), (self.num_samples,), generator=g)
        feats = {m: torch.randn(self.num_samples, d, generator=g) + 3 * nn.functional.one_hot(y, d).float()
                 for m, d in dims.items()}
        batches = []
        for start in range(0, self.num_samples, self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, self.num_samples))
            inputs = {}
            for m, x in feats.items():
                mask = torch.ones(len(idx), 1, dtype=torch.bool)
                if m == "text" and self.missing_text_every:
                    mask[:: self.missing_text_every] = False
                inputs[m] = ModalityOutput(x[idx][:, None], mask, x[idx] * mask)
            batches.append({"inputs": inputs, "labels": y[idx], "index": idx})
        return batches

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def make_task(**kw) -> FusionTask:
    kw.setdefault("encoders", {m: FAKES[m] for m in ("image", "text")})
    return FusionTask(labels=LABELS, hidden_dim=16, **kw)


def raw_batch(b: int = 6, nan: bool = False) -> dict:
    x = torch.full((b, 4), float("nan")) if nan else torch.randn(b, 4)
    inputs = {m: {"x": x.clone(), "present": torch.ones(b, dtype=torch.bool)} for m in ("image", "text")}
    return {"inputs": inputs, "labels": torch.arange(b) % 3, "index": torch.arange(b)}


def tiny_trainer(tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, **kw)


def test_lr_groups_give_encoders_the_lower_rate():
    task = make_task(encoders={"image": "fake-image", "text": {"name": "fake-text", "finetune": "full"}},
                     lr=1e-3, encoder_lr=1e-5)
    groups = {g["name"]: g for g in task.param_groups()}
    assert {"encoders", "encoders_no_decay", "heads", "heads_no_decay"} == set(groups)
    assert groups["encoders"]["lr"] == 1e-5 and groups["heads"]["lr"] == 1e-3
    assert groups["heads_no_decay"]["weight_decay"] == 0.0
    enc_ids = {id(p) for g in ("encoders", "encoders_no_decay") for p in groups[g]["params"]}
    assert enc_ids == {id(p) for p in task.model.encoders["text"].parameters()}  # the frozen image encoder is out


def test_lora_adapters_and_from_scratch_encoders_train_at_the_head_lr():
    task = FusionTask(labels=LABELS, hidden_dim=16, lr=1e-3, encoder_lr=1e-5, encoders={
        "audio": {"name": "mel-cnn", "options": {"channels": [8], "embed_dim": 8, "num_heads": 2}},  # from scratch
        "text": {"name": "tiny-text", "finetune": "lora", "lora_r": 2, "options": {"hidden_size": 16}},
    })
    by_id = {id(p): g for g in task.param_groups() for p in g["params"]}
    lr = {n: by_id[id(p)]["lr"] for n, p in task.model.named_parameters() if p.requires_grad}
    mel = [n for n in lr if n.startswith("encoders.audio.")]
    lora = [n for n in lr if n.startswith("encoders.text.")]
    assert mel and all(lr[n] == 1e-3 for n in mel)  # mel-cnn trains by default, at the head lr
    assert lora and all("lora_" in n and lr[n] == 1e-3 for n in lora)
    assert {g["name"] for g in task.param_groups()} == {"adapters", "adapters_no_decay", "heads", "heads_no_decay"}


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0, abs=1e-9)
    assert warmup_cosine(5, math.inf, 0) == 1.0


def test_nan_loss_raises_a_clear_error():
    task = make_task()
    with pytest.raises(FusionZooError, match=r"batch 3 .*lower the learning rate"):
        task.training_step(raw_batch(nan=True), 3)


# logits [[0, 0, 0], [2, 0, 0]] against labels [0, 1] / their one-hot / all ones, each worked out by hand
PINNED_LOSS = {
    "multiclass": (math.log(3) + math.log(math.exp(2) + 2)) / 2,  # mean over rows of logsumexp(z) - z[y]
    "multilabel": (5 * math.log(2) + math.log(1 + math.exp(2))) / 6,  # mean of log(1 + e^z) - y z: five z = 0
    "regression": 1.0,  # every (z - 1)^2 is 1
}


def _hand_loss(kind: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task losses written out from their formulas (not the code under test)."""
    if kind == "multiclass":
        return (z.exp().sum(-1).log() - z.gather(1, y.long()[:, None])[:, 0]).mean()
    if kind == "multilabel":  # binary cross-entropy on logits: log(1 + e^z) - y z
        return ((1 + z.exp()).log() - y * z).mean()
    return (z - y).pow(2).mean()


@pytest.mark.parametrize("task_kind", ["multiclass", "multilabel", "regression"])
def test_loss_is_task_plus_weighted_late_loss(task_kind):
    task = make_task(stage="late", task=task_kind, late_loss_weight=0.7, dropout=0.0)
    z = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    y = {"multiclass": torch.tensor([0, 1]), "multilabel": torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]),
         "regression": torch.ones(2, 3)}[task_kind]
    assert task._loss(z, y).item() == pytest.approx(PINNED_LOSS[task_kind], rel=1e-6)

    task.eval()  # no dropout: the same forward twice
    batch = raw_batch()
    batch["inputs"]["text"]["present"][::2] = False  # the text head's loss covers the 3 samples that have text
    labels = batch["labels"]
    if task_kind == "multilabel":
        labels = batch["labels"] = nn.functional.one_hot(labels, 3).float()
    elif task_kind == "regression":
        labels = batch["labels"] = torch.stack([labels.float(), -labels.float(), labels.float() / 2], 1)
    out = task.model(batch["inputs"])
    has_text = torch.tensor([False, True] * 3)
    late = (_hand_loss(task_kind, out.modality_logits["image"], labels)
            + _hand_loss(task_kind, out.modality_logits["text"][has_text], labels[has_text])) / 2
    expected = _hand_loss(task_kind, out.logits, labels) + 0.7 * late + out.aux_loss
    assert task.training_step(batch, 0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert late.item() > 0


def test_late_loss_ignores_absent_samples():
    task = make_task(stage="late")
    task.eval()
    batch = raw_batch()
    batch["inputs"]["text"]["present"][:] = False
    out = task.model(batch["inputs"])
    only_image = task._loss(out.modality_logits["image"], batch["labels"])
    assert task._late_loss(out, batch["labels"]).item() == pytest.approx(only_image.item())


def test_labels_must_match_a_given_config():
    config = make_task().hparams["config"]
    with pytest.raises(ConfigError, match="labels"):
        FusionTask(labels=["x", "y", "z"], config=config)


def test_fit_checkpoint_is_self_describing_and_test_metrics_cover_each_modality(tmp_path):
    task = make_task(stage="hybrid", lr=1e-2)
    trainer = tiny_trainer(tmp_path, max_epochs=4, enable_checkpointing=False)
    data = ToyDataModule(missing_text_every=4)
    trainer.fit(task, datamodule=data)
    trainer.test(task, datamodule=data, verbose=False)
    test = task.results["test"]
    assert set(test) == {"fused", "image", "text"}
    assert {"accuracy", "macro_f1", "auroc", "n"} <= set(test["fused"])
    assert test["fused"]["n"] == 24 and test["image"]["n"] == 24 and test["text"]["n"] == 18  # text alone: present only
    assert 0.0 <= test["text"]["head_accuracy"] <= 1.0 and test["fused"]["accuracy"] > 0.5
    assert set(task.results["validation"]["fused"]) >= {"accuracy", "macro_f1", "auroc"}

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["config"] == task.cfg.to_dict()
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    back = FusionTask.from_checkpoint(path)
    assert back.cfg == task.cfg
    for k, v in task.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    same = FusionTask.load_from_checkpoint(path, weights_only=True)
    assert same.cfg == task.cfg


def test_from_checkpoint_rejects_other_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        FusionTask.from_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not written by FusionTask"):
        FusionTask.from_checkpoint(tmp_path / "other.ckpt")


def test_init_from_with_a_new_head_trains_only_the_head(tmp_path):
    base = make_task(stage="late", encoders={"image": {"name": "fake-image", "finetune": "full"}, "text": "fake-text"})
    base.model.save_pretrained(tmp_path / "base")
    task = FusionTask(labels=LABELS, init_from=str(tmp_path / "base"), fusion_head="average")
    assert task.train_only_head and task.cfg.fusion_head == "average"
    trainable = {id(p) for p in task.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in task.model.head_parameters()}
    fixed = {k: v.clone() for k, v in task.model.state_dict().items() if k.startswith(("encoders.", "late_heads."))}
    head = [p.clone() for p in task.model.head_parameters()]
    tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=False).fit(task, datamodule=ToyDataModule())
    for k, v in task.model.state_dict().items():
        if k in fixed:
            assert torch.equal(v, fixed[k]), f"{k} changed although only the head trains"
    assert any(not torch.equal(a, b) for a, b in zip(head, task.model.head_parameters(), strict=True))


def test_head_only_training_keeps_the_frozen_late_encoders_in_eval_mode(tmp_path):
    base = make_task(stage="late", dropout=0.5)
    base.model.save_pretrained(tmp_path / "base")
    task = FusionTask(labels=LABELS, init_from=str(tmp_path / "base"), fusion_head="average", dropout=0.5)
    assert task.train_only_head and task.model.config.dropout == 0.5
    task.train()
    frozen = [task.model.encoders, task.model.late_encoders, task.model.late_heads]
    assert not any(m.training for part in frozen for m in part.modules())
    assert task.model.trunk.training  # the head trains, with its dropout on
    x = torch.randn(6, 4)
    e = [task.model.late_encoders["image"](task.model.encoders["image"]({"x": x}).pooled) for _ in range(2)]
    torch.testing.assert_close(e[0], e[1], rtol=0, atol=0)  # no dropout in the fixed part


def test_with_no_encoders_named_the_data_modalities_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    import recipes.task as task_mod

    monkeypatch.setattr(task_mod, "DEFAULT_ENCODERS", dict(FAKES))
    task = FusionTask(labels=LABELS, modalities=["audio", "image"])
    assert task.model.modalities == ["audio", "image"]
    assert {m: s.name for m, s in task.model.config.encoders.items()} == {"audio": "fake-audio", "image": "fake-image"}
    named = FusionTask(labels=LABELS, modalities=["audio", "image"], encoders={"text": "fake-text"})
    assert named.model.modalities == ["text"]  # named encoders win over the data's columns
    with pytest.raises(ConfigError, match="none of the modalities"):
        FusionTask(labels=LABELS, modalities=["video"])


def test_task_flags_are_the_config_fields_with_their_defaults() -> None:
    """Every FusionModelConfig / OptimConfig field is a FusionTask flag with the dataclass's own default and type:
    one default per setting. Compared against the dataclasses, so a field added there (or a default changed in
    either place) without the other fails here."""
    import dataclasses
    import inspect
    import typing

    from recipes.settings import OptimConfig
    from recipes.task import INHERITED
    from zoo.config import FusionModelConfig

    params = inspect.signature(FusionTask).parameters
    hints = typing.get_type_hints(FusionTask.__init__)
    for cls in (FusionModelConfig, OptimConfig):
        cls_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("format_version", "modules"):  # written by the library (save, compose), not settings
                continue
            assert f.name in params, f"{cls.__name__}.{f.name} is not a FusionTask argument"
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if f.name in INHERITED:  # None = the config's default (or, under init_from, the loaded model's)
                assert params[f.name].default is None, f.name
                continue
            assert params[f.name].default == default, f"{f.name}: FusionTask {params[f.name].default!r} != {default!r}"
            # the flag accepts what the field accepts (modality_dropout also None, from older checkpoints)
            assert set(typing.get_args(cls_hints[f.name]) or [cls_hints[f.name]]) <= set(
                typing.get_args(hints[f.name]) or [hints[f.name]]), f.name
    built = make_task()  # no model flags given: the config built is the dataclass's defaults
    want = FusionModelConfig(encoders=built.cfg.encoders, labels=tuple(LABELS), hidden_dim=16)
    assert built.cfg == want
    assert built.optim == OptimConfig()


def test_class_weights_balanced_from_counts_written_out():
    from recipes.task import class_weight_tensor

    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])  # 6 a, 2 b, no c: N / (C * n_c) = 8/18, 8/6; absent c weighs 1
    torch.testing.assert_close(class_weight_tensor("balanced", LABELS, "multiclass", y),
                               torch.tensor([8 / 18, 8 / 6, 1.0]))
    multi = torch.tensor([[1.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]])  # positives 3, 1, 0 of 4
    torch.testing.assert_close(class_weight_tensor("balanced", LABELS, "multilabel", multi),
                               torch.tensor([1 / 3, 3.0, 1.0]))
    torch.testing.assert_close(class_weight_tensor({"c": 4.0}, LABELS, "multiclass"), torch.tensor([1.0, 1.0, 4.0]))
    assert class_weight_tensor(None, LABELS, "multiclass") is None


@pytest.mark.parametrize("spec, message", [
    ({"z": 2.0}, r"names \['z'\], which are not labels"),
    ([1.0, 2.0], "2 weights for 3 labels"),
    ("inverse", "is not known"),
    ([1.0, -1.0, 1.0], "finite number > 0"),
    ([], "empty"),
])
def test_bad_class_weights_fail_when_the_task_is_built(spec, message):
    with pytest.raises(ConfigError, match=message):
        make_task(class_weights=spec)


def test_class_weights_are_not_for_regression():
    with pytest.raises(ConfigError, match="not regression"):
        make_task(task="regression", class_weights="balanced")


@pytest.mark.parametrize("task_kind", ["multiclass", "multilabel"])
def test_weighted_loss_is_the_weighted_formula(task_kind):
    w = torch.tensor([1.0, 2.0, 5.0])
    task = make_task(task=task_kind, class_weights=w.tolist())
    z = torch.tensor([[0.5, -1.0, 2.0], [2.0, 0.0, 0.0], [0.0, 1.0, -0.5]])
    if task_kind == "multiclass":
        y = torch.tensor([2, 0, 1])
        nll = z.exp().sum(-1).log() - z.gather(1, y[:, None])[:, 0]  # per sample
        expected = (w[y] * nll).sum() / w[y].sum()  # torch's weighted mean: normalised by the weights used
    else:
        y = torch.tensor([[0.0, 1, 1], [1, 0, 0], [0, 1, 0]])
        log_p, log_q = -(1 + (-z).exp()).log(), -(1 + z.exp()).log()  # log sigmoid(z), log (1 - sigmoid(z))
        expected = -(w * y * log_p + (1 - y) * log_q).mean()  # w multiplies the positives only (pos_weight)
    assert task._loss(z, y).item() == pytest.approx(expected.item(), rel=1e-6)
    unweighted = make_task(task=task_kind)._loss(z, y)
    assert unweighted.item() != pytest.approx(expected.item(), rel=1e-3)


class _CountedData(ToyDataModule):
    """The toy data plus ``train_labels`` (what FusionDataModule offers for class_weights='balanced')."""

    def train_labels(self) -> torch.Tensor:
        return torch.cat([b["labels"] for b in self.splits["train"]])


def test_balanced_weights_come_from_the_training_labels_and_reach_the_checkpoint(tmp_path):
    data = _CountedData()
    task = make_task(class_weights="balanced")
    trainer = tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(task, datamodule=data)
    counts = torch.bincount(data.train_labels(), minlength=3).float()
    assert task.loss_weight is not None
    torch.testing.assert_close(task.loss_weight, 24 / (3 * counts))
    path = tmp_path / "w.ckpt"
    trainer.save_checkpoint(path)
    back = FusionTask.from_checkpoint(path)  # rebuilt without any data: the weights come with the checkpoint
    assert back.loss_weight is not None
    torch.testing.assert_close(back.loss_weight, task.loss_weight)
    with pytest.raises(ConfigError, match="counts the training labels of a FusionDataModule"):
        tiny_trainer(tmp_path, max_epochs=1).fit(make_task(class_weights="balanced"), datamodule=ToyDataModule())


def test_the_diverged_loss_hint_suggests_a_sane_learning_rate() -> None:
    """Issue 30 (13): after --model.lr 1e30 the hint said 1e+29."""
    from recipes.task import _lower_lr

    assert _lower_lr(1e-3) == pytest.approx(1e-4) and _lower_lr(1e-5) == pytest.approx(1e-6)
    assert _lower_lr(1e30) == _lower_lr(0.5) == 1e-3  # above the default: the default
