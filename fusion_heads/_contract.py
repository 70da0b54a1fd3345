"""Fusion-head contract: ``Mapping[str, ModalityOutput] -> FusionOutput`` (see docs/contract.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from encoders import ModalityOutput
from fusion_errors import ConfigError, InputError

__all__ = ["FusionOutput", "FusionHead"]


@dataclass
class FusionOutput:
    """What every fusion head returns.

    Attributes:
        fused: [B, out_dim] one fused vector per sample.
        tokens: [B, T, out_dim] fused tokens for heads that keep a sequence (else None).
        aux: auxiliary losses under keys ending in ``_loss`` (added to the training loss) and diagnostics
            (gate weights, routing probabilities, expert utilisation) that recipes log.
    """

    fused: Tensor
    tokens: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)
    token_mask: Tensor | None = None  # [B, T] bool for ``tokens``; None means all valid


class FusionHead(nn.Module):
    """Base class of every fusion head.

    Subclasses implement ``fuse(inputs)`` where ``inputs`` is already complete: every modality in
    ``modality_dims`` is there, in sorted order, and absent samples carry the learned missing embedding
    (pooled, and a single valid missing token). ``present`` gives [B] bool per modality.
    """

    def __init__(self, modality_dims: Mapping[str, int], out_dim: int) -> None:
        super().__init__()
        if not modality_dims:
            raise ConfigError("modality_dims is empty: a fusion head needs at least one modality, e.g. {'text': 384}.")
        for key, dim in modality_dims.items():
            if not isinstance(dim, int) or dim < 1:
                raise ConfigError(f"modality_dims[{key!r}]={dim!r} must be a positive int (the encoder's embed_dim).")
        if not isinstance(out_dim, int) or out_dim < 1:
            raise ConfigError(f"out_dim={out_dim!r} must be a positive int.")
        self.modality_dims: dict[str, int] = {k: modality_dims[k] for k in sorted(modality_dims)}
        self.modalities: list[str] = list(self.modality_dims)
        self.out_dim = out_dim
        # a learned stand-in per modality: absence is information, not zeros
        self.missing = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(d) * 0.02) for m, d in self.modality_dims.items()}
        )

    def fuse(self, inputs: dict[str, ModalityOutput], present: dict[str, Tensor]) -> FusionOutput:
        raise NotImplementedError

    def forward(self, inputs: Mapping[str, ModalityOutput]) -> FusionOutput:
        """Fuse any subset of the head's modalities; absent keys or all-False masks use the missing embedding."""
        complete, present = self.complete(inputs)
        return self.fuse(complete, present)

    def complete(self, inputs: Mapping[str, ModalityOutput]) -> tuple[dict[str, ModalityOutput], dict[str, Tensor]]:
        """Fill absent modalities and samples with the learned missing embedding; sort keys."""
        unknown = set(inputs) - set(self.modality_dims)
        if unknown:
            raise InputError(
                f"{type(self).__name__} got modalities {sorted(unknown)} it was not built for "
                f"(built for {self.modalities}); rebuild the head with those keys in modality_dims."
            )
        if not inputs:
            raise InputError("every modality is missing: give at least one of " + ", ".join(self.modalities) + ".")
        ref = next(iter(inputs.values()))
        batch, device, dtype = ref.batch_size, ref.pooled.device, ref.pooled.dtype
        complete: dict[str, ModalityOutput] = {}
        present: dict[str, Tensor] = {}
        for m in self.modalities:
            miss = self.missing[m].to(dtype)
            if m not in inputs:
                tokens = miss.expand(batch, 1, -1)  # [B, 1, D]
                complete[m] = ModalityOutput(tokens, torch.ones(batch, 1, dtype=torch.bool, device=device),
                                             miss.expand(batch, -1))
                present[m] = torch.zeros(batch, dtype=torch.bool, device=device)
                continue
            out = inputs[m].validate(m)
            if out.batch_size != batch:
                raise InputError(
                    f"batch sizes disagree: {m!r} has {out.batch_size} samples, another modality has {batch}; "
                    "give every modality the same samples (use None for a missing item)."
                )
            if out.dim != self.modality_dims[m]:
                raise InputError(
                    f"{m!r} features have width {out.dim} but the head was built for {self.modality_dims[m]}; "
                    "match modality_dims to the encoder's embed_dim."
                )
            here = out.present  # [B]
            keep = here[:, None]
            pooled = torch.where(keep, out.pooled, miss.expand(batch, -1))  # [B, D]
            # absent rows: first token becomes the (valid) missing token, the rest stay masked out
            first = torch.zeros_like(out.mask)
            first[:, 0] = True
            absent_first = first & ~keep
            tokens = torch.where(absent_first[..., None], miss.expand_as(out.tokens), out.tokens)  # [B, T, D]
            tokens = tokens.masked_fill(~(out.mask | absent_first)[..., None], 0.0)
            complete[m] = ModalityOutput(tokens, out.mask | absent_first, pooled)
            present[m] = here
        return complete, present

    @staticmethod
    def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
        """Mean over valid tokens: [B, T, D], [B, T] -> [B, D]."""
        w = mask.to(tokens.dtype)[..., None]  # [B, T, 1]
        return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)

    def extra_config(self) -> dict[str, Any]:
        """Head-specific options, for docs and logs."""
        return {}
