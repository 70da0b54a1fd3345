"""``moe``: mixture-of-experts fusion.

Routing units are built from the projected, layer-normalised features ``u``: one per sample
(``u = LN(sum_m W_m x_m)``, granularity ``sample``), or one per modality token (``u = LN(W_m t + e_m)``,
granularity ``token``). A router gives ``p = softmax(W_r u)`` over ``E`` experts (2-layer MLPs) and each unit
becomes ``u + sum_e c_e E_e(u)`` with combine weights ``c``: ``c = p`` (``soft``); the top-k entries of ``p``
(``topk``; renormalised when k = 2); or ``c = onehot(modality)`` (``fixed``, one expert per modality, applied to each
modality's pooled vector at ``sample`` granularity). With ``capacity_factor > 0`` an expert takes at most
``ceil(capacity_factor * N * k / E)`` of the ``N`` units (first come, first served, first choices before second);
a unit dropped from every chosen expert keeps only the residual ``u``. ``fused`` is the sample unit, the mean of
the per-modality units (``fixed``) or the mean over modalities of each modality's valid-token mean (``token``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders import ModalityOutput
from fusion_errors import ConfigError

from . import register_fusion_head
from ._contract import FusionHead, FusionOutput


@dataclass
class Routing:
    """Routing of ``N`` valid units: ``probs`` [N, E], ``combine`` [N, E] (0 = not sent), ``logits`` [N, E] | None."""

    probs: Tensor
    combine: Tensor
    dispatch: Tensor  # [N, E] bool
    logits: Tensor | None


@register_fusion_head("moe")
class MoEFusion(FusionHead):
    """Experts over samples or tokens, with soft, top-k (optionally capacity-limited) or per-modality routing.

    Args:
        num_experts: experts ``E`` (``fixed`` uses one per modality and ignores this).
        router: ``soft`` (every expert, weighted), ``topk`` (sparse) or ``fixed`` (expert = modality).
        top_k: experts per unit for ``topk`` (1 or 2).
        capacity_factor: 0 = unlimited; else the per-expert capacity factor for ``topk``.
        granularity: ``sample`` (route one vector per sample) or ``token`` (route every modality token).
        balance_loss_weight: weight of ``E * sum_e f_e P_e`` (``f_e`` share of top-1 choices, ``P_e`` mean prob).
        z_loss_weight: weight of ``mean(logsumexp(router logits) ** 2)``.
        router_noise: std of Gaussian noise added to router logits in training (0 = off).
        expert_dim: hidden width of each expert; 0 uses ``2 * out_dim``.
        dropout: dropout inside the experts.
    """

    def __init__(
        self,
        modality_dims: dict[str, int],
        out_dim: int,
        num_experts: int = 4,
        router: Literal["soft", "topk", "fixed"] = "topk",
        top_k: int = 2,
        capacity_factor: float = 0.0,
        granularity: Literal["sample", "token"] = "sample",
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        router_noise: float = 0.0,
        expert_dim: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(modality_dims, out_dim)
        if router not in ("soft", "topk", "fixed") or granularity not in ("sample", "token"):
            raise ConfigError(
                f"moe: router={router!r} must be soft|topk|fixed and granularity={granularity!r} sample|token."
            )
        num_experts = len(self.modalities) if router == "fixed" else num_experts
        if num_experts < 1 or top_k not in (1, 2) or (router == "topk" and top_k > num_experts):
            raise ConfigError(
                f"moe: need num_experts >= 1 and top_k in (1, 2) with top_k <= num_experts; "
                f"got num_experts={num_experts}, top_k={top_k}."
            )
        if capacity_factor < 0:
            raise ConfigError(f"moe: capacity_factor={capacity_factor} must be >= 0 (0 = unlimited).")
        self.num_experts, self.router_kind, self.top_k = num_experts, router, top_k
        self.capacity_factor, self.granularity, self.router_noise = capacity_factor, granularity, router_noise
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        hidden = expert_dim if expert_dim > 0 else 2 * out_dim
        self.proj = nn.ModuleDict({m: nn.Linear(d, out_dim) for m, d in self.modality_dims.items()})
        # token granularity: tells the router and experts which modality a token came from
        self.modality_embed = (
            nn.ParameterDict({m: nn.Parameter(torch.randn(out_dim) * 0.02) for m in self.modalities})
            if granularity == "token"
            else None
        )
        self.norm = nn.LayerNorm(out_dim)
        self.router = nn.Linear(out_dim, num_experts) if router != "fixed" else None
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(out_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
            for _ in range(num_experts)
        )

    def units(self, inputs: dict[str, ModalityOutput]) -> tuple[Tensor, Tensor, Tensor]:
        """Routing units [B, L, D], their validity [B, L] bool and modality index [L]."""
        ms = self.modalities
        if self.modality_embed is not None:
            parts = [self.proj[m](inputs[m].tokens) + self.modality_embed[m] for m in ms]  # [B, T_m, D]
            valid = torch.cat([inputs[m].mask for m in ms], dim=1)  # [B, L]
            index = torch.cat([torch.full((p.shape[1],), i, device=valid.device) for i, p in enumerate(parts)])
            return self.norm(torch.cat(parts, dim=1)), valid, index
        pooled = torch.stack([self.proj[m](inputs[m].pooled) for m in ms], dim=1)  # [B, M, D]
        if self.router_kind != "fixed":
            pooled = pooled.sum(dim=1, keepdim=True)  # [B, 1, D] = a linear map of the concatenation
        valid = torch.ones(pooled.shape[:2], dtype=torch.bool, device=pooled.device)
        return self.norm(pooled), valid, torch.arange(pooled.shape[1], device=pooled.device)

    def route(self, u: Tensor, modality: Tensor) -> Routing:
        """Route valid units u [N, D] with modality index [N]."""
        n, e = u.shape[0], self.num_experts
        if self.router is None:
            onehot = F.one_hot(modality, e).to(u.dtype)  # [N, E]
            return Routing(onehot, onehot, onehot.bool(), None)
        logits = self.router(u)  # [N, E]
        noisy = logits + torch.randn_like(logits) * self.router_noise if self.training and self.router_noise else logits
        probs = noisy.softmax(-1)
        if self.router_kind == "soft":
            return Routing(probs, probs, torch.ones_like(probs, dtype=torch.bool), logits)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [N, k]
        gates = top_p / top_p.sum(-1, keepdim=True) if self.top_k > 1 else top_p
        keep = torch.zeros_like(probs, dtype=torch.bool)
        used = torch.zeros(e, dtype=torch.long, device=u.device)
        capacity = math.ceil(self.capacity_factor * n * self.top_k / e) if self.capacity_factor > 0 else n
        for j in range(self.top_k):  # first choices claim capacity before second choices
            choice = F.one_hot(top_i[:, j], e).bool()  # [N, E]
            position = torch.cumsum(choice.long(), dim=0) + used  # [N, E] 1-based slot in the expert
            kept = choice & (position <= capacity)
            keep = keep | kept
            used += kept.sum(0)
        combine = torch.zeros_like(probs).scatter(1, top_i, gates) * keep  # [N, E]
        return Routing(probs, combine, keep, logits)

    def experts_forward(self, u: Tensor, routing: Routing) -> Tensor:
        """``u + sum_e c_e E_e(u)`` for units u [N, D], each expert run only on the units sent to it."""
        out = torch.zeros_like(u)
        for e, expert in enumerate(self.experts):
            # no skip of an empty expert: a trace (ONNX / TorchScript export) would bake in which experts its own
            # example used; an expert on 0 units costs nothing
            idx = routing.dispatch[:, e].nonzero(as_tuple=True)[0]  # [n_e]
            out = out.index_add(0, idx, routing.combine[idx, e, None] * expert(u[idx]))  # [N, D]
        return u + out

    def fuse(self, inputs: dict[str, ModalityOutput], present: dict[str, Tensor]) -> FusionOutput:
        units, valid, index = self.units(inputs)  # [B, L, D], [B, L], [L]
        batch, length = valid.shape
        u = units[valid]  # [N, D]
        sample = torch.arange(batch, device=u.device)[:, None].expand(batch, length)[valid]  # [N]
        routing = self.route(u, index.expand(batch, length)[valid])
        out = units.new_zeros(units.shape).index_put((valid,), self.experts_forward(u, routing))  # [B, L, D]
        counts = torch.bincount(sample, minlength=batch).clamp_min(1).to(u.dtype)[:, None]  # [B, 1]
        aux = {
            **self.losses(routing),
            "routing_probs": routing.probs.new_zeros(batch, self.num_experts).index_add(0, sample, routing.probs)
            / counts,  # [B, E]
        }
        if self.granularity == "sample":
            return FusionOutput(fused=out.mean(dim=1), aux=aux)  # [B, D]
        per_modality = [self.masked_mean(out[:, index == i], valid[:, index == i]) for i in range(len(self.modalities))]
        fused = torch.stack(per_modality).mean(0)  # [B, D]
        return FusionOutput(fused=fused, tokens=out, aux=aux, token_mask=valid)

    def losses(self, routing: Routing) -> dict[str, Tensor]:
        """Weighted ``balance_loss`` and ``z_loss`` (0 for ``fixed``), ``expert_utilisation`` [E] and drop share."""
        p = routing.probs
        slots = routing.dispatch.float().sum(0)  # [E]
        per_unit = self.top_k if self.router_kind == "topk" else 1
        util = p.mean(0) if self.router_kind == "soft" else slots / (p.shape[0] * per_unit)  # [E]
        aux = {"expert_utilisation": util.detach()}
        if routing.logits is None:
            zero = p.new_zeros(())
            return {**aux, "balance_loss": zero, "z_loss": zero}
        first = F.one_hot(p.argmax(-1), self.num_experts).to(p.dtype).mean(0)  # [E] share of top-1 choices
        balance = self.num_experts * (first * p.mean(0)).sum()
        z = torch.logsumexp(routing.logits, dim=-1).pow(2).mean()
        if self.router_kind == "topk":
            aux["dropped_fraction"] = (~routing.dispatch.any(-1)).float().mean()
        return {**aux, "balance_loss": self.balance_loss_weight * balance, "z_loss": self.z_loss_weight * z}

    def extra_config(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts,
            "router": self.router_kind,
            "top_k": self.top_k,
            "capacity_factor": self.capacity_factor,
            "granularity": self.granularity,
        }
