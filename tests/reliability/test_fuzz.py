"""Issue 14 (8): fuzzing. Hypothesis-generated ``config.json`` files and CSV tables (random keys, types, sizes,
nesting and paths) must end in success or one of the project's own errors: never another exception type, never
a read of a file outside the checkpoint folder, never more than a set memory budget.

Bounded for CI: a fixed number of derandomized examples each (well under 2 minutes together on 2 CPU cores).
Memory: Python/numpy allocations are traced (tracemalloc) and tensors are bounded by the loader's parameter
limit (``max_parameters``), which refuses a model before it is built.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_errors import FusionZooError
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MEMORY_BUDGET = 150 * 2**20  # traced Python/numpy bytes per example
MAX_PARAMETERS = 3_000_000  # ~12 MB of float32 weights per example

CANARY = Path(tempfile.mkdtemp(prefix="fusion-zoo-canary-"))  # a folder no checkpoint may read
(CANARY / "secret.json").write_text('{"model": {}}')
(CANARY / "config.json").write_text('{"model_type": "bert"}')
_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        path = args[0].decode(errors="replace") if isinstance(args[0], bytes) else str(args[0])
        if str(CANARY) in path or "fusion-zoo-canary-" in path:
            _OPENED.append(path)


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only records canary reads

PATHS = [str(CANARY), str(CANARY / "secret.json"), "../" + CANARY.name, f"../../{CANARY.name}/config.json", "~",
         "~/x", "/etc/passwd", "/dev/zero", "./", "..", "model.safetensors", "config.json", "a/../../b", "\x00x"]
NAMES = ["tiny-text", "tiny-image", "mel-cnn", "hf-text", "minilm-l6", "timm-image", "pixels", "nope", "concat",
         "gating", "attention", "early", "late", "hybrid", "frozen", "full", "lora", "last_n", "reference",
         "multiclass", "regression", "multilabel", "embedding", "logits"]
LEAVES = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.sampled_from([0, 1, -1, 8, 30000, 10**9])
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12) | st.sampled_from(PATHS + NAMES))
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8) | st.sampled_from(["name", "options", "model_name", "checkpoint_path", "hidden_size"]),
    inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = FusionModelConfig(encoders={"text": "tiny-text", "image": "tiny-image"}, labels=("a", "b"), hidden_dim=8)
    return FusionModel(cfg).save_pretrained(tmp_path_factory.mktemp("fuzz") / "base")


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    return out


def _set(doc: dict, path: tuple, value: Any) -> None:
    node = doc
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def _check(fn: Any) -> None:
    """Run ``fn``: success or a FusionZooError, no canary read, traced memory under the budget."""
    _OPENED.clear()
    tracemalloc.start()
    try:
        fn()
    except FusionZooError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert not _OPENED, f"read outside the checkpoint folder: {_OPENED}"
    assert peak < MEMORY_BUDGET, f"traced peak {peak / 2**20:.0f} MiB"


@FUZZ
@given(data=st.data())
def test_fuzzed_config_json_loads_or_fails_cleanly(base: Path, data: st.DataObject) -> None:
    doc = json.loads((base / "config.json").read_text())
    keys = _paths(doc)[1:]
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        if data.draw(st.booleans(), label="existing key"):
            path = data.draw(st.sampled_from(keys), label="path")
        else:
            path = (*data.draw(st.sampled_from(keys), label="under"), data.draw(st.text(max_size=6), label="new"))
        _set(doc, path, copy.deepcopy(data.draw(JSON, label="value")))
    if data.draw(st.booleans(), label="drop a key"):
        path = data.draw(st.sampled_from(_paths(doc)[1:]), label="dropped")
        node = doc
        for key in path[:-1]:
            node = node[key] if isinstance(node, dict) and isinstance(node.get(key), dict) else {}
        node.pop(path[-1], None)
    folder = Path(tempfile.mkdtemp(dir=base.parent))
    try:
        shutil.copy(base / "model.safetensors", folder)
        (folder / "config.json").write_text(json.dumps(doc, default=str))
        _check(lambda: FusionModel.from_pretrained(folder, max_parameters=MAX_PARAMETERS))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


CELLS = (st.text(max_size=30) | st.sampled_from(["", " ", "\x00", "\u200b", "x" * 400, "1", "1.0", "nan", "-1",
                                                 "a,b", '"', "\n", *PATHS]) | st.integers(-5, 5).map(str))


@FUZZ
@given(rows=st.lists(st.tuples(CELLS, CELLS, CELLS), min_size=0, max_size=12),
       header=st.sampled_from([["text", "label", "image"], ["text", "label", "extra"], ["label", "text", "text"],
                               ["a", "b", "c"]]))
def test_fuzzed_csv_tables_train_or_fail_cleanly(tmp_path: Path, rows: list, header: list) -> None:
    from recipes.data import FusionDataModule

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    table = folder / "data.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)

    def run() -> None:
        dm = FusionDataModule(data_files=str(table), cache_features=False, batch_size=4, val_fraction=0.25,
                              test_fraction=0.25)
        modalities = {m: enc for m, enc in (("text", "tiny-text"), ("image", "tiny-image")) if m in header}
        cfg = FusionModelConfig(encoders=modalities or {"text": "tiny-text"}, labels=tuple(dm.labels),
                                hidden_dim=8)
        dm.attach(FusionModel(cfg))
        dm.setup("fit")
        for batch in dm.train_dataloader():
            assert batch["labels"].shape[0] == batch["index"].shape[0]

    _check(run)


def test_the_checker_catches_a_canary_read_and_a_foreign_exception() -> None:
    with pytest.raises(AssertionError, match="read outside the checkpoint folder"):
        _check(lambda: (CANARY / "secret.json").open().close())
    with pytest.raises(TypeError):
        _check(lambda: FusionModelConfig(encoders={"text": "tiny-text"}, labels=("a", "b"), hidden_dim=None > 1))


# Issue 30 (1, 3, 4): sizes and label lists. Every numeric option a registered component takes, and the config's
# own sizes, get huge, negative, fractional, non-finite or non-numeric values; label lists get long, duplicated and
# mistyped. Loading must end in a project error (or load), without a hang or a big allocation.
SIZE_PATHS = [("model", "hidden_dim"), ("model", "trunk_layers"),
              *[("model", "encoders", "text", "options", k)
                for k in ("hidden_size", "num_layers", "num_heads", "max_length", "max_windows")],
              ("model", "encoders", "image", "options", "image_size")]
HEAD_OPTIONS = {"concat": ["hidden_dim", "dropout"], "gating": ["hidden_dim", "floor", "per_unit", "dropout"],
                "moe": ["num_experts", "top_k", "expert_dim", "capacity_factor"], "low_rank": ["rank"],
                "tensor": ["proj_dim", "hidden_dim"], "bottleneck": ["num_bottlenecks", "layers", "d_model"],
                "cross_attention": ["layers", "num_heads", "d_model"]}
SIZES = (st.integers(-(2**63), 2**63) | st.sampled_from([0, 1, -1, 2, 64, 65, 1024, 1025, 16384, 16385, 10**5, 10**9])
         | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.none() | st.text(max_size=5)
         | st.lists(st.integers(-3, 10**6), max_size=3)
         | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
LABEL_ITEMS = (st.text(max_size=8) | st.integers() | st.none() | st.booleans() | st.floats(allow_nan=True)
               | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)
               | st.just("x" * 5000))
LABELS = (st.lists(LABEL_ITEMS, max_size=6)
          | st.sampled_from([0, 1, 2, 3, 1000, 300_000, 1_000_001]).map(lambda n: [f"c{i}" for i in range(n)])
          | st.integers(1, 5).map(lambda n: ["a", "b"] * n) | st.text(max_size=4) | st.integers() | st.none())


@FUZZ
@given(data=st.data())
def test_fuzzed_sizes_and_label_lists_in_config_json_fail_cleanly(base: Path, data: st.DataObject) -> None:
    import signal

    doc = json.loads((base / "config.json").read_text())
    head = data.draw(st.sampled_from(sorted(HEAD_OPTIONS)), label="head")
    doc["model"]["fusion_head"], doc["model"]["head_options"] = head, {}
    if head in ("cross_attention", "bottleneck"):
        doc["model"]["fuse_tokens"] = True
    paths = SIZE_PATHS + [("model", "head_options", k) for k in HEAD_OPTIONS[head]]
    for _ in range(data.draw(st.integers(0, 3), label="sizes")):
        _set(doc, data.draw(st.sampled_from(paths), label="path"), data.draw(SIZES, label="value"))
    if data.draw(st.booleans(), label="labels"):
        doc["model"]["labels"] = data.draw(LABELS, label="label list")
    folder = Path(tempfile.mkdtemp(dir=base.parent))

    def hang(*_: Any) -> None:
        raise AssertionError("loading hung (over 60 s) on a fuzzed config")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)  # a hang guard, not a speed goal: a bounded config loads or fails in about a second
    try:
        shutil.copy(base / "model.safetensors", folder)
        (folder / "config.json").write_text(json.dumps(doc, default=str))
        _check(lambda: FusionModel.from_pretrained(folder, max_parameters=MAX_PARAMETERS))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        shutil.rmtree(folder, ignore_errors=True)
