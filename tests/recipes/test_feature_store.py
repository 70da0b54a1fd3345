"""The sharded, memory-mapped feature store (recipes/feature_store.py) and its use by FeatureCache/FeatureBatches."""

from __future__ import annotations

import json
import os
import pickle

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from encoders import Encoder, ModalityOutput, Preprocessor
from recipes import cache as cache_module
from recipes import feature_store
from recipes.batches import FeatureBatches
from recipes.cache import FeatureCache
from recipes.feature_store import CorruptEntry, StoredFeatures, StoreWriter, open_entry


def _tokens(n: int = 23, t: int = 5, d: int = 4) -> ModalityOutput:
    """Rows of 1..t valid tokens (a prefix), row 3 absent; padding positions hold junk, as encoders' do."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]  # [N, T]
    mask[3] = False
    tokens = torch.randn(n, t, d, generator=g)  # [N, T, D]
    return ModalityOutput(tokens, mask, torch.randn(n, d, generator=g) * mask.any(1, keepdim=True))


def _write(folder, out: ModalityOutput, tokens: bool = True, slots: torch.Tensor | None = None,
           batch: int = 4) -> StoredFeatures:
    writer = StoreWriter(folder, out.dim, tokens)
    for i in range(0, out.batch_size, batch):
        writer.add(out.index(slice(i, i + batch)))
    slots = torch.arange(out.batch_size) if slots is None else slots
    writer.finish(slots, {"test": True})
    return open_entry(folder, slots.numel())


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 256 rows (the least), so a few hundred rows span several shards."""
    monkeypatch.setattr(feature_store, "SHARD_BYTES", 1)


def test_batches_from_the_store_equal_batches_from_memory(tmp_path, small_shards) -> None:
    full = _tokens(n=600)
    stored = _write(tmp_path / "e", full, batch=50)
    meta = json.loads((tmp_path / "e" / "meta.json").read_text())
    assert [s["rows"] for s in meta["shards"]] == [256, 256, 88] and meta["finite"] is True
    assert meta["shards"][0]["tokens"] == int(full.mask[:256].sum())  # unpadded: only valid prefixes are stored
    labels = torch.arange(600) % 3
    for tokens in (True, False):
        for world, rank in ((1, 0), (2, 1)):
            a = FeatureBatches({"text": stored}, labels, batch_size=64, shuffle=True, seed=2, tokens=tokens,
                               rank=rank, world=world)
            b = FeatureBatches({"text": full}, labels, batch_size=64, shuffle=True, seed=2, tokens=tokens,
                               rank=rank, world=world)
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                got, want = x["inputs"]["text"], y["inputs"]["text"]
                assert torch.equal(x["index"], y["index"]) and torch.equal(got.pooled, want.pooled)
                assert got.tokens.shape == want.tokens.shape and torch.equal(got.mask, want.mask)
                assert torch.equal(got.tokens * got.mask[..., None], want.tokens * want.mask[..., None])


def test_a_batch_is_padded_to_its_own_longest_row(tmp_path) -> None:
    full = _tokens()
    stored = _write(tmp_path / "e", full)
    rows = torch.tensor([3, 0])
    out = stored.select(rows)
    assert out.tokens.shape == (2, int(full.mask[0].sum()), 4)
    assert stored.select(torch.tensor([3])).tokens.shape == (1, 1, 4)  # an absent row alone: one masked token
    assert stored.tokens.shape == (23, 5, 4) and torch.equal(stored.mask, full.mask)  # whole split, on request


def test_a_pooled_only_entry_stores_pooled_once_and_its_tokens_are_views(tmp_path) -> None:
    full = _tokens()
    stored = _write(tmp_path / "e", full, tokens=False)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "meta.json", "rows.npy", "shard-00000.pooled.npy", "shard-00000.present.npy"]
    pooled = stored.pooled
    assert isinstance(pooled, torch.Tensor) and torch.equal(pooled, full.pooled)
    assert stored.tokens.data_ptr() == pooled.data_ptr() and stored.tokens.shape == (23, 1, 4)
    assert torch.equal(stored.mask[:, 0], full.present)
    assert stored.resident_bytes < 23 * 4 * 4  # only slots and flags are held: the map costs no copy


def test_rows_point_at_distinct_slots_and_missing_rows_are_zero(tmp_path, small_shards) -> None:
    distinct = _tokens(n=300)
    slots = torch.tensor([5, -1, 5, 299, 0, 257])
    stored = _write(tmp_path / "e", distinct, slots=slots, batch=64)
    assert stored.present.tolist() == [True, False, True, True, True, True]
    safe = slots.clamp_min(0)
    assert torch.equal(stored.pooled[[0, 2, 3, 4, 5]], distinct.pooled[safe[[0, 2, 3, 4, 5]]])
    assert torch.equal(stored.pooled[1], torch.zeros(4)) and not stored.mask[1].any()
    batch = stored.select(torch.tensor([3, 5, 1]))
    for j, r in enumerate((299, 257)):
        n = int(distinct.mask[r].sum())
        assert torch.equal(batch.tokens[j, :n], distinct.tokens[r, :n])


