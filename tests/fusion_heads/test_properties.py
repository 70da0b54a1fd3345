"""One pinned, head-specific property per fusion head (formulae from docs/heads.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from encoders import ModalityOutput
from fusion_errors import ConfigError
from fusion_heads import create_fusion_head

B = 6


def features(dims: dict[str, int], tokens: int = 3, seed: int = 0) -> dict[str, ModalityOutput]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, d in dims.items():
        x = torch.randn(B, tokens, d, generator=g)  # [B, T, D]
        out[m] = ModalityOutput(x, torch.ones(B, tokens, dtype=torch.bool), x.mean(1))
    return out


def linear(layer: torch.nn.Linear, x: Tensor) -> Tensor:
    return x @ layer.weight.T + layer.bias


# ----------------------------------------------------------------------------------------------- average
def test_average_uniform_is_mean_of_projections_over_present_modalities() -> None:
    torch.manual_seed(0)
    dims = {"audio": 3, "image": 4, "text": 5}
    head = create_fusion_head("average", dims, 6, weighting="uniform").eval()
    feats = features(dims)
    with torch.no_grad():
        projected = {m: linear(head.proj[m], feats[m].pooled) for m in dims}  # [B, 6] each
        out = head(feats)
        torch.testing.assert_close(out.fused, sum(projected.values()) / 3)
        torch.testing.assert_close(out.aux["weights"], torch.full((B, 3), 1 / 3))
        # text absent in the first two samples: the mean is over audio and image only (exclude_missing=True)
        text = feats["text"]
        mask = text.mask.clone()
        mask[:2] = False
        out = head({**feats, "text": ModalityOutput(text.tokens, mask, text.pooled)})
        torch.testing.assert_close(out.fused[:2], (projected["audio"][:2] + projected["image"][:2]) / 2)
        torch.testing.assert_close(out.fused[2:], (sum(projected.values()) / 3)[2:])
        torch.testing.assert_close(out.aux["weights"][:2, 2], torch.zeros(2))


def test_average_keeping_missing_uses_the_missing_embedding() -> None:
    torch.manual_seed(0)
    dims = {"image": 4, "text": 5}
    head = create_fusion_head("average", dims, 6, weighting="global", exclude_missing=False).eval()
    with torch.no_grad():
        head.weight_logits.copy_(torch.tensor([0.0, math.log(3.0)]))  # weights 1/4, 3/4
        feats = features({"image": 4})
        out = head(feats)  # text missing for the whole batch
        expected = 0.25 * linear(head.proj["image"], feats["image"].pooled) + 0.75 * linear(
            head.proj["text"], head.missing["text"][None]
        )
        torch.testing.assert_close(out.fused, expected)


# ----------------------------------------------------------------------------------------------- gating
def test_gating_saturated_gates_select_one_modality() -> None:
    torch.manual_seed(0)
    dims = {"image": 4, "text": 5}
    head = create_fusion_head("gating", dims, 6).eval()  # hidden_dim=0: fused = sum_m z_m tanh(W_m x_m)
    feats = features(dims)
    with torch.no_grad():
        h = {m: torch.tanh(feats[m].pooled @ head.proj[m].weight.T) for m in dims}
        head.gate.weight.zero_()
        head.gate.bias.copy_(torch.tensor([30.0, -30.0]))  # image gate saturated at 1
        out = head(feats)
        torch.testing.assert_close(out.fused, h["image"])
        torch.testing.assert_close(out.aux["gates"], torch.tensor([[1.0, 0.0]]).expand(B, 2))
        head.gate.bias.copy_(torch.tensor([math.log(0.3), math.log(0.7)]))  # sigmoid form: z = 0.3
        out = head(feats)
        torch.testing.assert_close(out.fused, 0.3 * h["image"] + 0.7 * h["text"])
        assert out.fused.abs().max() <= 1.0  # a convex combination of tanh outputs


def test_gating_floor_keeps_every_modality_in_the_mix() -> None:
    """floor=0.5 with two modalities: a gate saturated on image still leaves text 0.25 of the mix."""
    torch.manual_seed(0)
    dims = {"image": 4, "text": 5}
    head = create_fusion_head("gating", dims, 6, floor=0.5).eval()
    feats = features(dims)
    with torch.no_grad():
        h = {m: torch.tanh(feats[m].pooled @ head.proj[m].weight.T) for m in dims}
        head.gate.weight.zero_()
        head.gate.bias.copy_(torch.tensor([30.0, -30.0]))
        out = head(feats)
    torch.testing.assert_close(out.aux["gates"], torch.tensor([[0.75, 0.25]]).expand(B, 2))
    torch.testing.assert_close(out.fused, 0.75 * h["image"] + 0.25 * h["text"])
    assert head.extra_config()["floor"] == 0.5
    with pytest.raises(ConfigError, match=r"floor=1.0 must be in \[0, 1\)"):
        create_fusion_head("gating", dims, 6, floor=1.0)


# ----------------------------------------------------------------------------------------------- moe
def moe(**options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_fusion_head("moe", {"image": 4, "text": 5}, 8, **options).eval()


def test_moe_top1_sends_each_sample_to_exactly_one_expert() -> None:
    head = moe(router="topk", top_k=1, num_experts=4)
    feats = features({"image": 4, "text": 5})
    with torch.no_grad():
        out = head(feats)
        units, _, index = head.units(head.complete(feats)[0])
        u = units[:, 0]  # [B, D]
        routing = head.route(u, index.expand(B, 1)[:, 0])
        assert (routing.dispatch.sum(-1) == 1).all()
        assert ((routing.combine > 0).sum(-1) == 1).all()
        probs = head.router(u).softmax(-1)
        e = probs.argmax(-1)
        expected = torch.stack([u[i] + probs[i, e[i]] * head.experts[int(e[i])](u[i]) for i in range(B)])
        torch.testing.assert_close(out.fused, expected)
        torch.testing.assert_close(out.aux["routing_probs"], probs)
        torch.testing.assert_close(out.aux["expert_utilisation"].sum(), torch.tensor(1.0))


def test_moe_balance_loss_is_one_for_uniform_routing_and_larger_when_collapsed() -> None:
    head = moe(router="topk", num_experts=4, balance_loss_weight=1.0)
    feats = features({"image": 4, "text": 5})
    with torch.no_grad():
        head.router.weight.zero_()
        head.router.bias.zero_()
        assert head(feats).aux["balance_loss"].item() == pytest.approx(1.0, abs=1e-6)
        head.router.bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))  # everything to expert 0
        collapsed = head(feats).aux["balance_loss"].item()
    assert collapsed > 3.9  # -> num_experts as routing collapses


def test_moe_z_loss_is_mean_squared_logsumexp() -> None:
    head = moe(router="soft", num_experts=3, z_loss_weight=0.5)
    feats = features({"image": 4, "text": 5})
    with torch.no_grad():
        head.router.weight.zero_()
        head.router.bias.copy_(torch.tensor([1.0, 2.0, -1.0]))  # same logits for every sample
        expected = 0.5 * math.log(math.exp(1.0) + math.exp(2.0) + math.exp(-1.0)) ** 2
        assert head(feats).aux["z_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_moe_capacity_drops_overflow_to_the_residual_path() -> None:
    head = moe(router="topk", top_k=1, num_experts=4, capacity_factor=1.0)  # capacity ceil(6 / 4) = 2
    feats = features({"image": 4, "text": 5})
    with torch.no_grad():
        head.router.weight.zero_()
        head.router.bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
        out = head(feats)
        u = head.units(head.complete(feats)[0])[0][:, 0]  # [B, D]
        torch.testing.assert_close(out.fused[2:], u[2:])  # samples 3.. found expert 0 full
        assert not torch.allclose(out.fused[:2], u[:2])
        assert out.aux["dropped_fraction"].item() == pytest.approx(4 / 6)


def test_moe_fixed_router_uses_one_expert_per_modality() -> None:
    head = moe(router="fixed", granularity="token")
    feats = features({"image": 4, "text": 5})
    with torch.no_grad():
        out = head(feats)
    assert len(head.experts) == 2
    torch.testing.assert_close(out.aux["routing_probs"], torch.full((B, 2), 0.5))
    assert out.aux["balance_loss"].item() == 0.0
    assert out.tokens is not None and out.tokens.shape == (B, 6, 8)


def test_moe_trace_runs_experts_its_example_did_not_use() -> None:
    """A trace (what ONNX / TorchScript export records) made on samples that all go to expert 0 still runs expert 1
    for samples routed there: no expert is skipped by a branch on the traced example's routing."""
    head = moe(router="topk", top_k=1, num_experts=2)

    def outputs(image: Tensor, text: Tensor) -> dict[str, ModalityOutput]:
        one = torch.ones(image.shape[0], 1, dtype=torch.bool)
        return {"image": ModalityOutput(image[:, None], one, image), "text": ModalityOutput(text[:, None], one, text)}

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, image: Tensor, text: Tensor) -> Tensor:
            return self.head(outputs(image, text)).fused  # [B, D]

    def first_choice(image: Tensor, text: Tensor) -> Tensor:
        return head.router(head.units(outputs(image, text))[0][:, 0]).argmax(-1)  # [B]

    feats = features({"image": 4, "text": 5})
    with torch.no_grad():
        for proj in head.proj.values():
            proj.bias.zero_()  # units u = LN(W x) are odd in x: -x routes to the other expert
        head.router.weight.zero_()
        head.router.bias.zero_()
        head.router.weight[0, 0], head.router.weight[1, 0] = 10.0, -10.0  # expert 0 iff u[0] > 0
        u0 = head.units(outputs(feats["image"].pooled, feats["text"].pooled))[0][:, 0, 0]  # [B]
        sign = torch.where(u0 > 0, 1.0, -1.0)[:, None]
        image, text = feats["image"].pooled * sign, feats["text"].pooled * sign  # [B, 4], [B, 5]
        assert (first_choice(image, text) == 0).all() and (first_choice(-image, -text) == 1).all()
        flat = Flat().eval()
        traced = torch.jit.trace(flat, (image, text), check_trace=False)
        torch.testing.assert_close(traced(-image, -text), flat(-image, -text))


