"""A tiny `fusion-zoo fit` for the reliability tests: two fake encoders, 24 rows, checkpoints every 2 steps.

Run as a script (``python tests/reliability/toy_fit.py fit --trainer.default_root_dir DIR ...``) it goes through
``recipes.cli`` exactly like the console script, with :class:`ToyRawData` as the data module. With the
environment variable ``FUSION_KILL_AT_STEP=N`` the process SIGKILLs itself when training step N starts
(after the checkpoint of step N-1 was written): an abrupt crash, no cleanup, at a deterministic point.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from encoders import Encoder, ModalityOutput, Preprocessor, list_encoders, register_encoder  # noqa: E402
from recipes import cli  # noqa: E402
from recipes.loader import ResumableDataLoader  # noqa: E402

LABELS = ["a", "b", "c"]
ENCODERS = {"image": "rel-fake-image", "text": "rel-fake-text"}
# flags every toy run shares: dropout and modality dropout on, so the random state matters on resume
TOY_ARGS = [
    "--model.encoders", '{"image": "rel-fake-image", "text": "rel-fake-text"}', "--model.hidden_dim", "16",
    "--model.modality_dropout", "0.3", "--model.dropout", "0.2", "--model.warmup_ratio", "0.1",
    "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "2", "--early_stopping.patience", "10",
]


class VecPreprocessor(Preprocessor):
    """Items are 4-d vectors (or None) -> {"x": [B, 4], "present": [B]}."""

    def __call__(self, items: Any) -> dict[str, torch.Tensor]:
        x = torch.stack([torch.zeros(4) if i is None else torch.as_tensor(i, dtype=torch.float) for i in items])
        return {"x": x, "present": torch.tensor([i is not None for i in items])}


class VecEncoder(Encoder):
    """Trainable linear 4 -> 8 over one token, with seeded initial weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_dim = 8
        self.lin = nn.Linear(4, 8)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(8, 4, generator=g))
        self.preprocessor = VecPreprocessor()

    def encode(self, batch: dict[str, torch.Tensor]) -> ModalityOutput:
        z = self.lin(batch["x"])  # [B, 8]
        return ModalityOutput(z[:, None], torch.ones(z.shape[0], 1, dtype=torch.bool, device=z.device), z)


for _modality, _name in ENCODERS.items():
    if _name not in list_encoders():  # one subclass per modality, so the encoder contract holds
        register_encoder(_name)(type(f"Vec{_modality.title()}Encoder", (VecEncoder,), {"modality": _modality}))


def make_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Rows with class-dependent vectors; every 5th row lacks its text."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(LABELS), (n,), generator=g)
    rows = []
    for i in range(n):
        vec = {m: (torch.randn(4, generator=g) + 2 * nn.functional.one_hot(y[i], 4)).tolist() for m in ENCODERS}
        rows.append({"text": None if i % 5 == 0 else vec["text"], "image": vec["image"], "label": int(y[i]),
                     "index": i})
    return rows


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    pre = VecPreprocessor()
    return {"inputs": {m: pre([r[m] for r in rows]) for m in sorted(ENCODERS)},
            "labels": torch.tensor([r["label"] for r in rows]), "index": torch.tensor([r["index"] for r in rows])}


class ToyRawData(pl.LightningDataModule):
    """Raw (preprocessed in the loader) toy rows; the training order depends only on (seed, epoch)."""

    def __init__(self, num_samples: int = 24, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.labels = list(LABELS)
        self.modalities = sorted(ENCODERS)  # linked to model.modalities by the CLI
        self.splits = {s: make_rows(num_samples, i + 10) for i, s in enumerate(("train", "validation", "test"))}

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.splits["train"], batch_size=self.batch_size, seed=self.seed,
                                   collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["validation"], batch_size=self.batch_size, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.batch_size, collate_fn=collate)


class KillAtStep(pl.Callback):
    """SIGKILL this process when training step ``step`` starts (simulates a crash or a pre-empted job)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def run(argv: list[str]) -> cli.FusionCLI:
    """``fusion-zoo <argv>`` with the toy encoders flags and data module (in this process)."""
    command, rest = argv[0], argv[1:]
    out = cli._lightning([command, *TOY_ARGS, *rest], datamodule_class=ToyRawData)
    return out


class _KillingCLI(cli.FusionCLI):
    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(KillAtStep(int(os.environ["FUSION_KILL_AT_STEP"])))
        return trainer


class _FixedClock:
    """``time`` for the run-folder stamps (recipes._cli_common) with a frozen ``strftime`` (FUSION_FIXED_TIME):
    runs started "in the same second"."""

    def __init__(self, stamp: str) -> None:
        self.stamp = stamp

    def strftime(self, fmt: str) -> str:
        return self.stamp


if __name__ == "__main__":
    torch.set_num_threads(1)
    from recipes import _cli_common, fit_cli

    if os.environ.get("FUSION_FIXED_TIME"):
        _cli_common.time = _FixedClock(os.environ["FUSION_FIXED_TIME"])  # type: ignore[assignment]
    if os.environ.get("FUSION_KILL_AT_STEP"):
        fit_cli.FusionCLI = _KillingCLI  # type: ignore[misc]
    run(sys.argv[1:])
