"""FeatureBatches: the index-slice batches of every head-only fit and sweep (recipes/batches.py)."""

from __future__ import annotations

import torch

from encoders import ModalityOutput
from recipes.batches import FeatureBatches


def _feats(n: int = 23, t: int = 5) -> tuple[dict[str, ModalityOutput], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]  # [N, T]
    mask[3] = False  # a missing sample
    tokens = torch.randn(n, t, 4, generator=g) * mask[..., None]
    text = ModalityOutput(tokens, mask, torch.randn(n, 4, generator=g) * mask.any(1, keepdim=True))
    image = ModalityOutput(torch.randn(n, 1, 3, generator=g), torch.ones(n, 1, dtype=torch.bool),
                           torch.randn(n, 3, generator=g))
    return {"text": text, "image": image}, torch.arange(n) % 3


def test_batches_are_the_rows_they_name() -> None:
    feats, labels = _feats()
    rows = torch.arange(100, 123)
    seen = []
    for b in FeatureBatches(feats, labels, rows, batch_size=5, shuffle=True, seed=1):
        pos = b["index"] - 100
        seen.append(pos)
        assert torch.equal(b["labels"], labels[pos])
        for m, f in feats.items():
            got = b["inputs"][m]
            assert torch.equal(got.pooled, f.pooled[pos])
            t = got.tokens.shape[1]
            assert torch.equal(got.tokens, f.tokens[pos][:, :t]) and torch.equal(got.mask, f.mask[pos][:, :t])
            assert not f.mask[pos][:, t:].any()  # only padding was cut
    assert sorted(torch.cat(seen).tolist()) == list(range(23))


def test_pooled_only_batches_carry_presence() -> None:
    feats, labels = _feats()
    b = next(iter(FeatureBatches(feats, labels, batch_size=8, tokens=False)))
    assert b["inputs"]["text"].tokens.shape == (8, 1, 4)
    assert b["inputs"]["text"].present.tolist() == [i != 3 for i in range(8)]


def test_epochs_reshuffle_and_a_resume_skips_consumed_batches() -> None:
    feats, labels = _feats()
    batches = FeatureBatches(feats, labels, batch_size=5, shuffle=True, seed=3)
    batches.sampler.set_epoch(0)
    first = [b["index"] for b in batches]
    batches.sampler.set_epoch(1)
    second = [b["index"] for b in batches]
    assert len(first) == len(batches) == 5 and not torch.equal(torch.cat(first), torch.cat(second))
    it = iter(batches)
    next(it)
    next(it)
    state = batches.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    resumed = FeatureBatches(feats, labels, batch_size=5, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    rest = [b["index"] for b in resumed]
    assert torch.equal(torch.cat(rest), torch.cat(second[2:]))


def test_processes_get_equal_shards_that_cover_every_row() -> None:
    feats, labels = _feats()
    shards = [list(FeatureBatches(feats, labels, batch_size=4, shuffle=True, rank=r, world=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # the same number of steps on every process
    rows = torch.cat([b["index"] for s in shards for b in s])
    assert rows.numel() == 24 and set(rows.tolist()) == set(range(23))  # 23 rows padded by one wrap-around
