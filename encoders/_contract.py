"""The contract between encoders and fusion heads (see docs/contract.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from fusion_errors import ConfigError, InputError

__all__ = ["MODALITIES", "ModalityOutput", "Encoder", "Preprocessor", "FINETUNE_POLICIES"]

MODALITIES: tuple[str, ...] = ("audio", "image", "text")  # sorted: iterate in this order
FINETUNE_POLICIES = ("frozen", "full", "last_n", "lora")
Finetune = Literal["frozen", "full", "last_n", "lora"]


@dataclass
class ModalityOutput:
    """What every encoder returns and every fusion head takes.

    Attributes:
        tokens: [B, T, D] per-token (or per-patch, per-frame) features.
        mask: [B, T] bool, True = valid token. A row of all False means the modality is absent for that sample.
        pooled: [B, D] one vector per sample; undefined (zeros) where the sample is absent.
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    @property
    def present(self) -> Tensor:
        """[B] bool, True where the sample has at least one valid token."""
        return self.mask.any(dim=1)

    @property
    def batch_size(self) -> int:
        return self.pooled.shape[0]

    @property
    def dim(self) -> int:
        return self.pooled.shape[-1]

    def validate(self, name: str = "input") -> ModalityOutput:
        """Check shapes and dtypes; raise InputError naming ``name`` otherwise."""
        t, m, p = self.tokens, self.mask, self.pooled
        if t.dim() != 3 or m.dim() != 2 or p.dim() != 2:
            raise InputError(
                f"{name}: expected tokens [B,T,D], mask [B,T], pooled [B,D]; got {tuple(t.shape)}, "
                f"{tuple(m.shape)}, {tuple(p.shape)}. Build it with ModalityOutput(tokens, mask, pooled)."
            )
        if m.dtype != torch.bool:
            raise InputError(f"{name}: mask must be bool (True = valid), got {m.dtype}; use mask.bool().")
        if t.shape[:2] != m.shape or p.shape[0] != t.shape[0] or p.shape[1] != t.shape[2]:
            raise InputError(
                f"{name}: shapes disagree: tokens {tuple(t.shape)}, mask {tuple(m.shape)}, pooled {tuple(p.shape)}."
            )
        return self

    def to(self, device: torch.device | str) -> ModalityOutput:
        return ModalityOutput(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def index(self, idx: Tensor | slice) -> ModalityOutput:
        """Rows ``idx`` of the batch."""
        return ModalityOutput(self.tokens[idx], self.mask[idx], self.pooled[idx])


class Preprocessor:
    """Turns raw inputs (strings, images, waveforms, paths; ``None`` = missing) into a tensor batch.

    Kept apart from the encoder module so data-loader workers can run it without the model, and
    serialisable through ``to_dict`` so it is saved with a fused checkpoint.
    The batch always holds ``present``: [B] bool, False where the item was ``None``.
    """

    modality: ClassVar[str] = ""

    def __call__(self, items: Sequence[Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Settings that reproduce this preprocessing (saved in config.json)."""
        return {}


class Encoder(nn.Module):
    """Base class of every encoder: ``forward(batch) -> ModalityOutput``.

    Subclasses set ``modality``, ``embed_dim`` and ``preprocessor`` and implement ``encode``; this base
    applies the fine-tuning policy, masks absent samples and validates the result.
    """

    modality: ClassVar[str] = ""
    #: rows per call when encoding a whole dataset (feature cache); recurrent encoders want large batches
    encode_batch_size: ClassVar[int] = 64
    embed_dim: int
    preprocessor: Preprocessor
    _hash_value: str  # memo of weights_hash()

    def __init__(self) -> None:
        super().__init__()
        self.finetune: str = "full"
        #: False for randomly initialised encoders (trained from scratch, at the heads' learning rate)
        self.pretrained: bool = True

    def encode(self, batch: dict[str, Tensor]) -> ModalityOutput:
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor]) -> ModalityOutput:
        if self.finetune == "frozen":
            with torch.no_grad():
                out = self.encode(batch)
        else:
            out = self.encode(batch)
        present = batch.get("present")
        if present is not None:
            present = present.to(out.mask.device).bool()
            out = ModalityOutput(
                out.tokens, out.mask & present[:, None], out.pooled * present[:, None].to(out.pooled.dtype)
            )
        return out.validate(f"{type(self).__name__} output")

    # fine-tuning policy -------------------------------------------------------------------------
    def trainable_blocks(self) -> list[nn.Module]:
        """Ordered list of the backbone's blocks, first to last, used by the ``last_n`` policy."""
        return [self]

    def lora_target_modules(self) -> list[str]:
        """Names of linear submodules that LoRA adapts (override for transformer encoders)."""
        return []

    def set_finetune(self, policy: str, last_n: int = 1, lora_r: int = 8) -> Encoder:
        """Apply ``frozen | full | last_n | lora`` (see docs/contract.md)."""
        if policy not in FINETUNE_POLICIES:
            raise ConfigError(f"finetune={policy!r} is not one of {FINETUNE_POLICIES}.")
        self.finetune = policy
        if policy == "full":
            self.requires_grad_(True)
        elif policy == "frozen":
            self.requires_grad_(False)
            self.eval()
        elif policy == "last_n":
            self.requires_grad_(False)
            blocks = self.trainable_blocks()
            if last_n < 1:
                raise ConfigError(f"last_n={last_n} must be >= 1 (the number of final blocks to train).")
            for block in blocks[-last_n:]:
                block.requires_grad_(True)
        elif policy == "lora":
            self._apply_lora(lora_r)
        return self

    def _apply_lora(self, r: int) -> None:
        targets = self.lora_target_modules()
        if not targets:
            raise ConfigError(f"{type(self).__name__} has no LoRA targets; use finetune='full' or 'last_n'.")
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as e:  # pragma: no cover - peft is a dependency
            from fusion_errors import MissingDependencyError

            raise MissingDependencyError("finetune='lora' needs peft: pip install peft") from e
        self.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), self)

    def train(self, mode: bool = True) -> Encoder:
        # a frozen encoder stays in eval mode (no dropout, fixed BatchNorm statistics)
        return super().train(mode and self.finetune != "frozen")

    def weights_hash(self) -> str:
        """sha256 over the state dict (names, shapes, bytes): identifies the exact weights.

        Memoised until a tensor is replaced or modified in place (its storage or version counter changes),
        so repeated feature-cache look-ups of a frozen encoder do not re-hash ~100 MB each time.
        """
        state = self.state_dict()
        stamp = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
        if getattr(self, "_hash_stamp", None) == stamp:
            return str(self._hash_value)
        h = hashlib.sha256()
        for k, v in sorted(state.items()):
            h.update(k.encode())
            h.update(str(tuple(v.shape)).encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                     if v.numel() else b"")
        self._hash_stamp, self._hash_value = stamp, h.hexdigest()
        return self._hash_value
