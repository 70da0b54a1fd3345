"""Streaming splits (recipes/streaming.py): carving, order, shards, bad rows, resume, and a fit that streams."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fusion_errors import DataError
from recipes.data import FusionDataModule
from recipes.formats import load_stream
from recipes.streaming import StreamBatches, StreamLoader, carve_codes, carved_count, stream_splits
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

from .test_data import write_table

LABELS = ("a", "b", "c")
N = 60


def _rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"text": f"row {i} word{i % 7}", "image": f"img/{i % 5}.png", "label": LABELS[i % 3]}
            for i in range(start, start + n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    write_table(root / "train.csv", _rows(N))
    write_table(root / "validation.csv", _rows(9, start=N))
    write_table(root / "test.csv", _rows(9, start=N + 9))
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = FusionModelConfig(encoders={"text": "tiny-text", "image": "pixels"}, labels=LABELS, hidden_dim=16)
    return FusionModel(cfg).eval()


def make(folder, **kwargs):
    options = {"data_dir": str(folder), "batch_size": 8, "cache_features": False, "streaming": True}
    return FusionDataModule(**{**options, **kwargs})


def positions(loader):
    return [int(i) for batch in loader for i in batch["index"]]


def test_carve_is_seeded_close_to_the_fractions_and_counts_exactly():
    pos = np.arange(20_000)
    codes = carve_codes(pos, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert np.array_equal(codes, carve_codes(pos, seed=3, val_fraction=0.1, test_fraction=0.2))
    assert not np.array_equal(codes, carve_codes(pos, seed=4, val_fraction=0.1, test_fraction=0.2))
    assert abs((codes == 1).mean() - 0.1) < 0.01 and abs((codes == 2).mean() - 0.2) < 0.01
    for code in (0, 1, 2):
        assert carved_count(20_000, code, 3, 0.1, 0.2) == int((codes == code).sum())
    # a longer table keeps every earlier row's split
    assert np.array_equal(carve_codes(np.arange(25_000), 3, 0.1, 0.2)[:20_000], codes)


def test_load_stream_reads_tables_lazily_and_counts_rows_where_the_source_says(folder, tmp_path):
    streamed, base, name = load_stream("x", None, None, str(folder))
    assert set(streamed) == {"train", "validation", "test"} and base == folder and name is None
    rows, total = streamed["train"]
    assert total is None and len(list(rows)) == N  # a CSV does not state its length
    pd.DataFrame(_rows(N)).to_parquet(tmp_path / "t.parquet")
    streamed, _, _ = load_stream("x", str(tmp_path / "t.parquet"), None, None)
    assert streamed["train"][1] == N  # Parquet footers do
    streamed, _, name = load_stream("tridigits", None, None, None)
    assert name == "tridigits" and all(n is not None and n > 0 for _, n in streamed.values())


def test_every_training_row_once_per_epoch_in_a_seeded_order(folder, model):
    dm = make(folder).attach(model)
    assert dm.labels == list(LABELS) and dm.train_size is None
    loader = dm.train_dataloader()
    assert isinstance(loader, StreamLoader)
    first = positions(loader)
    assert sorted(first) == list(range(N))
    again = positions(make(folder).attach(model).train_dataloader())
    assert again == first  # the order depends on (seed, epoch) only
    loader.sampler.set_epoch(1)
    second = positions(loader)
    assert sorted(second) == list(range(N)) and second != first
    batch = next(iter(dm.val_dataloader()))
    assert set(batch["inputs"]) == {"text", "image"} and batch["labels"].dtype == torch.long


def test_carved_splits_are_disjoint_and_cover_the_training_split(folder, model):
    dm = make(folder, data_dir=None, data_files=str(folder / "train.csv"), val_fraction=0.2,
              test_fraction=0.2).attach(model)
    seen = {role: positions(getattr(dm, f"{role}_dataloader")()) for role in ("train", "val", "test")}
    assert sorted(seen["train"] + seen["val"] + seen["test"]) == list(range(N))
    assert seen["val"] and seen["test"]
    codes = carve_codes(np.arange(N), 0, 0.2, 0.2)
    assert sorted(seen["val"]) == np.flatnonzero(codes == 1).tolist()


def test_parquet_length_is_known_so_the_loader_has_one(folder, model, tmp_path):
    rows = [{**r, "image": str(folder / r["image"])} for r in _rows(N)]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(rows[:10]).to_parquet(tmp_path / "validation.parquet")
    dm = make(folder, data_dir=None, data_files={"train": str(tmp_path / "train.parquet"),
                                                "validation": str(tmp_path / "validation.parquet"),
                                                "test": str(tmp_path / "validation.parquet")}).attach(model)
    loader = dm.train_dataloader()
    assert dm.train_size == N and len(loader) == len(list(loader)) == -(-N // 8)


def test_processes_get_disjoint_rows_and_the_same_number_of_batches(folder, model):
    dm = make(folder).attach(model)
    part = dm._stream["train"]
    encoder_args = dict(preprocessors={m: model.encoders[m].preprocessor for m in model.modalities},
                        columns={"text": "text", "image": "image"}, label_column="label", base=folder,
                        batch_size=7, shuffle=True, buffer=16, seed=0)
    from recipes._columns import LabelEncoder

    enc = LabelEncoder(list(LABELS), "multiclass", None)
    world = 4  # 60 rows over 4 processes: 15 each
    per_rank = [positions(StreamBatches(part, encoder=enc, rank=r, world=world, **encoder_args))
                for r in range(world)]
    assert all(len(p) == N // world for p in per_rank)
    assert sorted(i for p in per_rank for i in p) == list(range(N))
    odd = [positions(StreamBatches(part, encoder=enc, rank=r, world=7, **encoder_args)) for r in range(7)]
    assert {len(p) for p in odd} == {N // 7}  # the last incomplete round (60 = 8 x 7 + 4) is dropped


def test_loader_workers_split_the_rows(folder, model):
    dm = make(folder, num_workers=2).attach(model)
    assert sorted(positions(dm.train_dataloader())) == list(range(N))


def test_bad_rows_raise_naming_the_row_or_are_left_out_and_counted(folder, model, tmp_path):
    rows = _rows(12)
    rows[5]["label"] = "zebra"
    rows[8]["image"] = "img/missing.png"
    write_table(tmp_path / "train.csv", rows)
    for split in ("validation", "test"):
        write_table(tmp_path / f"{split}.csv", _rows(3))
    (tmp_path / "img").symlink_to(folder / "img")
    dm = make(tmp_path, labels=list(LABELS)).attach(model)
    with pytest.raises(DataError, match=r"row 5: column 'label'.*zebra.*on_bad_rows skip"):
        list(dm.train_dataloader())
    dm = make(tmp_path, labels=list(LABELS), on_bad_rows="skip").attach(model)
    loader = dm.train_dataloader()
    assert sorted(positions(loader)) == [i for i in range(12) if i not in (5, 8)]
    assert loader.bad_rows == 2


def test_a_resumed_epoch_goes_on_where_it_stopped(folder, model):
    whole = positions(make(folder).attach(model).train_dataloader())
    loader = make(folder, num_workers=0).attach(model).train_dataloader()
    it = iter(loader)
    done = [int(i) for _ in range(3) for i in next(it)["index"]]
    assert done == whole[:24]
    state = loader.state_dict()
    assert state["batches"] == 2  # a loader of unknown length is read one batch ahead by the loop
    resumed = make(folder).attach(model).train_dataloader()
    resumed.load_state_dict(state)
    assert positions(resumed) == whole[16:]
    assert positions(resumed) == whole  # the skip applies to the resumed epoch only
    resumed.load_state_dict(resumed.state_dict())  # saved after the epoch ran out: the next one starts whole
    assert resumed.state_dict()["finished"]
    again = positions(resumed)
    assert sorted(again) == list(range(N)) and again != whole and resumed.sampler.epoch == 1


def test_streaming_refuses_balanced_class_weights_in_one_line(folder, model):
    dm = make(folder).attach(model)
    with pytest.raises(DataError, match="give the weights"):
        dm.train_labels()


def test_stream_splits_without_fractions_or_splits_says_how_to_fix():
    import datasets

    rows = datasets.Dataset.from_dict({"label": ["a"]}).to_iterable_dataset()
    with pytest.raises(DataError, match="val_fraction"):
        stream_splits({"train": rows}, {"train": 1}, None, 0.0, 0.0, 0)


def test_fit_streams_a_table_end_to_end(folder, tmp_path):
    from recipes.cli import main

    code = main(["fit", "--data.data_dir", str(folder), "--data.streaming", "true", "--data.batch_size", "16",
                 "--model.encoders={text: tiny-text, image: pixels}", "--model.hidden_dim", "16",
                 "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path / "run")])
    assert code in (0, None)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.json").is_file()


KILLING_FIT = """
import os, signal, sys
import pytorch_lightning as pl
from recipes import cli, fit_cli