# ----------------------------------------------------------------------------------------------- concat
def test_concat_with_identity_projection_is_torch_cat() -> None:
    dims = {"text": 5, "image": 3}  # unsorted on purpose: the head concatenates in sorted order
    head = create_fusion_head("concat", dims, 8, hidden_dim=0).eval()
    with torch.no_grad():
        head.proj[-1].weight.copy_(torch.eye(8))
        head.proj[-1].bias.zero_()
        feats = features(dims)
        torch.testing.assert_close(head(feats).fused, torch.cat([feats["image"].pooled, feats["text"].pooled], -1))


# ----------------------------------------------------------------------------------------------- tensor
def test_tensor_fusion_is_outer_product_and_a_zero_modality_leaves_unimodal_terms() -> None:
    torch.manual_seed(0)
    dims, k = {"image": 4, "text": 5}, 3
    head = create_fusion_head("tensor", dims, 6, proj_dim=k).eval()
    feats = features(dims)
    with torch.no_grad():
        z = {m: torch.cat([linear(head.proj[m], feats[m].pooled), torch.ones(B, 1)], -1) for m in dims}
        kron = torch.stack([torch.kron(z["image"][i], z["text"][i]) for i in range(B)])  # [B, (k+1)^2]
        torch.testing.assert_close(head(feats).fused, linear(head.out, kron))
        head.proj["image"].weight.zero_()
        head.proj["image"].bias.zero_()  # z_image = [0, ..., 0, 1]
        unimodal = z["text"] @ head.out.weight[:, k * (k + 1) :].T + head.out.bias  # only the "1 x text" block
        torch.testing.assert_close(head(feats).fused, unimodal)


