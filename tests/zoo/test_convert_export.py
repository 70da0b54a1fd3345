"""Lightning .ckpt <-> model folder conversion, and ONNX / TorchScript export matching eager."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusion_errors import CheckpointError
from zoo.convert import convert, convert_checkpoint
from zoo.export import export, sidecar_path, verify_export
from zoo.hub import from_pretrained, save_pretrained


def test_ckpt_folder_ckpt_round_trip(make_model, raw, tmp_path: Path) -> None:
    from recipes.task import FusionTask

    model = make_model(stage="hybrid", finetune={"text": "full"})
    ckpt = {"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
            "hyper_parameters": {"config": model.config.to_dict(), "lr": 1e-3}}
    torch.save(ckpt, tmp_path / "best.ckpt")
    folder = convert_checkpoint(tmp_path / "best.ckpt", tmp_path / "folder")
    loaded = from_pretrained(folder)
    with torch.no_grad():
        want = model(model.preprocess(**raw)).logits
        torch.testing.assert_close(loaded(loaded.preprocess(**raw)).logits, want, rtol=0, atol=0)
    back = convert(folder, tmp_path / "again.ckpt")
    task = FusionTask.from_checkpoint(back)
    for k, v in model.state_dict().items():
        assert torch.equal(task.model.state_dict()[k], v), k
    again = torch.load(back, weights_only=True)
    assert again["hyper_parameters"]["config"] == model.config.to_dict()


def test_convert_errors(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not written by.*FusionTask"):
        convert_checkpoint(tmp_path / "other.ckpt", tmp_path / "out")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable Lightning checkpoint"):
        convert(tmp_path / "junk.ckpt", tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "missing.ckpt", tmp_path / "out")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_eager(make_model, raw, tmp_path: Path, fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="verifying ONNX needs onnxruntime")
    model = make_model(fusion_head="gating")
    out = export(model, tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'pt'}", format=fmt, example=raw)
    assert verify_export(model, out, example=raw) <= 1e-4
    other = {"text": ["a much longer sentence", "b", "c"], "image": raw["image"][::-1], "audio": raw["audio"]}
    assert verify_export(model, out, example=other) <= 1e-4  # new values, same shapes
    side = json.loads(sidecar_path(out).read_text())
    assert [i["name"] for i in side["inputs"]][:2] == ["audio.present", "audio.waveform"]
    assert side["preprocessing"]["text"] == {"max_len": 8}


def test_export_by_folder_and_bad_format(make_model, tmp_path: Path) -> None:
    folder = save_pretrained(make_model(modalities=("text",)), tmp_path / "ck")
    out = export(folder, tmp_path / "m.pt", format="torchscript", example={"text": ["hi", "there"]})
    assert verify_export(folder, out, example={"text": ["yo", "ho"]}) <= 1e-4
    with pytest.raises(Exception, match="format='tflite' is not one of"):
        export(folder, tmp_path / "m.tfl", format="tflite")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize(("stage", "head"), [("early", "cross_attention"), ("late", "concat"), ("hybrid", "moe")])
def test_export_runs_at_other_batch_and_clip_length(tmp_path: Path, fmt: str, stage: str, head: str) -> None:
    """Traced on 2 one-second clips, run on 3 clips of 2.5 s: dynamic batch and length, real-valued STFT."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="verifying ONNX needs onnxruntime")
    from zoo.config import FusionModelConfig
    from zoo.export import default_example, verify_example
    from zoo.model import FusionModel

    torch.manual_seed(0)
    cfg = FusionModelConfig(encoders={"audio": {"name": "mel-cnn", "options": {"channels": [4, 8], "embed_dim": 16,
                                                                               "num_layers": 1, "num_heads": 2}},
                                      "text": "zoo-fake-text"},
                            labels=("a", "b", "c"), stage=stage, fusion_head=head, hidden_dim=8, fuse_tokens=True)
    model = FusionModel(cfg).eval()
    out = export(model, tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'pt'}", format=fmt)
    traced, other = default_example(model), verify_example(model)
    assert len(other["audio"]) != len(traced["audio"]) and len(other["audio"][0][0]) > 2 * len(traced["audio"][0][0])
    assert verify_export(model, out) <= 1e-4  # verify_example by default
    side = json.loads(sidecar_path(out).read_text())
    axes = {i["name"]: i["dynamic_axes"] for i in side["inputs"]}
    assert axes["audio.waveform"] == {"0": "batch", "1": "audio_samples"}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_whisper_context_follows_the_clip_length_in_export(tmp_path: Path, fmt: str) -> None:
    """Whisper's context (frames of the longest clip + 1), positions and key mask stay dynamic in the exported graph:
    traced on 1 s clips (51 frames), run on 2.5 s clips (126 frames). A context frozen at 51 frames would drop
    the later frames and change the pooled vector."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="verifying ONNX needs onnxruntime")
    from zoo.config import FusionModelConfig
    from zoo.export import verify_example
    from zoo.model import FusionModel

    torch.manual_seed(0)
    cfg = FusionModelConfig(encoders={"audio": {"name": "tiny-whisper", "options": {"max_seconds": 3.0}},
                                      "text": "zoo-fake-text"},
                            labels=("a", "b", "c"), stage="late", fusion_head="gating", hidden_dim=8)
    model = FusionModel(cfg).eval()
    out = export(model, tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'pt'}", format=fmt)
    other = verify_example(model)
    frames = model.encoders["audio"](model.preprocess(audio=other["audio"])["audio"]).tokens.shape[1]
    assert frames == 126  # 2.5 s: 125 frames + 1
    assert verify_export(model, out) <= 1e-4


def test_fastpath_is_restored_after_export(make_model, raw, tmp_path: Path) -> None:
    from zoo.export import fastpath_disabled

    before = torch.backends.mha.get_fastpath_enabled()
    with fastpath_disabled():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == before


# Every shipped model, each exported in one format, alternating ONNX / TorchScript down the sorted list, and
# tridigits-late-moe (data-dependent expert routing) in both: see the test's docstring.
SHIPPED_NAMES = ["tridigits-early-concat", "tridigits-early-cross-attention", "tridigits-hybrid-concat",
                 "tridigits-hybrid-gating", "tridigits-late-average", "tridigits-late-concat",
                 "tridigits-late-cross-attention", "tridigits-late-gating", "tridigits-late-moe"]
BOTH_FORMATS = "tridigits-late-moe"
SHIPPED_EXPORTS = [(n, ("onnx", "torchscript")[i % 2]) for i, n in enumerate(SHIPPED_NAMES)]
SHIPPED_EXPORTS.append((BOTH_FORMATS, "torchscript" if dict(SHIPPED_EXPORTS)[BOTH_FORMATS] == "onnx" else "onnx"))


def _frozen_encoders(name: str) -> dict[str, tuple[object, ...]]:
    """What decides a shipped model's encoder graph: name, options, fine-tuning, weights hash per modality."""
    from zoo.registry import info

    return {m: (r["name"], json.dumps(r.get("options"), sort_keys=True), r["finetune"], r.get("weights_sha256"))
            for m, r in info(name)["encoders"].items()}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "fmt"), SHIPPED_EXPORTS, ids=[f"{n}-{f}" for n, f in SHIPPED_EXPORTS])