class Kill(pl.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)

class KillingCLI(fit_cli.FusionCLI):
    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(Kill())
        return trainer

if os.environ.get("KILL_AT"):
    fit_cli.FusionCLI = KillingCLI
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kind", ["csv", "parquet"])  # length unknown (read ahead) / known from the footers
def test_a_streamed_fit_killed_mid_epoch_resumes_exactly(folder, tmp_path, kind):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if kind == "parquet":
        data = tmp_path / "data"
        data.mkdir()
        (data / "img").symlink_to(folder / "img")
        for split in ("train", "validation", "test"):
            pd.read_csv(folder / f"{split}.csv").to_parquet(data / f"{split}.parquet")
        folder = data
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    args = ["fit", "--data.data_dir", str(folder), "--data.streaming", "true", "--data.batch_size", "8",
            "--data.shuffle_buffer", "16", "--model.encoders={text: tiny-text, image: pixels}",
            "--model.hidden_dim", "16", "--model.dropout", "0.2", "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", "2",
            "--seed_everything", "0"]

    def fit(run: str, *extra: str, kill: int | None = None) -> subprocess.CompletedProcess:
        e = {**env, "KILL_AT": str(kill)} if kill is not None else env
        return subprocess.run([sys.executable, "-c", KILLING_FIT, *args, "--trainer.default_root_dir",
                               str(tmp_path / run), *extra], cwd=tmp_path, env=e, capture_output=True, text=True,
                              timeout=300)

    ref = fit("ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = fit("crash", kill=11)  # 60 rows / 8 = 8 steps an epoch: step 11 is mid-epoch 1, after step 10's save
    assert killed.returncode < 0, killed.stderr[-2000:]
    last = tmp_path / "crash" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 10
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 2
    resumed = fit("crash", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 16
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())["test"]["fused"]["accuracy"]
    assert json.loads((tmp_path / "crash" / "metrics.json").read_text())["test"]["fused"]["accuracy"] == want


def test_embedded_audio_and_images_reach_the_preprocessors_undecoded(tmp_path):
    """A Parquet/hub split with datasets.Audio/Image columns: datasets would decode audio with torchcodec (not
    installed) as the stream is read; the cells go to the preprocessors as {bytes, path} instead."""
    import datasets
    import soundfile as sf

    for i in range(6):
        sf.write(tmp_path / f"{i}.wav", 0.1 * np.sin(np.arange(1600) * (i + 1) / 50), 16000)
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    ds = datasets.Dataset.from_dict({"audio": [str(tmp_path / f"{i}.wav") for i in range(6)],
                                     "image": [str(tmp_path / f"{i}.png") for i in range(6)],
                                     "label": ["lo", "hi"] * 3})
    ds = ds.cast_column("audio", datasets.Audio()).cast_column("image", datasets.Image())
    for split in ("train", "validation", "test"):
        ds.to_parquet(str(tmp_path / f"{split}.parquet"))  # the files' bytes are embedded
    cfg = FusionModelConfig(encoders={"audio": {"name": "mel-cnn", "finetune": "frozen"}, "image": "pixels"},
                            labels=("hi", "lo"), hidden_dim=8)
    dm = FusionDataModule(data_dir=str(tmp_path), streaming=True, batch_size=4).attach(FusionModel(cfg).eval())
    batches = list(dm.train_dataloader())
    assert sum(len(b["index"]) for b in batches) == 6
    assert batches[0]["inputs"]["audio"]["present"].all() and batches[0]["inputs"]["image"]["present"].all()


@pytest.mark.parametrize("streaming", [True, False])
def test_uncached_frozen_encoders_still_standardise_from_a_training_sample(folder, streaming):
    """The standardisation was fitted on cached features only: a streamed (or cache_features=False) fit left it
    unfitted (docs/benchmarks.md). Frozen encoders not served from the cache are now encoded on a training sample."""
    torch.manual_seed(0)
    cfg = FusionModelConfig(encoders={"text": "tiny-text", "image": "pixels"}, labels=LABELS, hidden_dim=16,
                            standardize=True)
    model = FusionModel(cfg)
    dm = make(folder, streaming=streaming).attach(model)
    feats = dm.train_features()
    assert set(feats) == {"text", "image"} and all(f.pooled.shape[0] == N for f in feats.values())
    rows = sorted(_rows(N), key=lambda r: r["text"])  # the sample's order is seeded; compare as sets of vectors
    with torch.no_grad():
        model.eval()
        want = model.encoders["text"](model.encoders["text"].preprocessor([r["text"] for r in rows])).pooled
    got = feats["text"].pooled
    assert torch.allclose(torch.sort(got.sum(1)).values, torch.sort(want.sum(1)).values, atol=1e-5)
    assert model.fit_feature_norm(feats) == ["image", "text"]
