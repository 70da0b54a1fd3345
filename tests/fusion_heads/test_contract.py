"""The fusion-head contract, checked for every registered head x 1/2/3 modalities x missing-modality scenarios.

A new head file is picked up with no edit here: heads are built with their default options, merged with
``TINY_OPTIONS.get(name, {})``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from encoders import ModalityOutput
from fusion_errors import InputError
from fusion_heads import FusionHead, FusionOutput, create_fusion_head, list_fusion_heads

DIMS = {"audio": 5, "image": 7, "text": 6}  # different widths per modality on purpose
MODALITY_SETS = {1: ["text"], 2: ["image", "text"], 3: ["audio", "image", "text"]}
OUT, BATCH, TOKENS = 8, 4, 3
SCENARIOS = ["all_present", "some_absent", "key_missing"]
ABSENT_ROWS = [1, 3]

# options that keep a head tiny for these tests; a head missing here is built with its defaults
TINY_OPTIONS: dict[str, dict] = {"bottleneck": {"layers": 1, "num_bottlenecks": 2}}

# parameters (name prefixes) a head may leave without a gradient, besides ``missing.<m>`` of modalities that
# were present in every sample:
MAY_LACK_GRAD: dict[str, tuple[str, ...]] = {
    # exclude_missing=True (default) gives absent modalities weight 0 unless a sample has nothing present
    "average": ("missing.",),
    # sparse top-k routing: an expert that no unit was routed to in the batch gets no gradient
    "moe": ("experts.",),
}

CASES = [(n, s) for n in MODALITY_SETS for s in SCENARIOS]


def build(name: str, modalities: list[str], seed: int = 0) -> FusionHead:
    torch.manual_seed(seed)
    return create_fusion_head(name, {m: DIMS[m] for m in modalities}, OUT, **TINY_OPTIONS.get(name, {}))


def make_inputs(modalities: list[str], scenario: str, tokens: int = TOKENS, seed: int = 0) -> dict[str, ModalityOutput]:
    """Random features with ragged valid lengths; the first modality is absent for some rows or the whole batch."""
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for m in modalities:
        x = torch.randn(BATCH, tokens, DIMS[m], generator=g)  # [B, T, D]
        lengths = torch.randint(1, tokens + 1, (BATCH,), generator=g)
        mask = torch.arange(tokens)[None] < lengths[:, None]  # [B, T]
        if scenario == "some_absent" and m == modalities[0]:
            mask[ABSENT_ROWS] = False
        x = x * mask[..., None]
        pooled = x.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, D], zeros where absent
        feats[m] = ModalityOutput(x, mask, pooled)
    if scenario == "key_missing":
        del feats[modalities[0]]
    return feats


def check_output(out: FusionOutput) -> None:
    assert out.fused.shape == (BATCH, OUT)
    assert torch.isfinite(out.fused).all()
    if out.tokens is not None:
        assert out.tokens.dim() == 3 and out.tokens.shape[0] == BATCH and out.tokens.shape[2] == OUT
        assert torch.isfinite(out.tokens).all()
        if out.token_mask is not None:
            assert out.token_mask.shape == out.tokens.shape[:2] and out.token_mask.dtype == torch.bool
            assert out.token_mask.any(1).all(), "every sample needs at least one valid fused token"
    for key, value in out.aux.items():
        assert isinstance(value, Tensor), key
        assert torch.isfinite(value).all(), key
        if key.endswith("_loss"):
            assert value.dim() == 0, f"aux[{key!r}] must be a scalar loss"


def assert_same(a: FusionOutput, b: FusionOutput, exact: bool) -> None:
    tol = {"atol": 0.0, "rtol": 0.0} if exact else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(a.fused, b.fused, **tol)
    assert (a.tokens is None) == (b.tokens is None)
    if a.tokens is not None and b.tokens is not None:
        if a.token_mask is None or b.token_mask is None:
            torch.testing.assert_close(a.tokens, b.tokens, **tol)
        else:  # compare valid tokens only: padding may change the sequence length
            torch.testing.assert_close(a.tokens[a.token_mask], b.tokens[b.token_mask], **tol)
    assert a.aux.keys() == b.aux.keys()
    for key in a.aux:
        torch.testing.assert_close(a.aux[key], b.aux[key], **tol)


def run(head: FusionHead, feats: dict[str, ModalityOutput], n: int, scenario: str) -> FusionOutput | None:
    """Forward, or check the InputError when no modality is left (1 modality, key missing)."""
    if not feats:
        assert n == 1 and scenario == "key_missing"
        with pytest.raises(InputError):
            head(feats)
        return None
    return head(feats)


@pytest.mark.parametrize("n, scenario", CASES)
@pytest.mark.parametrize("name", list_fusion_heads())
@pytest.mark.parametrize("tokens", [TOKENS, 1])
def test_shapes_finite_and_aux(name: str, n: int, scenario: str, tokens: int) -> None:
    mods = MODALITY_SETS[n]
    head = build(name, mods)
    for train in (True, False):
        head.train(train)
        out = run(head, make_inputs(mods, scenario, tokens=tokens), n, scenario)
        if out is not None:
            check_output(out)


@pytest.mark.parametrize("n, scenario", CASES)
@pytest.mark.parametrize("name", list_fusion_heads())
def test_gradients_reach_parameters(name: str, n: int, scenario: str) -> None:
    mods = MODALITY_SETS[n]
    head = build(name, mods).train()
    feats = make_inputs(mods, scenario)
    out = run(head, feats, n, scenario)
    if out is None:
        return
    g = torch.Generator().manual_seed(1)
    loss = (out.fused * torch.randn(out.fused.shape, generator=g)).sum()  # random weights: no symmetric zeros
    if out.tokens is not None:
        loss = loss + (out.tokens * torch.randn(out.tokens.shape, generator=g)).sum()
    loss = loss + sum((v for k, v in out.aux.items() if k.endswith("_loss")), torch.zeros(()))
    loss.backward()
    absent = mods[0] if scenario != "all_present" else None
    allowed = MAY_LACK_GRAD.get(name, ()) + tuple(f"missing.{m}" for m in mods if m != absent)
    for pname, p in head.named_parameters():
        if p.grad is None:
            assert pname.startswith(allowed), f"{name}: parameter {pname} got no gradient ({scenario}, {mods})"
        else:
            assert torch.isfinite(p.grad).all(), pname


class _OrderProbe(FusionHead):
    """Concatenates the pooled vectors in the order ``fuse`` receives them, and records that order."""

    def __init__(self, modality_dims: dict[str, int]) -> None:
        super().__init__(modality_dims, sum(modality_dims.values()))
        self.seen: list[list[str]] = []

    def fuse(self, inputs: dict[str, ModalityOutput], present: dict[str, Tensor]) -> FusionOutput:
        self.seen.append(list(inputs))
        return FusionOutput(fused=torch.cat([f.pooled for f in inputs.values()], dim=-1))


def test_heads_receive_modalities_in_sorted_order_whatever_the_input_order() -> None:
    # an order-sensitive head: only the base class's sorting makes every head key-order invariant
    probe = _OrderProbe({"text": 1, "audio": 1, "image": 1})
    one = torch.ones(2, 1, dtype=torch.bool)
    feats = {m: ModalityOutput(torch.full((2, 1, 1), v), one, torch.full((2, 1), v))
             for m, v in (("text", 3.0), ("image", 2.0), ("audio", 1.0))}
    out = probe(feats)  # text, image, audio given
    assert probe.seen == [["audio", "image", "text"]]
    assert out.fused.tolist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    assert probe({"image": feats["image"], "audio": feats["audio"]}).fused[:, :2].tolist() == [[1.0, 2.0]] * 2
    assert probe.seen[-1] == ["audio", "image", "text"]  # the missing text is filled in, in its place


@pytest.mark.parametrize("n, scenario", CASES)
@pytest.mark.parametrize("name", list_fusion_heads())
def test_padding_invariance(name: str, n: int, scenario: str) -> None:
    mods = MODALITY_SETS[n]
    head = build(name, mods).eval()
    feats = make_inputs(mods, scenario)
    padded = {}
    for m, f in feats.items():  # two extra masked tokens of large garbage per modality
        garbage = 100 * torch.randn(BATCH, 2, f.dim)
        tokens = torch.cat([f.tokens, garbage], dim=1)
        mask = torch.cat([f.mask, torch.zeros(BATCH, 2, dtype=torch.bool)], dim=1)
        padded[m] = ModalityOutput(tokens, mask, f.pooled)
    with torch.no_grad():
        out = run(head, feats, n, scenario)
        if out is None:
            return
        assert_same(out, head(padded), exact=False)


@pytest.mark.parametrize("n, scenario", CASES)
@pytest.mark.parametrize("name", list_fusion_heads())
def test_state_dict_round_trip(name: str, n: int, scenario: str) -> None:
    mods = MODALITY_SETS[n]
    head, fresh = build(name, mods, seed=0).eval(), build(name, mods, seed=1).eval()
    fresh.load_state_dict(head.state_dict())
    feats = make_inputs(mods, scenario)
    with torch.no_grad():
        out = run(head, feats, n, scenario)
        if out is None:
            return
        assert_same(out, fresh(feats), exact=True)


@pytest.mark.parametrize("name", list_fusion_heads())
def test_input_errors(name: str) -> None:
    head = build(name, MODALITY_SETS[2])
    feats = make_inputs(MODALITY_SETS[2], "all_present")
    with pytest.raises(InputError):
        head({})
    short = feats["text"].index(slice(0, BATCH - 1))
    with pytest.raises(InputError, match="batch sizes"):
        head({"image": feats["image"], "text": short})
    with pytest.raises(InputError):
        head({**feats, "audio": feats["text"]})  # a modality the head was not built for