# ----------------------------------------------------------------------------------------------- low_rank
@pytest.mark.parametrize("dims", [{"image": 4, "text": 5}, {"audio": 2, "image": 4, "text": 5}])
def test_low_rank_rank1_equals_explicit_tensor_product(dims: dict[str, int]) -> None:
    torch.manual_seed(0)
    head = create_fusion_head("low_rank", dims, 6, rank=1).eval()
    feats = features(dims)
    z = [torch.cat([feats[m].pooled, torch.ones(B, 1)], -1) for m in sorted(dims)]
    f = [head.factors[m][0] for m in sorted(dims)]  # [D_m + 1, out]
    with torch.no_grad():
        if len(dims) == 2:  # full weight tensor W[i, j, o] = w * A[i, o] * B[j, o]
            weight = head.rank_weights[0] * f[0][:, None, :] * f[1][None, :, :]
            expected = torch.einsum("bi,bj,ijo->bo", z[0], z[1], weight) + head.bias
        else:
            weight = head.rank_weights[0] * f[0][:, None, None, :] * f[1][None, :, None, :] * f[2][None, None, :, :]
            expected = torch.einsum("bi,bj,bk,ijko->bo", z[0], z[1], z[2], weight) + head.bias
        torch.testing.assert_close(head(feats).fused, expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- cross_attention
@pytest.mark.parametrize("mode", ["all", "mult"])
def test_cross_attention_to_a_single_valid_key_returns_its_value(mode: str) -> None:
    torch.manual_seed(0)
    dims = {"image": 4, "text": 5}
    head = create_fusion_head("cross_attention", dims, 8, mode=mode).eval()
    feats = features(dims)
    text = feats["text"]
    mask = torch.zeros_like(text.mask)
    mask[:, 1] = True  # only token 1 of text is valid; the others are masked garbage
    tokens = text.tokens.clone()
    tokens[:, [0, 2]] = 50.0
    feats["text"] = ModalityOutput(tokens, mask, text.pooled)
    block = head.blocks["image"][0] if mode == "all" else head.pairs["image_from_text"][0]
    seen: list[Tensor] = []
    block.attn.register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    with torch.no_grad():
        head(feats)
        attn = block.attn
        d = attn.embed_dim
        key = linear(head.proj["text"], text.tokens[:, 1])  # [B, D]
        value = key @ attn.in_proj_weight[2 * d :].T + attn.in_proj_bias[2 * d :]
        expected = attn.out_proj(value)[:, None].expand(B, 3, d)  # every image query gets the same value
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- bottleneck
@pytest.mark.parametrize(
    "num_bottlenecks, layers, text_changes",
    [(0, 2, False), (2, 1, False), (2, 2, True)],  # one hop per layer: image -> bottleneck -> text
)
def test_bottleneck_is_the_only_path_between_modalities(num_bottlenecks: int, layers: int, text_changes: bool) -> None:
    torch.manual_seed(0)
    dims = {"image": 4, "text": 5}
    head = create_fusion_head("bottleneck", dims, 8, num_bottlenecks=num_bottlenecks, layers=layers).eval()
    feats = features(dims)
    image = feats["image"]
    changed = {
        **feats,
        "image": ModalityOutput(image.tokens + torch.randn_like(image.tokens), image.mask, image.pooled),
    }
    with torch.no_grad():
        cls, b = head.encode(head.complete(feats)[0])
        cls2, b2 = head.encode(head.complete(changed)[0])
    assert not torch.allclose(cls["image"], cls2["image"])
    assert torch.allclose(cls["text"], cls2["text"], atol=1e-6) != text_changes
    if num_bottlenecks:
        assert not torch.allclose(b, b2)  # the bottleneck always carries the change
