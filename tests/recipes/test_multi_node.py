"""Two "nodes" of one process each (Lightning DDP, gloo on 127.0.0.1, launched by hand as on two machines) share
one feature cache folder: each distinct input is encoded by exactly one process, and the fit's metrics match a
one-process run within seed noise."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import nn

from encoders import Encoder, ModalityOutput, Preprocessor
from fusion_errors import DataError, InputError
from recipes.cache import FeatureCache

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["red", "blue", "green", "black"]
ROWS = 600


def _table(folder: Path) -> Path:
    """Unique texts whose first word is the label, and a unique 8 x 8 image per row."""
    from PIL import Image

    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "image", "label"])
        for i in range(ROWS):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
            writer.writerow([f"{WORDS[i % 4]} thing {i}", f"img/{i}.png", WORDS[i % 4]])
    return folder / "table.csv"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _args(table: Path, cache: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "recipes.cli", "fit", "--data.data_files", str(table), "--data.cache_dir", str(cache),
            "--model.encoders", "{text: tiny-text, image: pixels}", "--model.hidden_dim", "32",
            "--trainer.max_epochs", "3", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false", "--seed_everything", "0"]


def _entries(cache: Path) -> list[dict]:
    return [json.loads((e / "meta.json").read_text()) for e in sorted(cache.glob("*.features"))]


def test_two_nodes_encode_each_input_once_and_match_one_process(tmp_path: Path) -> None:
    table = _table(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run(_args(table, tmp_path / "cache1", tmp_path / "one"), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=400)
    assert one.returncode == 0, one.stderr[-3000:]

    port, procs = _port(), []
    for node in (0, 1):  # what each machine runs: the same command, its own NODE_RANK
        node_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node),
                    "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
        args = [*_args(table, tmp_path / "shared-cache", tmp_path / "two"), "--trainer.num_nodes", "2",
                "--trainer.devices", "1", "--trainer.strategy", "ddp"]
        procs.append(subprocess.Popen(args, cwd=tmp_path, env=node_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]

    entries = _entries(tmp_path / "shared-cache")
    assert len(entries) == len(_entries(tmp_path / "cache1")) == 6  # 3 splits x 2 modalities
    for meta in entries:
        encoded = meta["encoded_by_process"]
        assert len(encoded) == 2 and sum(encoded) == meta["distinct"]  # each distinct input exactly once
        assert max(encoded) / meta["distinct"] <= 0.55  # the work is split
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())["test"]["fused"]["accuracy"]
    double = json.loads((tmp_path / "two" / "metrics.json").read_text())["test"]["fused"]["accuracy"]
    p, n = (single + double) / 2, ROWS // 10
    assert abs(single - double) <= 3 * (2 * p * (1 - p) / n) ** 0.5 + 1e-9, (single, double)


def test_two_nodes_stream_a_table_with_equal_batches_and_match_one_process(tmp_path: Path) -> None:
    """``--data.streaming`` under DDP: each process reads its own rows and gets as many batches as the other (a
    process with one more batch would wait forever at the gradient exchange, and the timeout would fail this)."""
    table = _table(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    stream = ["--data.streaming", "true", "--data.batch_size", "32"]
    one = subprocess.run([*_args(table, tmp_path / "c1", tmp_path / "one"), *stream], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=400)
    assert one.returncode == 0, one.stderr[-3000:]
    port, procs = _port(), []
    for node in (0, 1):
        node_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node),
                    "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
        args = [*_args(table, tmp_path / "c2", tmp_path / "two"), *stream, "--trainer.num_nodes", "2",
                "--trainer.devices", "1", "--trainer.strategy", "ddp"]
        procs.append(subprocess.Popen(args, cwd=tmp_path, env=node_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert not list((tmp_path / "c2").glob("*.features"))  # nothing is cached while streaming
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())["test"]["fused"]
    double = json.loads((tmp_path / "two" / "metrics.json").read_text())["test"]["fused"]
    p, n = (single["accuracy"] + double["accuracy"]) / 2, single["n"]
    assert abs(single["accuracy"] - double["accuracy"]) <= 3 * (2 * p * (1 - p) / n) ** 0.5 + 1e-9, (single, double)


# the shared encode inside one process group, without Lightning -------------------------------------------------
class _Chars(Preprocessor):
    modality = "text"

    def __call__(self, items):
        codes = torch.tensor([[float(sum(map(ord, x))) % 97, float(len(x))] for x in items])  # [B, 2]
        if any(x == "bad" for x in items):
            raise InputError("this cell is bad")
        return {"codes": codes, "present": torch.ones(len(items), dtype=torch.bool)}


class _CharEncoder(Encoder):
    modality = "text"

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.embed_dim, self.preprocessor, self.spec = nn.Linear(2, 3), 3, _Chars(), {"name": "chars"}
        torch.nn.init.constant_(self.lin.weight, 0.5)
        self.seen: list[float] = []

    def encode(self, batch):
        self.seen += batch["codes"][:, 0].tolist()
        pooled = self.lin(batch["codes"])  # [B, 3]
        return ModalityOutput(pooled[:, None], torch.ones(len(pooled), 1, dtype=torch.bool), pooled)


def _group_member(rank: int, folder: str, texts: list[str]) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    encoder = _CharEncoder()
    try:
        out, stats = FeatureCache(Path(folder) / "cache").get_or_compute(
            encoder, datasets.Dataset.from_dict({"text": texts}), "text", store_tokens=False, batch_size=4,
            shared=True)
        torch.save({"pooled": out.pooled.clone(), "seen": encoder.seen, "source": stats.source},
                   f"{folder}/rank-{rank}.pt")
    except DataError as e:
        Path(f"{folder}/rank-{rank}.error").write_text(str(e))
    finally:
        dist.destroy_process_group()


def _run_group(folder: Path, texts: list[str]) -> None:
    """Two forked processes (spawn would import this test file by a module name pytest made up)."""
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_group_member, args=(r, str(folder), texts)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]


def test_a_process_group_encodes_each_distinct_input_once_into_one_entry(tmp_path: Path) -> None:
    texts = [f"text {i % 37}" for i in range(100)]  # 37 distinct cells
    _run_group(tmp_path, texts)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in (0, 1)]
    seen = sorted(ranks[0]["seen"] + ranks[1]["seen"])
    alone, _ = FeatureCache(tmp_path / "alone", memory=False).get_or_compute(
        _CharEncoder(), datasets.Dataset.from_dict({"text": texts}), "text", store_tokens=False, batch_size=4)
    assert len(seen) == 37 and min(len(r["seen"]) for r in ranks) >= 18  # once each, split evenly
    assert all(torch.allclose(r["pooled"], alone.pooled, atol=1e-6) for r in ranks)
    meta = _entries(tmp_path / "cache")
    assert len(meta) == 1 and meta[0]["encoded_by_process"] in ([19, 18], [20, 17])


def test_a_bad_cell_in_one_process_stops_both_with_its_message(tmp_path: Path) -> None:
    texts = [f"text {i}" for i in range(40)] + ["bad"]  # the bad cell falls in process 1's block
    _run_group(tmp_path, texts)
    errors = [(tmp_path / f"rank-{r}.error").read_text() for r in (0, 1)]
    assert "row 40" in errors[1] and "this cell is bad" in errors[1]
    assert "process 1" in errors[0] and "this cell is bad" in errors[0]
    assert not list((tmp_path / "cache").glob("*.features")) and not list((tmp_path / "cache").glob(".*.tmp"))
