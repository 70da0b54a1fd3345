"""Bad inputs at every public entry point raise the project's own errors (docs/errors.md lists each row).

No user mistake may surface as a raw torch/PIL/tokenizer traceback, and no NaN may slip silently into a
prediction or a loss.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import encoders
from encoders import ModalityOutput
from encoders._audio_io import load_audio
from encoders._image_io import load_image
from fusion_errors import FusionZooError, InputError
from fusion_heads import create_fusion_head, list_fusion_heads
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

HYPO = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def text_pre() -> Any:
    return encoders.create_encoder("tiny-text").preprocessor


@pytest.fixture(scope="module")
def image_pre() -> Any:
    return encoders.create_encoder("tiny-image").preprocessor


@pytest.fixture(scope="module")
def audio_pre() -> Any:
    return encoders.create_encoder("mel-cnn").preprocessor


@pytest.fixture(scope="module")
def model() -> FusionModel:
    cfg = FusionModelConfig(encoders={"audio": "mel-cnn", "image": "tiny-image", "text": "tiny-text"},
                            labels=("a", "b"), hidden_dim=16, stage="early")
    return FusionModel(cfg).eval()


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# text ----------------------------------------------------------------------------------------------
TEXT_ERRORS: dict[str, tuple[Any, str]] = {
    "empty": ([""], "item 0 is empty"),
    "whitespace": (["ok", " \t\n"], "item 1 is empty"),
    "bytes": ([b"\xff\xfe"], "item 0 is a bytes"),
    "int": ([7], "item 0 is a int"),
    "lone_surrogate": (["a\ud800b"], "not valid Unicode"),
    "single_string": ("a sentence", "single string"),
    "batch_none": (None, "text batch is a NoneType"),
    "empty_batch": ([], "text batch is empty"),
}


@pytest.mark.parametrize("case", sorted(TEXT_ERRORS))
def test_text_preprocessor_rejects(text_pre: Any, case: str) -> None:
    items, match = TEXT_ERRORS[case]
    with pytest.raises(InputError, match=match):
        text_pre(items)


def test_text_huge_is_bounded_and_none_is_missing(text_pre: Any) -> None:
    batch = text_pre(["word " * 200_000, None])
    assert batch["input_ids"].shape == (2, text_pre.max_windows * text_pre.max_length)  # every window used
    assert batch["attention_mask"][0].all() and batch["attention_mask"][1].sum() == 2  # [CLS] [SEP] placeholder
    assert batch["present"].tolist() == [True, False]


@HYPO
@given(st.lists(st.one_of(st.none(), st.text(st.characters(codec=None), max_size=40)), min_size=1, max_size=4))
def test_text_arbitrary_unicode_gives_batch_or_input_error(text_pre: Any, items: list[str | None]) -> None:
    try:
        batch = text_pre(items)
    except InputError:
        return
    assert batch["input_ids"].shape[0] == len(items)


# image ---------------------------------------------------------------------------------------------
def test_image_odd_but_valid_inputs(image_pre: Any, tmp_path: Path) -> None:
    deep = Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16))
    rgba, palette = Image.new("RGBA", (5, 5), (0, 0, 0, 0)), Image.new("P", (5, 5))
    cmyk, one = Image.new("CMYK", (5, 5)), Image.new("RGB", (1, 1), (9, 9, 9))
    jpg = tmp_path / "x.jpg"
    jpg.write_bytes(_png(Image.new("RGB", (9, 9)), "JPEG"))
    batch = image_pre([deep, rgba, palette, cmyk, one, str(jpg), _png(deep)])
    assert batch["pixel_values"].shape == (7, 3, 32, 32) and torch.isfinite(batch["pixel_values"]).all()


def _image_error_cases(tmp_path: Path) -> dict[str, tuple[Any, str]]:
    png = _png(Image.new("RGB", (64, 64), (200, 10, 10)))
    jpeg = _png(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG")
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "cut.jpg").write_bytes(jpeg[:30])
    return {
        "zero_size": (Image.new("RGB", (0, 0)), "zero size"),
        "zero_array": (np.zeros((0, 4, 3), np.uint8), "empty"),
        "corrupt_bytes": (b"\x89PNG\r\n\x1a\n garbage", "corrupt"),
        "truncated_png": (str(tmp_path / "cut.png"), "cut.png"),
        "truncated_jpeg": (str(tmp_path / "cut.jpg"), "cut.jpg"),
        "missing_path": (str(tmp_path / "nope.png"), "does not exist"),
        "wrong_type": (3.5, "unsupported image type"),
        "nan_array": (np.full((4, 4), np.nan, np.float32), "NaN"),
        "object_array": (np.array([[None]]), "dtype object"),
        "five_dims": (np.zeros((1, 2, 4, 4, 3), np.uint8), "not an image"),
    }


@pytest.mark.parametrize("case", ["zero_size", "zero_array", "corrupt_bytes", "truncated_png", "truncated_jpeg",
                                  "missing_path", "wrong_type", "nan_array", "object_array", "five_dims"])
def test_image_preprocessor_rejects(image_pre: Any, tmp_path: Path, case: str) -> None:
    item, match = _image_error_cases(tmp_path)[case]
    with pytest.raises(InputError, match=match):
        image_pre([None, item])


def test_image_batch_must_be_a_list(image_pre: Any) -> None:
    with pytest.raises(InputError, match="image batch is a NoneType"):
        image_pre(None)
    with pytest.raises(InputError, match="wrap a single image"):
        image_pre(Image.new("RGB", (4, 4)))


@HYPO
@given(st.binary(max_size=300))
def test_image_arbitrary_bytes_give_image_or_input_error(data: bytes) -> None:
    try:
        img = load_image(data)
    except InputError:
        return
    assert img.mode == "RGB"


# audio ---------------------------------------------------------------------------------------------
def test_audio_odd_but_valid_inputs(audio_pre: Any, tmp_path: Path) -> None:
    stereo = np.stack([np.linspace(-0.5, 0.5, 1600), np.zeros(1600)], axis=1).astype(np.float32)
    long_clip = np.zeros(16000 * 30, np.float32)  # 30 s: cropped to max_seconds
    batch = audio_pre([np.zeros(1600, np.float32), stereo, np.full(800, 1000, np.int16), long_clip,
                       (np.zeros(800, np.float32), 8000), _wav(np.zeros(1600, np.float32))])
    assert batch["waveform"].shape == (6, round(audio_pre.max_seconds * 16000))
    assert batch["lengths"][3] == round(audio_pre.max_seconds * 16000)
    assert torch.isfinite(batch["waveform"]).all() and batch["waveform"].abs().max() <= 1.0


def _audio_error_cases(tmp_path: Path) -> dict[str, tuple[Any, str]]:
    wav = _wav(np.sin(np.linspace(0, 100, 16000)).astype(np.float32))
    (tmp_path / "cut.wav").write_bytes(wav[:30])
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (tmp_path / "empty.wav").write_bytes(b"")
    return {
        "corrupt_file": (str(tmp_path / "bad.wav"), "bad.wav"),
        "truncated_file": (str(tmp_path / "cut.wav"), "cut.wav"),
        "empty_file": (str(tmp_path / "empty.wav"), "empty"),
        "missing_path": (str(tmp_path / "nope.wav"), "does not exist"),
        "nan": (np.array([0.1, np.nan], np.float32), "NaN or inf"),
        "inf": (np.array([0.1, np.inf], np.float32), "NaN or inf"),
        "no_samples": (np.zeros(0, np.float32), "no samples"),
        "overflowing_amplitude": (np.full(100, 1e30, np.float32), "far outside"),
        "zero_rate": ((np.zeros(100, np.float32), 0), "outside the supported"),
        "negative_rate": ((np.zeros(100, np.float32), -8000), "outside the supported"),
        "wrong_type": (object(), "unsupported audio type"),
        "string_array": (np.array(["a", "b"]), "dtype <U1"),
        "three_dims": (np.zeros((2, 2, 2), np.float32), "must be"),
    }


@pytest.mark.parametrize("case", ["corrupt_file", "truncated_file", "empty_file", "missing_path", "nan", "inf",
                                  "no_samples", "overflowing_amplitude", "zero_rate", "negative_rate", "wrong_type",
                                  "string_array", "three_dims"])
def test_audio_preprocessor_rejects(audio_pre: Any, tmp_path: Path, case: str) -> None:
    item, match = _audio_error_cases(tmp_path)[case]
    with pytest.raises(InputError, match=match):
        audio_pre([None, item])


def test_audio_wrong_rate_without_resampling() -> None:
    with pytest.raises(InputError, match=r"8000 Hz differs.*allow_resample=True"):
        load_audio((np.zeros(800, np.float32), 8000), 16000, allow_resample=False)


def test_audio_batch_must_be_a_list(audio_pre: Any) -> None:
    with pytest.raises(InputError, match="audio batch is a NoneType"):
        audio_pre(None)


def test_silent_audio_encodes_to_finite_features() -> None:
    enc = encoders.create_encoder("mel-cnn")
    out = enc(enc.preprocessor([np.zeros(16000, np.float32), None]))
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.tokens).all()


@HYPO
@given(st.binary(max_size=300))
def test_audio_arbitrary_bytes_give_waveform_or_input_error(data: bytes) -> None:
    try:
        wav, _ = load_audio(data, 16000)
    except InputError:
        return
    assert torch.isfinite(wav).all()


# FusionModel.forward / fuse ------------------------------------------------------------------------
def _feats(b: int = 2, t: int = 3, d: int = 32, dtype: torch.dtype = torch.float32,
           mask_dtype: torch.dtype = torch.bool) -> ModalityOutput:
    return ModalityOutput(torch.ones(b, t, d).to(dtype), torch.ones(b, t).to(mask_dtype), torch.ones(b, d).to(dtype))


FUSE_ERRORS: dict[str, tuple[Callable[[], Any], str]] = {
    "all_missing": (lambda: {}, "every modality is missing"),
    "unknown_modality": (lambda: {"smell": _feats()}, "smell"),
    "wrong_width": (lambda: {"text": _feats(d=7)}, "width 7"),
    "mask_not_bool": (lambda: {"text": _feats(mask_dtype=torch.float32)}, "mask must be bool"),
    "tokens_2d": (lambda: {"text": ModalityOutput(torch.ones(2, 32), torch.ones(2, 3, dtype=torch.bool),
                                                  torch.ones(2, 32))}, r"expected tokens \[B,T,D\]"),
    "batch_mismatch": (lambda: {"text": _feats(b=2), "image": _feats(b=3, d=256)}, "batch sizes disagree"),
    "integer_features": (lambda: {"text": _feats(dtype=torch.long)}, "torch.int64"),
    "float64_features": (lambda: {"text": _feats(dtype=torch.float64)}, "torch.float64"),
    "not_modality_output": (lambda: {"text": torch.ones(2, 32)}, "ModalityOutput"),
}


@pytest.mark.parametrize("case", sorted(FUSE_ERRORS))
def test_fuse_rejects(model: FusionModel, case: str) -> None:
    make, match = FUSE_ERRORS[case]
    with pytest.raises(InputError, match=match):
        model.fuse(make())


FORWARD_ERRORS: dict[str, tuple[Any, str]] = {
    "not_a_mapping": (torch.zeros(3), "batch is a Tensor"),
    "missing_tensor_key": ({"text": {"ids": torch.zeros(2, 3)}}, r"'text' encoder .*KeyError"),
    "float_token_ids": ({"text": {"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3),
                                  "present": torch.ones(2, dtype=torch.bool)}}, "cannot run on inputs"),
    "image_without_channels": ({"image": {"pixel_values": torch.zeros(2, 32, 32),
                                          "present": torch.ones(2, dtype=torch.bool)}}, r"\(2, 32, 32\)"),
    "raw_list_instead_of_tensors": ({"text": ["a", "b"]}, "model.preprocess"),
}


@pytest.mark.parametrize("case", sorted(FORWARD_ERRORS))
def test_forward_rejects(model: FusionModel, case: str) -> None:
    batch, match = FORWARD_ERRORS[case]
    with pytest.raises(InputError, match=match):
        model(batch)


# predict -------------------------------------------------------------------------------------------
PREDICT_ERRORS: dict[str, tuple[dict[str, Any], str]] = {
    "nothing": ({}, "every modality is missing"),
    "row_all_missing": ({"text": ["a", None], "image": [np.zeros((4, 4, 3), np.uint8), None]}, "sample 1"),
    "mismatched_counts": ({"text": ["a", "b"], "image": [np.zeros((4, 4, 3), np.uint8)]}, "different numbers"),
    "unknown_kwarg": ({"video": ["x.mp4"]}, "not \\['video'\\]"),
    "nan_image_array": ({"image": np.full((4, 4, 3), np.nan, np.float32)}, "NaN"),
    "non_string_text": ({"text": [3]}, "text item 0"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_ERRORS))
def test_predict_rejects(model: FusionModel, case: str) -> None:
    raw, match = PREDICT_ERRORS[case]
    with pytest.raises(InputError, match=match):
        model.predict(**raw)


def test_predict_never_returns_nan(model: FusionModel) -> None:
    broken = FusionModel(model.config).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.classifier.bias.fill_(float("nan"))
    with pytest.raises(InputError, match="NaN/inf for sample 0"):
        broken.predict(text=["hello"])
    rows = model.predict(text=["hello", "world"])
    assert all(np.isfinite(list(r["probs"].values())).all() for r in rows)


# fusion heads with arbitrary tensor shapes ---------------------------------------------------------
@HYPO
@given(name=st.sampled_from(sorted(list_fusion_heads())), b=st.integers(1, 3), t=st.integers(1, 4),
       d=st.sampled_from([4, 8, 5]), b2=st.integers(1, 3), mask_kind=st.sampled_from(["bool", "float", "short"]))
def test_heads_give_output_or_input_error(name: str, b: int, t: int, d: int, b2: int, mask_kind: str) -> None:
    head = create_fusion_head(name, {"image": 8, "text": 8}, 8)
    mask = torch.ones(b, t, dtype=torch.bool) if mask_kind == "bool" else torch.ones(b, t if mask_kind else 1)
    if mask_kind == "short":
        mask = torch.ones(b, max(1, t - 1), dtype=torch.bool)
    inputs = {"text": ModalityOutput(torch.randn(b, t, d), mask, torch.randn(b, d)),
              "image": ModalityOutput(torch.randn(b2, 2, 8), torch.ones(b2, 2, dtype=torch.bool), torch.randn(b2, 8))}
    try:
        out = head(inputs)
    except InputError:
        assert d != 8 or b != b2 or mask_kind != "bool"
        return
    except FusionZooError as e:  # pragma: no cover - any other project error is a wrong category here
        pytest.fail(f"{name}: {type(e).__name__}: {e}")
    assert out.fused.shape == (b, 8) and torch.isfinite(out.fused).all()


# the fusion-zoo command --------------------------------------------------------------------------
@pytest.fixture()
def toy_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., int]:
    """``cli.main`` with the reliability toy data module (tests/reliability/toy_fit.py) in ``tmp_path``."""
    import importlib.util

    from recipes import cli

    spec = importlib.util.spec_from_file_location("reliability_toy_cli", Path(__file__).with_name("toy_fit.py"))
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    real = cli._lightning
    monkeypatch.setattr(cli, "_lightning", lambda argv: real(
        [argv[0], *toy.TOY_ARGS, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path),
         *argv[1:]], datamodule_class=toy.ToyRawData))
    return cli.main


def test_cli_unknown_head_is_one_line_exit_2(toy_cli: Callable[..., int], capsys: pytest.CaptureFixture) -> None:
    assert toy_cli(["fit", "--model.fusion_head", "telepathy"]) == 2
    err = capsys.readouterr().err
    assert "RegistryError" in err and "telepathy" in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "needle"), [
    (["--model.hiden_dim", "8"], "hiden_dim"),
    (["--model.hidden_dim", "wide"], "hidden_dim"),
    (["--config", "no_such_recipe.yaml"], "no_such_recipe.yaml"),
])
def test_cli_bad_flags_and_config_files_exit_2(toy_cli: Callable[..., int], capsys: pytest.CaptureFixture,
                                               args: list[str], needle: str) -> None:
    try:  # a misspelt flag is caught before parsing (one line, returns 2); the others exit from jsonargparse
        code = toy_cli(["fit", *args])
    except SystemExit as info:
        code = info.code
    assert code == 2
    assert needle in capsys.readouterr().err


def test_nan_predictions_in_evaluation_stop_with_a_clear_error() -> None:
    from recipes.task import FusionTask

    task = FusionTask(encoders={"image": "tiny-image", "text": "tiny-text"}, labels=["a", "b"], hidden_dim=16)
    with torch.no_grad():
        task.model.classifier.bias.fill_(float("nan"))
    batch = {"inputs": task.model.preprocess(text=["hi", "yo"]), "labels": torch.tensor([0, 1]),
             "index": torch.tensor([4, 5])}
    with pytest.raises(FusionZooError, match=r"NaN/inf predictions in validation batch \(indices \[4, 5\]"):
        task.validation_step(batch, 0)