def test_opening_checks_structure_not_values(tmp_path, monkeypatch) -> None:
    _write(tmp_path / "e", _tokens())

    def no_value_scan(*args, **kwargs):
        raise AssertionError("loading an entry must not scan its values")

    monkeypatch.setattr(torch, "isfinite", no_value_scan)
    stored = open_entry(tmp_path / "e", 23)
    assert isinstance(stored._parts["pooled"][0], np.memmap) and isinstance(stored._parts["tokens"][0], np.memmap)
    with pytest.raises(CorruptEntry, match="24"):
        open_entry(tmp_path / "e", 24)
    meta = json.loads((tmp_path / "e" / "meta.json").read_text())
    meta["dim"] = 5
    (tmp_path / "e" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptEntry, match="pooled.npy"):
        open_entry(tmp_path / "e", 23)


def test_pickled_features_reopen_the_same_files(tmp_path) -> None:
    stored = _write(tmp_path / "e", _tokens())
    data = pickle.dumps(stored.pooled_only())
    assert len(data) < 1000  # the folder, not the features
    again = pickle.loads(data)
    assert not again.has_tokens and torch.equal(again.pooled, stored.pooled)


def test_released_pages_read_the_same_values(tmp_path) -> None:
    stored = _write(tmp_path / "e", _tokens())
    before = stored.select(torch.arange(23))
    stored.release()
    after = stored.select(torch.arange(23))
    assert torch.equal(before.tokens, after.tokens) and torch.equal(before.pooled, after.pooled)


