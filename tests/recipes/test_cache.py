"""FeatureCache: keys, bit-identical hits, padding, pooled-only entries, atomic files, error rows."""

from __future__ import annotations

import threading

import datasets
import numpy as np
import pytest
import torch
from torch import nn

from encoders import Encoder, ModalityOutput, Preprocessor
from fusion_errors import DataError, InputError
from recipes import cache as cache_module
from recipes.cache import FeatureCache

TEXTS = ["a b c", "dd", None, "e f g h i", "j", "k l"]


class WordPreprocessor(Preprocessor):
    """One token per word (ids from the letters); None = missing."""

    modality = "text"

    def __init__(self, lowercase: bool = True) -> None:
        self.lowercase = lowercase

    def __call__(self, items):
        for i, x in enumerate(items):
            if x is not None and not isinstance(x, str):
                raise InputError(f"text item {i} is a {type(x).__name__}, not a string.")
        words = [[] if x is None else (x.lower() if self.lowercase else x).split() for x in items]
        t = max([1, *map(len, words)])
        ids = torch.zeros(len(items), t, dtype=torch.long)
        mask = torch.zeros(len(items), t, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                ids[i, j], mask[i, j] = sum(map(ord, w)) % 50 + 1, True
        return {"ids": ids, "mask": mask, "present": torch.tensor([x is not None for x in items])}

    def to_dict(self):
        return {"lowercase": self.lowercase}


class WordEncoder(Encoder):
    modality = "text"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(51, 4)
        self.embed_dim, self.preprocessor, self.calls = 4, WordPreprocessor(), 0
        self.spec = {"name": "words"}

    def encode(self, batch):
        self.calls += 1
        tokens = self.emb(batch["ids"])  # [B, T, 4]
        m = batch["mask"]
        pooled = (tokens * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        return ModalityOutput(tokens, m, pooled)


@pytest.fixture(autouse=True)
def _fresh_memory():
    FeatureCache.clear_memory()
    yield
    FeatureCache.clear_memory()


@pytest.fixture
def enc():
    return WordEncoder().set_finetune("frozen")


def rows(texts=TEXTS):
    return datasets.Dataset.from_dict({"text": texts})


def test_key_changes_with_weights_preprocessing_data_and_layout(tmp_path, enc):
    cache, ds = FeatureCache(tmp_path), rows()
    base = cache.key(enc, ds, "text", "train")
    assert base == FeatureCache(tmp_path / "other").key(WordEncoder().set_finetune("frozen"), rows(), "text", "train")
    # the same rows under another split name share the entry (fit, test and sweep reuse it)
    assert cache.key(enc, ds, "text", "test") == base
    variants = {
        "tokens": cache.key(enc, ds, "text", "train", store_tokens=False),
        "extra": cache.key(enc, ds, "text", "train", extra="file:1:2"),
        "data": cache.key(enc, rows(["changed", *TEXTS[1:]]), "text", "train"),
        "rows": cache.key(enc, ds.select([0, 1]), "text", "train"),
    }
    with torch.no_grad():
        enc.emb.weight[0, 0] += 1e-3
    variants["weights"] = cache.key(enc, ds, "text", "train")
    enc.preprocessor.lowercase = False
    variants["preprocessing"] = cache.key(enc, ds, "text", "train")
    assert len({base, *variants.values()}) == len(variants) + 1, variants


def test_hit_is_bit_identical_and_skips_the_encoder(tmp_path, enc):
    cache = FeatureCache(tmp_path)
    first, s1 = cache.get_or_compute(enc, rows(), "text", "train", batch_size=2)
    assert s1.source == "computed" and not s1.hit and enc.calls == 3
    assert [p.suffix for p in tmp_path.iterdir()] == [".features"]  # no temp folders left behind
    FeatureCache.clear_memory()
    again, s2 = cache.get_or_compute(enc, rows(), "text", "train", batch_size=2)
    assert s2.source == "disk" and s2.key == s1.key and enc.calls == 3
    for a, b in zip((first.tokens, first.mask, first.pooled), (again.tokens, again.mask, again.pooled), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    _, s3 = cache.get_or_compute(enc, rows(), "text", "train", batch_size=2)
    assert s3.source == "memory" and enc.calls == 3
    assert s1.bytes == s2.bytes > 0 and s1.rows == 6


def test_tokens_padded_across_batches_and_equal_to_direct_encoding(tmp_path, enc):
    out, _ = FeatureCache(tmp_path).get_or_compute(enc, rows(), "text", "train", batch_size=2)
    assert out.tokens.shape == (6, 5, 4) and out.tokens.dtype == torch.float32
    assert out.mask.sum(1).tolist() == [3, 1, 0, 5, 1, 2]  # row 2 is missing: no valid token
    assert torch.equal(out.pooled[2], torch.zeros(4))
    with torch.no_grad():
        direct = enc(enc.preprocessor(TEXTS))
    assert torch.allclose(out.pooled, direct.pooled, atol=1e-6)
    assert torch.allclose(out.tokens * out.mask[..., None], direct.tokens * direct.mask[..., None], atol=1e-6)
    head = nn.Linear(4, 2)  # cached features are ordinary tensors: training on them works
    head(out.pooled).sum().backward()
    assert head.weight.grad is not None


def test_pooled_only_entry_is_one_token_with_mask_present(tmp_path, enc):
    cache = FeatureCache(tmp_path)
    small, stats = cache.get_or_compute(enc, rows(), "text", "train", store_tokens=False)
    assert stats.source == "computed" and small.tokens.shape == (6, 1, 4)
    FeatureCache.clear_memory()
    full, _ = cache.get_or_compute(enc, rows(), "text", "train")
    assert torch.equal(small.mask[:, 0], full.present) and torch.equal(small.pooled, full.pooled)
    assert torch.equal(small.tokens[:, 0], small.pooled)
    assert len(list(tmp_path.iterdir())) == 2


def test_a_pooled_request_is_served_by_an_entry_with_tokens(tmp_path, enc) -> None:
    cache = FeatureCache(tmp_path, memory=False)
    full, _ = cache.get_or_compute(enc, rows(), "text", store_tokens=True)
    pooled, stats = cache.get_or_compute(enc, rows(), "text", store_tokens=False)
    assert stats.source == "disk" and pooled.tokens.shape == (6, 1, 4)
    torch.testing.assert_close(pooled.pooled, full.pooled, rtol=0, atol=0)
    assert len(list(tmp_path.iterdir())) == 1  # nothing encoded or written again


def test_corrupt_entry_is_recomputed(tmp_path, enc):
    cache = FeatureCache(tmp_path)
    first, stats = cache.get_or_compute(enc, rows(), "text", "train")
    expected = first.pooled.clone()  # the file is overwritten in place below, under first's memory map
    (cache.path(stats.key) / "shard-00000.pooled.npy").write_bytes(b"truncated")
    FeatureCache.clear_memory()
    with pytest.warns(UserWarning, match="unreadable .*encoding again"):
        again, stats2 = cache.get_or_compute(enc, rows(), "text", "train")
    assert stats2.source == "computed" and torch.equal(again.pooled, expected)


def test_transform_applies_before_preprocessing(tmp_path, enc):
    cache = FeatureCache(tmp_path)
    upper, _ = cache.get_or_compute(enc, rows(), "text", "train", transform=lambda s: s + " extra")
    assert upper.mask.sum(1).tolist() == [4, 2, 0, 6, 2, 3]


def test_bad_item_names_row_and_column(tmp_path, enc):
    ds = datasets.Dataset.from_dict({"text": ["ok", "fine", "also ok"]})
    with pytest.raises(DataError, match=r"split 'validation', row 11, column 'text'.*text item 0 is a int"):
        FeatureCache(tmp_path).get_or_compute(enc, ds, "text", "validation", batch_size=2,
                                              transform=lambda s: 7 if s == "also ok" else s, row_ids=[9, 10, 11])


class ReadAheadProbe(WordEncoder):
    """WordEncoder whose preprocessor logs each batch it reads; encoding batch k waits until batch k+1 is read."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[int] = []  # batch sizes, in the order they were preprocessed
        self.reads_seen_by_encode: list[int] = []
        self.next_read = threading.Condition()
        inner = self.preprocessor

        def logged(items):  # type: ignore[no-untyped-def]
            out = inner(items)
            with self.next_read:
                self.read.append(len(items))
                self.next_read.notify_all()
            return out

        self.preprocessor = type("Logged", (), {"__call__": staticmethod(logged), "to_dict": inner.to_dict})()

    def encode(self, batch):  # type: ignore[override]
        k = self.calls  # this is batch k (0-based); 3 batches of 2 rows in the test
        with self.next_read:
            assert self.next_read.wait_for(lambda: len(self.read) >= min(k + 2, 3), timeout=30), \
                f"batch {k + 1} was not read while batch {k} was encoded"
            self.reads_seen_by_encode.append(len(self.read))
        return super().encode(batch)


def test_the_next_batch_is_read_while_one_is_encoded_and_no_further(tmp_path, monkeypatch) -> None:
    """Decoding and preprocessing overlap the encoder, one batch ahead at most (bounded memory), rows in order."""
    monkeypatch.setattr(cache_module, "read_ahead", lambda device: True)
    texts = ["a", "b c", "d e f", "g", "h i", "j k l m"]  # 6 distinct cells: 3 batches of 2
    enc = ReadAheadProbe().set_finetune("frozen")
    out, _ = FeatureCache(tmp_path).get_or_compute(enc, rows(texts), "text", "train", batch_size=2)
    assert enc.read == [2, 2, 2] and enc.calls == 3
    assert enc.reads_seen_by_encode == [2, 3, 3]  # one ahead while batches 0 and 1 are encoded, never two
    with torch.no_grad():
        direct = WordEncoder()(WordPreprocessor()(texts))
    torch.testing.assert_close(out.pooled, direct.pooled, rtol=0, atol=1e-6)


def test_without_read_ahead_batches_are_read_one_at_a_time(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cache_module, "read_ahead", lambda device: False)
    enc = ReadAheadProbe().set_finetune("frozen")
    enc.next_read.wait_for = lambda predicate, timeout: True  # type: ignore[method-assign]  # (nothing to wait for)
    FeatureCache(tmp_path).get_or_compute(enc, rows(["a", "b c", "d e f", "g"]), "text", "train", batch_size=2)
    assert enc.reads_seen_by_encode == [1, 2]  # batch k is encoded before batch k+1 is read


def test_read_ahead_only_when_a_core_is_free(monkeypatch) -> None:
    """A reader thread beside torch's threads on a full CPU slows the encoder (measured); a free core or an
    accelerator pays for it."""
    monkeypatch.setattr(cache_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cache_module.torch, "get_num_threads", lambda: 2)
    assert not cache_module.read_ahead(torch.device("cpu"))
    assert cache_module.read_ahead(torch.device("cuda", 0))
    monkeypatch.setattr(cache_module.torch, "get_num_threads", lambda: 1)
    assert cache_module.read_ahead(torch.device("cpu"))


class CountingEncoder(WordEncoder):
    """WordEncoder that records how many items it was asked to encode."""

    seen = 0

    def encode(self, batch):  # type: ignore[override]
        CountingEncoder.seen += int(batch["ids"].shape[0])
        return super().encode(batch)


def test_identical_cells_are_encoded_once_and_laid_out_per_row(tmp_path) -> None:
    enc = CountingEncoder().set_finetune("frozen")
    texts = ["a cat", "a dog", "a cat", None, "a dog", "a cat"]
    CountingEncoder.seen = 0
    out, stats = FeatureCache(tmp_path, memory=False).get_or_compute(enc, rows(texts), "text", batch_size=2)
    assert CountingEncoder.seen == 2  # two distinct texts
    assert stats.source == "computed" and out.batch_size == 6
    reference, _ = FeatureCache(tmp_path / "ref", memory=False).get_or_compute(
        WordEncoder().set_finetune("frozen"), rows(["a cat", "a dog"]), "text")
    for row, want in ((0, 0), (2, 0), (5, 0), (1, 1), (4, 1)):
        torch.testing.assert_close(out.pooled[row], reference.pooled[want], rtol=0, atol=0)
    assert out.present.tolist() == [True, True, True, False, True, True]
    assert float(out.pooled[3].abs().sum()) == 0.0



def test_frozen_image_encoders_are_encoded_folded_and_the_key_says_so(tmp_path) -> None:
    from encoders import create_encoder

    torch.manual_seed(0)
    enc = create_encoder("tiny-image")
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(4)]
    ds = datasets.Dataset.from_dict({"image": pictures}, features=datasets.Features({"image": datasets.Image()}))
    folded_cache, plain_cache = FeatureCache(tmp_path / "a", memory=False), FeatureCache(tmp_path / "b", memory=False,
                                                                                          fold=False)
    assert folded_cache.key_parts(enc, ds, "image", "train", False)["inference"] == "bnfold-cl"
    assert plain_cache.key_parts(enc, ds, "image", "train", False)["inference"] == "plain"
    assert folded_cache.key(enc, ds, "image") != plain_cache.key(enc, ds, "image")
    folded, _ = folded_cache.get_or_compute(enc, ds, "image", store_tokens=False)
    plain, _ = plain_cache.get_or_compute(enc, ds, "image", store_tokens=False)
    torch.testing.assert_close(folded.pooled, plain.pooled, rtol=0, atol=1e-4)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in enc.modules()) == 13  # the encoder itself is left as it was


@pytest.mark.parametrize("fold", [True, False])
def test_cpu_image_batches_run_in_cache_sized_chunks_with_the_same_features(tmp_path, monkeypatch, fold) -> None:
    """Both paths split a CPU image batch into chunks of CHUNK_PIXELS // (H * W) images; the features equal the
    encoder run on the whole batch at once."""
    from PIL import Image

    import recipes.chunks as chunks
    from encoders import create_encoder

    torch.manual_seed(0)
    enc = create_encoder("tiny-image").eval()  # 32 x 32 inputs
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(7)]
    ds = datasets.Dataset.from_dict({"image": pictures}, features=datasets.Features({"image": datasets.Image()}))
    monkeypatch.setattr(chunks, "CHUNK_PIXELS", 3 * 32 * 32)  # 3 images per chunk
    sizes: list[int] = []  # batch size of every encoder call (folding first checks its copy on 2-image examples)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: sizes.append(int(args[0]["pixel_values"].shape[0])) if isinstance(m, Encoder) else None)
    try:
        out, _ = FeatureCache(tmp_path, memory=False, fold=fold).get_or_compute(enc, ds, "image", batch_size=7)
    finally:
        hook.remove()
    assert sizes[-3:] == [3, 3, 1] and 7 not in sizes  # the encoding calls come last
    with torch.no_grad():
        whole = enc(enc.preprocessor(pictures))
    torch.testing.assert_close(out.pooled, whole.pooled, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.tokens, whole.tokens, rtol=0, atol=1e-4)


def test_a_miss_builds_the_encoders_graph_on_its_first_chunk_and_checks_each_chunk_size(tmp_path,
                                                                                      monkeypatch) -> None:
    from PIL import Image

    import recipes.chunks as chunks
    from encoders import create_encoder
    from zoo.graph import GraphEncode

    torch.manual_seed(0)
    enc = create_encoder("tiny-image", finetune="frozen").eval()
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(7)]
    ds = datasets.Dataset.from_dict({"image": pictures}, features=datasets.Features({"image": datasets.Image()}))
    monkeypatch.setattr(chunks, "CHUNK_PIXELS", 3 * 32 * 32)  # chunks of 3, 3 and 1 images
    calls: list[str] = []
    build, eager = GraphEncode._build, GraphEncode._eager
    monkeypatch.setattr(GraphEncode, "_build", lambda self, x: calls.append("build") or build(self, x))
    monkeypatch.setattr(GraphEncode, "_eager",
                        lambda self, b: calls.append(f"eager{b['pixel_values'].shape[0]}") or eager(self, b))
    cache = FeatureCache(tmp_path, memory=False, graph=True)
    assert cache.key_parts(enc, ds, "image", "train", False)["inference"] == "bnfold-cl-ts"
    out, _ = cache.get_or_compute(enc, ds, "image", batch_size=7)
    assert calls == ["build", "eager3", "eager1"]  # chunk 2 ran the graph alone; sizes 3 and 1 were checked once
    with torch.no_grad():
        whole = enc(enc.preprocessor(pictures))
    torch.testing.assert_close(out.pooled, whole.pooled, rtol=0, atol=1e-4)
