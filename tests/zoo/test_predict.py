"""zoo.predict: raw inputs of any subset of modalities -> labels with probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fusion_errors import InputError
from zoo import predict


@pytest.mark.parametrize("subset", [("text",), ("image", "audio"), ("audio", "image", "text")])
def test_predict_subsets(make_model, raw, subset: tuple[str, ...]) -> None:
    rows = predict(make_model(), **{m: raw[m] for m in subset})
    assert len(rows) == 3
    for row in rows:
        assert row["label"] in ("a", "b", "c")
        assert set(row["probs"]) == {"a", "b", "c"}
        assert abs(sum(row["probs"].values()) - 1.0) < 1e-5
        assert row["label"] == max(row["probs"], key=row["probs"].get)


def test_predict_matches_forward_and_batches(make_model, raw) -> None:
    model = make_model(stage="early")
    with torch.no_grad():
        want = model(model.preprocess(**raw)).logits.softmax(-1)
    rows = predict(model, **raw, batch_size=2)
    got = torch.tensor([[r["probs"][k] for k in ("a", "b", "c")] for r in rows])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_single_items_files_and_missing(make_model, raw, tmp_path: Path) -> None:
    img_path, wav_path = tmp_path / "x.png", tmp_path / "x.wav"
    raw["image"][0].save(img_path)
    sf.write(wav_path, np.stack([raw["audio"][0][0]] * 2, axis=1), 16000)  # stereo file -> mono
    model = make_model()
    one = predict(model, text="hello", image=str(img_path), audio=str(wav_path))
    assert len(one) == 1 and "label" in one[0]
    arr = predict(model, image=np.asarray(raw["image"][0]), audio=raw["audio"][0][0])
    assert len(arr) == 1
    mixed = predict(model, text=["x", None], audio=[None, raw["audio"][1]])
    assert len(mixed) == 2


def test_files_reach_the_model_as_training_reads_them(make_model, raw, tmp_path: Path) -> None:
    """predict(image=path) sees the pixels the feature cache saw for that path: a transparent PNG is composited
    on white and a sideways-stored photo is turned upright (it used to drop the alpha and keep the hidden RGB)."""
    from PIL import Image

    from encoders._image_io import load_image

    pixels = np.asarray(raw["image"][0].convert("RGB"))
    rgba = Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 0, np.uint8)]), "RGBA")  # invisible
    rgba.save(tmp_path / "clear.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    raw["image"][1].save(tmp_path / "sideways.png", exif=exif.tobytes())
    model = make_model(modalities=("image",))
    got = predict(model, image=[str(tmp_path / "clear.png"), tmp_path / "sideways.png"])
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    upright = Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(raw["image"][1].convert("RGB")), k=-1)))
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # what training reads
    assert got == predict(model, image=[white, upright])


def test_errors(make_model, raw) -> None:
    model = make_model(modalities=("image", "text"))
    with pytest.raises(InputError, match="every modality is missing"):
        predict(model)
    with pytest.raises(InputError, match="sample 1 has every modality missing"):
        predict(model, text=["x", None], image=[raw["image"][0], None])
    with pytest.raises(InputError, match=r"takes \['image', 'text'\], not \['audio'\]"):
        predict(model, audio=raw["audio"])
    with pytest.raises(InputError, match="different numbers of samples"):
        predict(model, text=["a", "b"], image=raw["image"])
    with pytest.raises(InputError, match="does not exist"):
        predict(model, image="/no/such/file.png")


def test_nan_output_names_the_sample(make_model, raw) -> None:
    model = make_model()
    with torch.no_grad():
        model.classifier.bias[0] = float("nan")
    with pytest.raises(InputError, match=r"NaN/inf for sample 0 \(inputs .*'one'"):
        predict(model, **raw)


def test_explain_gates_and_routing(make_model, raw) -> None:
    rows = predict(make_model(fusion_head="gating"), **raw)
    gates = rows[0]["explain"]["gates"]
    assert set(gates) == {"audio", "image", "text"} and abs(sum(gates.values()) - 1) < 1e-5
    rows = predict(make_model(fusion_head="moe"), **raw)
    assert "routing_probs" in rows[0]["explain"]
    concat = predict(make_model(fusion_head="concat"), **raw)[0]["explain"]
    assert set(concat) == {"contribution", "share"}  # no weights of its own, leave-one-out only
    assert "explain" not in predict(make_model(fusion_head="concat"), explain=False, **raw)[0]


def test_contribution_is_the_leave_one_out_probability_change(make_model, raw) -> None:
    model = make_model(stage="hybrid", fusion_head="gating")
    rows = predict(model, **raw)
    with torch.no_grad():
        full = model(model.preprocess(**raw)).logits.softmax(-1)  # [3, C]
        without_text = model(model.preprocess(audio=raw["audio"], image=raw["image"])).logits.softmax(-1)
    for i, row in enumerate(rows):
        top = int(full[i].argmax())
        assert row["explain"]["contribution"]["text"] == pytest.approx(float(full[i, top] - without_text[i, top]),
                                                                       abs=1e-5)
        assert sum(row["explain"]["share"].values()) == pytest.approx(1.0, abs=1e-6)
        mix = row["explain"]["mix"]
        assert set(mix) == {"fused", "audio", "image", "text"} and sum(mix.values()) == pytest.approx(1.0, abs=1e-5)


def test_multilabel_and_regression(make_model, raw) -> None:
    rows = predict(make_model(task="multilabel"), **raw)
    assert all(set(r["labels"]) <= {"a", "b", "c"} and len(r["probs"]) == 3 for r in rows)
    assert all(r["labels"] == [k for k, p in r["probs"].items() if p > 0.5] for r in rows)
    rows = predict(make_model(task="regression"), **raw)
    assert all(set(r["values"]) == {"a", "b", "c"} for r in rows)


@pytest.mark.slow
def test_predict_folds_frozen_image_encoder_with_same_outputs() -> None:
    """predict() runs efficientnet-lite0 BatchNorm-folded by default: same probabilities within 1e-4; the copy is
    cached, rebuilt when encoder weights change, and never enters the state dict."""
    import numpy as np
    from PIL import Image

    from zoo.config import FusionModelConfig
    from zoo.fold import count_batchnorms
    from zoo.model import FusionModel

    torch.manual_seed(0)
    model = FusionModel(FusionModelConfig(encoders={"image": "efficientnet-lite0"}, labels=("a", "b"),
                                          hidden_dim=16)).eval()
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8))
              for i in range(3)]
    folded, plain = model.predict(image=images), model.predict(image=images, fold=False)
    for f, p in zip(folded, plain, strict=True):
        assert f["probs"] == pytest.approx(p["probs"], abs=1e-4)
    runner, tags = model.inference_runner()
    assert tags == {"image": "bnfold-cl"} and count_batchnorms(runner.encoders["image"]) == 0
    assert count_batchnorms(model.encoders["image"]) > 0  # the loaded model itself is untouched
    assert model.inference_runner()[0] is runner
    with torch.no_grad():
        next(model.encoders["image"].parameters()).mul_(1.01)
    assert model.inference_runner()[0] is not runner
    assert not any("inference" in k for k in model.state_dict())