def _mapped_kb(folder) -> int:
    """Resident kB of this process's mappings of files in ``folder`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line: address range ... path
            inside = len(head) >= 6 and head[5].startswith(str(folder))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_batches_are_read_without_mapping_pages(tmp_path, small_shards) -> None:
    """A shuffled epoch over a multi-shard entry reads rows by pread: the maps stay unresident (touching random
    rows of a map once kept the whole entry in the resident set)."""
    full = _tokens(n=600)
    stored = _write(tmp_path / "e", full, batch=50)
    stored.release()
    labels = torch.zeros(600, dtype=torch.long)
    batches = FeatureBatches({"text": stored}, labels, batch_size=64, shuffle=True, seed=1)
    seen = torch.cat([b["inputs"]["text"].pooled for b in batches])  # [600, D]
    order = torch.as_tensor(batches.sampler.order(0))
    assert torch.equal(seen, full.pooled[order])
    assert _mapped_kb(tmp_path / "e") == 0


def test_a_truncated_shard_is_named_when_read(tmp_path) -> None:
    stored = _write(tmp_path / "e", _tokens())
    shard = tmp_path / "e" / "shard-00000.pooled.npy"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 8)
    with pytest.raises(CorruptEntry, match="shard-00000.pooled.npy: read"):
        stored.select(torch.tensor([22]))


# FeatureCache over the store ------------------------------------------------------------------------------------
class _Words(Preprocessor):
    modality = "text"

    def __call__(self, items):
        words = [[] if x is None else x.split() for x in items]
        t = max([1, *map(len, words)])
        ids = torch.zeros(len(items), t, dtype=torch.long)
        for i, ws in enumerate(words):
            ids[i, :len(ws)] = torch.tensor([sum(map(ord, w)) % 50 + 1 for w in ws], dtype=torch.long)
        return {"ids": ids, "mask": ids > 0, "present": torch.tensor([x is not None for x in items])}


class _WordEncoder(Encoder):
    modality = "text"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.embed_dim, self.preprocessor, self.spec = nn.Embedding(51, 4), 4, _Words(), {"name": "w"}

    def encode(self, batch):
        tokens = self.emb(batch["ids"]) + 1.0  # [B, T, 4]; padding positions are not zero
        m = batch["mask"]
        return ModalityOutput(tokens, m, (tokens * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1))


TEXTS = ["a b c", "dd", None, "e f g h i", "j", "k l", "a b c"]


@pytest.fixture(autouse=True)
def _fresh_memory():
    FeatureCache.clear_memory()
    yield
    FeatureCache.clear_memory()


@pytest.mark.parametrize("tokens", [True, False])
def test_an_old_single_file_entry_is_converted_once_with_equal_features(tmp_path, tokens, caplog) -> None:
    enc, ds = _WordEncoder().set_finetune("frozen"), datasets.Dataset.from_dict({"text": TEXTS})
    cache = FeatureCache(tmp_path)
    with torch.no_grad():
        direct = enc(enc.preprocessor(TEXTS))  # what format 2 stored: [N, T, D] padded over the split
    old = direct if tokens else ModalityOutput(direct.pooled[:, None], direct.present[:, None], direct.pooled)
    parts = {**cache.key_parts(enc, ds, "text", "train", tokens), "format": cache_module.LEGACY_FORMAT}
    save_file({"tokens": old.tokens.clone(), "mask": old.mask.clone(), "pooled": old.pooled.clone()},
              str(tmp_path / f"{cache_module._digest(parts)}.safetensors"))

    def no_encoding(*args, **kwargs):
        raise AssertionError("an old entry must be converted, not encoded again")

    cache._compute = no_encoding  # type: ignore[method-assign]
    with caplog.at_level("INFO"):
        out, stats = cache.get_or_compute(enc, ds, "text", store_tokens=tokens)
    assert "old single-file format" in caplog.text and stats.source == "disk"
    assert isinstance(out, StoredFeatures) and cache.path(stats.key).is_dir()
    torch.testing.assert_close(out.pooled, old.pooled, rtol=0, atol=1e-6)
    assert torch.equal(out.mask, old.mask)
    torch.testing.assert_close(out.tokens * out.mask[..., None], old.tokens * old.mask[..., None], rtol=0, atol=1e-6)
    FeatureCache.clear_memory()
    caplog.clear()
    with caplog.at_level("INFO"):
        again, _ = cache.get_or_compute(enc, ds, "text", store_tokens=tokens)  # now the new entry, no notice
    assert "old single-file format" not in caplog.text and torch.equal(again.pooled, out.pooled)


def test_the_memory_index_counts_only_bytes_held_in_ram(tmp_path, monkeypatch) -> None:
    texts = [f"w{i} x y" for i in range(350)]
    enc, ds = _WordEncoder().set_finetune("frozen"), datasets.Dataset.from_dict({"text": texts})
    cache = FeatureCache(tmp_path)
    out, stats = cache.get_or_compute(enc, ds, "text")
    assert isinstance(out, StoredFeatures) and stats.bytes > 350 * 4 * 4 * 4  # on disk: pooled and 3 tokens a row
    assert cache_module._nbytes(out) == out.resident_bytes < stats.bytes  # in RAM: slots and flags
    monkeypatch.setattr(cache_module, "MEMORY_LIMIT_BYTES", out.resident_bytes * 2 + 1)
    other, _ = cache.get_or_compute(enc, ds, "text", store_tokens=False)
    assert len(cache_module._MEMORY) == 2  # two mapped entries fit a limit that their features would not


def test_duplicate_cells_are_stored_once(tmp_path) -> None:
    enc, ds = _WordEncoder().set_finetune("frozen"), datasets.Dataset.from_dict({"text": TEXTS})
    out, stats = FeatureCache(tmp_path).get_or_compute(enc, ds, "text")
    meta = json.loads((FeatureCache(tmp_path).path(stats.key) / "meta.json").read_text())
    assert meta["rows"] == 7 and meta["distinct"] == 5  # "a b c" twice, one row missing
    assert torch.equal(out.pooled[0], out.pooled[6]) and not out.present[2]


def test_the_standardisation_of_a_store_reads_chunks_and_equals_the_in_memory_one(tmp_path, small_shards,
                                                                                 monkeypatch) -> None:
    """fit_feature_norm cuts a store in row chunks through ``select`` (never ``pooled`` whole: with several
    shards or shared slots that is a copy of the split) and gets the in-memory statistics."""
    from zoo.config import FusionModelConfig
    from zoo.model import FusionModel

    distinct = _tokens(n=300)
    slots = torch.cat([torch.arange(300), torch.tensor([7, -1, 7, 120])])  # shared and missing rows
    stored = _write(tmp_path / "e", distinct, slots=slots, batch=64)
    memory = ModalityOutput(stored.tokens.clone(), stored.mask.clone(), stored.pooled.clone())
    monkeypatch.setattr(StoredFeatures, "pooled", property(lambda self: pytest.fail("read pooled whole")))
    cfg = FusionModelConfig(encoders={"text": "tiny-text"}, labels=("a", "b"), hidden_dim=8)
    a, b = FusionModel(cfg, embed_dims={"text": 4}), FusionModel(cfg, embed_dims={"text": 4})
    assert a.fit_feature_norm({"text": stored}) == ["text"] and b.fit_feature_norm({"text": memory}) == ["text"]
    torch.testing.assert_close(a.feature_norm["text"].mean, b.feature_norm["text"].mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.feature_norm["text"].std, b.feature_norm["text"].std, rtol=1e-6, atol=0)