def test_every_shipped_model_exports_and_runs_at_other_shapes(name: str, fmt: str, tmp_path: Path) -> None:
    """Each shipped model's full graph exported and checked at batch 3 and 2.5 s clips / longer texts (traced:
    batch 2, 1 s clips) against the eager model as loaded (so the BatchNorm folding is covered too).

    All shipped models share the same three frozen encoders (asserted here), which hold nearly all of the export's
    cost, so each model is exported in one format, alternating ONNX / TorchScript (both formats run the shared
    encoders several times and each head's graph once), and tridigits-late-moe in both formats. A model whose
    encoders differ from tridigits-late-moe's fails here: give it both formats (add it to SHIPPED_EXPORTS twice).
    """
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="verifying ONNX needs onnxruntime")
    from zoo.registry import list_pretrained

    assert name in list_pretrained()
    assert sorted(SHIPPED_NAMES) == list_pretrained("tridigits-*")  # every shipped model is covered
    in_both = [n for n, _ in SHIPPED_EXPORTS].count(name) == 2
    assert in_both or _frozen_encoders(name) == _frozen_encoders(BOTH_FORMATS), name
    model = from_pretrained(name)
    out = export(model, tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'pt'}", format=fmt)
    assert verify_export(model, out, format=fmt) <= 1e-4, (name, fmt)
    if fmt == "onnx":
        assert out.stat().st_size > 10_000_000  # the weights are in the graph (not a 430 KB failure dump)
