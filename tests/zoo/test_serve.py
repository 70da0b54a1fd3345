"""``fusion-zoo serve`` through HTTP against real running servers (uvicorn on a free 127.0.0.1 port).

Most tests serve a tiny fused model over fake encoders in a uvicorn thread; the expected answers come from
calling ``model.predict`` in-process on the same inputs. A slow test runs the real CLI on a shipped model in a
subprocess and stops it with SIGTERM while a request is in flight.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'fusion-zoo[serve]'")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from fusion_errors import InputError  # noqa: E402
from zoo.serve import Limits  # noqa: E402
from zoo.serve.app import ServeConfig, batch_predictor, create_app  # noqa: E402

LABELS = ["a", "b", "c"]  # tests/zoo/conftest.py builds the tiny models with these labels
MODALITIES = ["audio", "image", "text"]


# helpers -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def running(app: Any) -> Iterator[tuple[str, Any]]:
    """Serve ``app`` with uvicorn in a thread on a free port; yields (base URL, uvicorn server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def png(w: int = 12, h: int = 10, seed: int = 0) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def wav(seconds: float = 0.05, rate: int = 16000, seed: int = 0) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    x = np.random.default_rng(seed).standard_normal(int(seconds * rate)).astype(np.float32) * 0.1
    sf.write(buf, x, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def decoded(image: bytes | None = None, audio: bytes | None = None) -> dict[str, Any]:
    """The same bytes decoded independently of the server (PIL, soundfile), as predict() inputs."""
    import soundfile as sf
    from PIL import Image

    out: dict[str, Any] = {}
    if image is not None:
        out["image"] = [Image.open(io.BytesIO(image)).convert("RGB")]
    if audio is not None:
        x, rate = sf.read(io.BytesIO(audio), dtype="float32")
        out["audio"] = [(x, rate)]
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["label"] == want["label"]
    assert got["probs"] == pytest.approx(want["probs"], abs=1e-5)
    for key, value in want.get("explain", {}).items():
        assert got["explain"][key] == pytest.approx(value, abs=1e-5)


@pytest.fixture
def model(make_model: Callable[..., Any]) -> Any:
    return make_model(stage="late", fusion_head="gating")


@pytest.fixture
def server(model: Any) -> Iterator[str]:
    limits = Limits(max_request_bytes=200_000, max_image_pixels=64 * 64, max_audio_seconds=0.5, max_text_chars=50,
                    max_batch_items=4)
    with running(create_app(model, name="tiny", config=ServeConfig(limits=limits))) as (url, _):
        yield url


# endpoints -------------------------------------------------------------------------------------------
def test_uploaded_images_decode_as_training_reads_them() -> None:
    """The server's decoder agrees with the training loader: alpha composited on white, EXIF orientation."""
    from PIL import Image

    from zoo.serve.inputs import decode_image

    buf = io.BytesIO()
    Image.new("RGBA", (4, 3), (10, 20, 30, 0)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), Limits(), "body").getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated: viewers turn it 90 degrees counter-clockwise
    stored = np.arange(24, dtype=np.uint8).reshape(2, 4, 3) * 10
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG", exif=exif.tobytes())
    np.testing.assert_array_equal(np.asarray(decode_image(buf.getvalue(), Limits(), "body")), np.rot90(stored, k=1))


def test_an_uploaded_photo_reaches_the_encoder_with_the_pixels_training_decodes() -> None:
    """A big JPEG is decoded at the DCT scale the image preprocessor's resize allows, in training and when served."""
    import torch
    from PIL import Image

    from encoders._image_io import ImagePreprocessor, load_image
    from zoo.serve.inputs import decode_image

    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((1600, 1200)).save(buf, format="JPEG")
    pre = ImagePreprocessor(image_size=96)
    served = decode_image(buf.getvalue(), Limits(), "body", pre.decode_side)
    assert served.size == load_image(buf.getvalue(), min_side=pre.decode_side).size == (400, 300)
    torch.testing.assert_close(pre([served])["pixel_values"], pre([buf.getvalue()])["pixel_values"], rtol=0, atol=0)


def test_health_model_page_and_openapi(server: str) -> None:
    with httpx.Client(base_url=server) as c:
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        info = c.get("/model").json()
        assert info["labels"] == LABELS and info["modalities"] == MODALITIES
        assert (info["stage"], info["fusion_head"], info["task"]) == ("late", "gating", "multiclass")
        assert info["limits"]["max_text_chars"] == 50 and info["limits"]["max_image_pixels"] == 64 * 64

        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="predict-btn"' in page.text and "default-src 'self'" in page.headers["content-security-policy"]
        script = c.get("/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        # no CDN, no external fetch: neither file names another host
        assert not re.search(r"https?://|//cdn", page.text + script.text)

        schema = c.get("/openapi.json").json()
        assert {"/health", "/model", "/predict", "/predict/batch"} <= set(schema["paths"])
        content = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content)
        assert {"413", "422", "503", "504"} <= set(schema["paths"]["/predict"]["post"]["responses"])


def test_multipart_prediction_equals_in_process_predict(server: str, model: Any) -> None:
    image, audio = png(), wav()
    want = model.predict(text=["two two"], **decoded(image, audio))[0]
    with httpx.Client(base_url=server) as c:
        r = c.post("/predict", data={"text": "two two"},
                   files={"image": ("x.png", image, "image/png"), "audio": ("x.wav", audio, "audio/wav")})
    assert r.status_code == 200, r.text
    got = r.json()
    assert_same(got, want)
    assert got["inputs"] == MODALITIES
    assert set(got["explain"]["gates"]) == set(MODALITIES)


def test_json_base64_equals_multipart(server: str) -> None:
    image, audio = png(seed=3), wav(seed=3)
    with httpx.Client(base_url=server) as c:
        a = c.post("/predict", data={"text": "one"}, files={"image": ("i.png", image), "audio": ("a.wav", audio)})
        b = c.post("/predict", json={"text": "one", "image": "data:image/png;base64," + b64(image),
                                     "audio": b64(audio)})
    assert a.status_code == b.status_code == 200
    assert_same(b.json(), a.json())


@pytest.mark.parametrize("subset", [("text",), ("image",), ("audio",), ("audio", "text"), ("image", "text")])
def test_any_subset_of_modalities(server: str, model: Any, subset: tuple[str, ...]) -> None:
    image, audio = png(seed=1), wav(seed=1)
    kwargs = decoded(image if "image" in subset else None, audio if "audio" in subset else None)
    if "text" in subset:
        kwargs["text"] = ["three"]
    want = model.predict(**kwargs)[0]
    files = {k: (f"f.{k}", v) for k, v in (("image", image), ("audio", audio)) if k in subset}
    with httpx.Client(base_url=server) as c:
        r = c.post("/predict", data={"text": "three"} if "text" in subset else None, files=files or None)
    assert r.status_code == 200, r.text
    assert_same(r.json(), want)
    assert r.json()["inputs"] == sorted(subset)


def test_batch_endpoint_equals_single_predictions(server: str) -> None:
    items = [{"text": "one"}, {"image": b64(png(seed=5))}, {"audio": b64(wav(seed=5)), "text": "two"}]
    with httpx.Client(base_url=server) as c:
        batch = c.post("/predict/batch", json={"items": items})
        singles = [c.post("/predict", json=item).json() for item in items]
    assert batch.status_code == 200, batch.text
    preds = batch.json()["predictions"]
    assert len(preds) == 3
    for got, want in zip(preds, singles, strict=True):
        assert_same(got, want)
        assert got["inputs"] == want["inputs"]


def test_concurrent_requests_share_forward_passes_and_get_their_own_answers(model: Any) -> None:
    sizes: list[int] = []
    run = batch_predictor(model)

    def recording(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sizes.append(len(samples))
        return run(samples)

    texts = ["a", "bb", "ccc dd", "eeee", "f g h", "ij", "klm", "nopq"]
    wants = {t: model.predict(text=[t])[0] for t in texts}
    cfg = ServeConfig(max_batch_size=8, max_wait_ms=400)
    with running(create_app(model, config=cfg, predict_batch=recording)) as (url, _), httpx.Client(base_url=url) as c:
        with ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(lambda t: c.post("/predict", json={"text": t}), texts))
        health = c.get("/health").json()
    assert all(a.status_code == 200 for a in answers)
    for t, a in zip(texts, answers, strict=True):
        assert_same(a.json(), wants[t])  # each request got the row of its own sample
    assert max(sizes) > 1, f"no two requests shared a forward pass: batch sizes {sizes}"
    assert sum(sizes) == len(texts) and health["samples"] == len(texts) and health["batches"] == len(sizes)


# errors ------------------------------------------------------------------------------------------
_BAD_422: list[tuple[str, dict[str, Any], str]] = [
    ("no input", {"json": {}}, "no input"),
    ("blank text only", {"json": {"text": "   "}}, "no input"),
    ("unknown JSON key", {"json": {"video": "eA=="}}, "unknown key"),
    ("text not a string", {"json": {"text": 5}}, "must be a string"),
    ("bad base64", {"json": {"image": "not base64!"}}, "base64"),
    ("not an image", {"json": {"image": b64(b"hello, not a png")}}, "not a readable image"),
    ("not audio", {"json": {"audio": b64(b"RIFF....WAVEfmt nonsense")}}, "not a readable audio"),
    ("invalid JSON", {"content": b"{'text': 1", "headers": {"content-type": "application/json"}}, "not valid JSON"),
    ("JSON array", {"json": ["one"]}, "JSON object"),
    ("unknown form field", {"files": {"video": ("v.mp4", b"xx")}}, "unknown form field"),
    ("form field twice", {"files": [("image", ("a.png", png())), ("image", ("b.png", png()))]}, "twice"),
    ("truncated image", {"files": {"image": ("a.png", png()[:60])}}, "truncated or corrupt"),
    ("number too long", {"content": b'{"text": ' + b"9" * 5000 + b"}", "headers": {"content-type": "application/json"}},
     "number of 5000 characters"),
    ("NaN", {"content": b'{"text": NaN}', "headers": {"content-type": "application/json"}}, "NaN, which is not JSON"),
    ("not UTF-8", {"content": b'{"text": "\xff"}', "headers": {"content-type": "application/json"}}, "not UTF-8"),
    ("image an object", {"json": {"image": {"a": 1}}}, "must be a base64 string, not an object"),
    ("text a list", {"json": {"text": ["a"]}}, "the text must be a string, not a list"),
]
# what a message must never show a user: Python's object reprs, exception class names, JSON paths as code
_JARGON = re.compile(r"object at 0x|Error opening|<_io|body\.(text|image|audio)|codec can't|Traceback|NoneType")


@pytest.mark.parametrize("name,request_kwargs,needle", _BAD_422, ids=[b[0] for b in _BAD_422])
def test_unusable_inputs_answer_422_naming_the_problem(server: str, name: str, request_kwargs: dict[str, Any],
                                                       needle: str) -> None:
    with httpx.Client(base_url=server) as c:
        r = c.post("/predict", **request_kwargs)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and needle in detail, detail
    assert "\n" not in detail and not _JARGON.search(detail), detail  # one line, in plain words


def test_batch_body_errors_answer_422(server: str) -> None:
    with httpx.Client(base_url=server) as c:
        assert c.post("/predict/batch", json={"items": []}).status_code == 422
        assert c.post("/predict/batch", json=[{"text": "x"}]).status_code == 422
        r = c.post("/predict/batch", json={"items": [{"image": "%%%"}, {"text": 7}]})
    detail = r.json()["detail"]
    assert r.status_code == 422 and "the image of items[0]" in detail and "the text of items[1]" in detail


def test_batch_answers_per_item_errors_for_bad_items_and_results_for_good_ones(server: str) -> None:
    """Issue 30 (11): one bad item used to fail the whole /predict/batch."""
    with httpx.Client(base_url=server) as c:
        r = c.post("/predict/batch", json={"items": [{"text": "ok"}, {"image": "%%%"}, {"text": "two"}]})
    assert r.status_code == 200
    first, bad, third = r.json()["predictions"]
    assert "label" in first and "label" in third and "error" not in first
    assert set(bad) == {"error"} and "the image of items[1] is not valid base64" in bad["error"]


def test_a_deeply_nested_body_is_a_422_not_a_500(server: str) -> None:
    with httpx.Client(base_url=server) as c:
        for path in ("/predict", "/predict/batch"):
            r = c.post(path, content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
            assert r.status_code == 422 and "nested too deeply" in r.json()["detail"], (path, r.text[:200])


def test_a_modality_the_model_lacks_answers_422(make_model: Callable[..., Any]) -> None:
    two = make_model(modalities=("image", "text"))
    with running(create_app(two)) as (url, _), httpx.Client(base_url=url) as c:
        r = c.post("/predict", json={"text": "one", "audio": b64(wav())})
    assert r.status_code == 422
    assert "takes image, text, not audio" in r.json()["detail"]


def _chunks(total: int) -> Iterator[bytes]:
    for _ in range(total // 10_000):
        yield b"x" * 10_000


_BIG_413: list[tuple[str, dict[str, Any], str]] = [
    ("text", {"json": {"text": "x" * 51}}, "max_text_chars"),
    ("image pixels", {"files": {"image": ("big.png", png(65, 65))}}, "max_image_pixels"),
    ("audio seconds", {"files": {"audio": ("long.wav", wav(seconds=0.6))}}, "max_audio_seconds"),
    ("body (Content-Length)", {"content": b"x" * 200_001, "headers": {"content-type": "application/json"}},
     "max_request_bytes"),
    ("body (chunked)", {"content": _chunks(300_000), "headers": {"content-type": "application/json"}},
     "max_request_bytes"),
]


@pytest.mark.parametrize("name,request_kwargs,needle", _BIG_413, ids=[b[0] for b in _BIG_413])
def test_inputs_over_a_limit_answer_413_naming_it(server: str, name: str, request_kwargs: dict[str, Any],
                                                  needle: str) -> None:
    with httpx.Client(base_url=server) as c:
        r = c.post("/predict", **request_kwargs)
    assert r.status_code == 413, r.text
    assert needle in r.json()["detail"] and not _JARGON.search(r.json()["detail"])


def test_just_under_the_limits_is_accepted(server: str) -> None:
    with httpx.Client(base_url=server) as c:
        r = c.post("/predict", data={"text": "x" * 50}, files={"image": ("ok.png", png(64, 64)),
                                                               "audio": ("ok.wav", wav(seconds=0.5))})
    assert r.status_code == 200, r.text


def test_too_many_batch_items_answer_413(server: str) -> None:
    with httpx.Client(base_url=server) as c:
        r = c.post("/predict/batch", json={"items": [{"text": "x"}] * 5})
    assert r.status_code == 413 and "max_batch_items" in r.json()["detail"]


def test_other_media_types_answer_415_and_unknown_routes_404_405(server: str) -> None:
    with httpx.Client(base_url=server) as c:
        r = c.post("/predict", content=b"one", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
        r = c.post("/predict/batch", files={"image": ("a.png", png())})
        assert r.status_code == 415
        r = c.get("/nothing-here")
        assert r.status_code == 404 and "/predict" in r.json()["detail"]
        r = c.get("/predict")
        assert r.status_code == 405 and "POST" in r.headers["allow"]


def _slow(model: Any, seconds: float) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    run = batch_predictor(model)

    def slow(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        time.sleep(seconds)
        return run(samples)

    return slow


def test_full_queue_answers_503_with_retry_after(model: Any) -> None:
    cfg = ServeConfig(max_batch_size=1, max_wait_ms=0, max_queue=2, limits=Limits(max_batch_items=2))
    app = create_app(model, config=cfg, predict_batch=_slow(model, 0.3))
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda i: c.post("/predict", json={"text": f"t{i}"}), range(10)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) == {200, 503}, codes
    # one sample runs, two wait: at most 3 of 10 simultaneous requests can be held at once
    assert codes.count(503) >= 10 - 3 - 3, codes
    for a in answers:
        if a.status_code == 503:
            assert int(a.headers["retry-after"]) >= 1
            assert "queue is full" in a.json()["detail"] and "--max-queue" in a.json()["detail"]


def test_requests_waiting_to_be_read_are_part_of_the_bounded_queue(model: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 30 (11): requests waited unseen for a body-reading slot (up to the request timeout). Now a request
    that gets no slot within SLOT_WAIT_S is answered 503 + Retry-After at once, and /health keeps answering."""
    import time

    from zoo.serve import app as app_mod

    real = app_mod.decode_sample

    def slow_decode(*args: Any, **kwargs: Any) -> Any:
        time.sleep(2.5)  # a slow upload or decode holds its slot
        return real(*args, **kwargs)

    monkeypatch.setattr(app_mod, "decode_sample", slow_decode)
    cfg = ServeConfig(max_batch_size=1, max_wait_ms=0, max_queue=64, limits=Limits(max_batch_items=2))
    with running(create_app(model, config=cfg)) as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        def post(i: int) -> tuple[int, float, httpx.Response]:
            start = time.monotonic()
            r = c.post("/predict", json={"text": f"t{i}"})
            return r.status_code, time.monotonic() - start, r

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
        health = c.get("/health")
    busy = [(t, r) for code, t, r in answers if code == 503]
    assert len(busy) >= 8 - 2 - 2, [a[:2] for a in answers]  # 2 slots: most of 8 simultaneous requests are refused
    assert all(t < app_mod.SLOT_WAIT_S + 1.0 for t, _ in busy), [t for t, _ in busy]  # ... fast, not after 30 s
    assert all(r.headers["retry-after"] == "1" and "request slot" in r.json()["detail"] for _, r in busy)
    assert health.status_code == 200 and health.json()["busy_rejections"] == len(busy)


def test_overload_is_said_at_once_with_a_short_retry_after_and_health_keeps_answering(model: Any) -> None:
    """Issue 30 (11): with the default queue 200 clients waited up to 24 s and none got a 503. Now a request whose
    expected wait (work ahead x recent batch time) is over a quarter of the request timeout is refused before its
    body is read: the 503s come within 2 s of the queue filling, say Retry-After under the timeout, and /health
    answers throughout."""
    cfg = ServeConfig(max_batch_size=2, max_wait_ms=0, request_timeout_s=4.0)  # may wait 1 s: ~2 batches ahead
    with running(create_app(model, config=cfg, predict_batch=_slow(model, 0.4))) as (url, _), \
            httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=100)) as c:
        assert c.post("/predict", json={"text": "warm-up"}).status_code == 200  # the first batch time is known

        def post(i: int) -> tuple[int, float, httpx.Response]:
            start = time.monotonic()
            r = c.post("/predict", json={"text": f"t{i}"})
            return r.status_code, time.monotonic() - start, r

        with ThreadPoolExecutor(40) as pool:
            futures = [pool.submit(post, i) for i in range(40)]
            time.sleep(0.3)  # the queue is full now
            health = c.get("/health")
            answers = [f.result() for f in futures]
    codes = [code for code, _, _ in answers]
    assert set(codes) == {200, 503}, codes
    assert codes.count(503) >= 40 - 10, codes  # at most ~2 s of 0.4-s batches of 2 are let in
    busy = [(t, r) for code, t, r in answers if code == 503]
    assert max(t for t, _ in busy) < 2.0, sorted(t for t, _ in busy)  # at once, not after the 4-s timeout
    for _, r in busy:
        assert 1 <= int(r.headers["retry-after"]) <= 1  # capped at a quarter of the timeout
        assert "the server is busy" in r.json()["detail"] and "--max-queue-wait" in r.json()["detail"]
    assert health.status_code == 200 and health.json()["in_flight"] > 0
    assert all(a.json()["inputs"] == ["text"] for code, _, a in answers if code == 200)


def test_health_answers_503_while_draining_and_the_open_request_finishes(model: Any) -> None:
    """Issue 30 (11): /health refused connections while stopping. GracefulServer keeps listening while it drains:
    /health and new predictions answer 503, the open request gets its answer, then the server stops."""
    import signal

    from zoo.serve.server import GracefulServer

    app = create_app(model, predict_batch=_slow(model, 1.0))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = GracefulServer(uvicorn.Config(app, log_level="warning"), app.state.gate, drain_timeout_s=20)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=url, timeout=30) as c:
            open_request = pool.submit(c.post, "/predict", json={"text": "in flight"})
            while app.state.gate.in_flight == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            server.handle_exit(signal.SIGTERM, None)  # what the signal does (signals reach only the main thread)
            health, refused = c.get("/health"), c.post("/predict", json={"text": "late"})
            assert open_request.result().status_code == 200
        assert health.status_code == 503 and health.json()["status"] == "stopping"
        assert refused.status_code == 503 and "stopping" in refused.json()["detail"] and refused.headers["retry-after"]
        thread.join(20)
        assert not thread.is_alive() and server._captured_signals == []  # stopped, and no signal is re-raised
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def test_slow_prediction_answers_504_and_the_server_keeps_serving(model: Any) -> None:
    cfg = ServeConfig(request_timeout_s=0.2)
    with running(create_app(model, config=cfg, predict_batch=_slow(model, 1.0))) as (url, _), \
            httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/predict", json={"text": "late"})
        assert r.status_code == 504 and "timeout of 0.2 s" in r.json()["detail"]
        assert c.get("/health").status_code == 200


def test_one_bad_sample_fails_only_its_own_request(model: Any) -> None:
    run = batch_predictor(model)
    sizes: list[int] = []

    def picky(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sizes.append(len(samples))
        if any(s.get("text") == "poison" for s in samples):
            raise InputError("the text 'poison' is refused; send another text.")
        return run(samples)

    texts = ["one", "poison", "two", "three"]
    cfg = ServeConfig(max_batch_size=4, max_wait_ms=400)
    with running(create_app(model, config=cfg, predict_batch=picky)) as (url, _), httpx.Client(base_url=url) as c:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda t: c.post("/predict", json={"text": t}), texts))
    assert [a.status_code for a in answers] == [200, 422, 200, 200]
    assert "poison" in answers[1].json()["detail"]
    assert max(sizes) > 1  # the batch failed as a whole and was retried sample by sample


def test_a_server_bug_answers_500_without_a_traceback(model: Any) -> None:
    def broken(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        raise RuntimeError("boom")

    with running(create_app(model, predict_batch=broken)) as (url, _), httpx.Client(base_url=url) as c:
        r = c.post("/predict", json={"text": "x"})
    assert r.status_code == 500
    assert "RuntimeError" in r.json()["detail"] and "Traceback" not in r.text


def test_shutdown_finishes_the_request_in_flight(model: Any) -> None:
    app = create_app(model, predict_batch=_slow(model, 1.0))
    with running(app) as (url, server):
        result: dict[str, Any] = {}

        def call() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                result["r"] = c.post("/predict", json={"text": "in flight"})

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 10
        while app.state.batcher.depth == 0 and app.state.batcher.stats.batches == 0 and not result:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.should_exit = True  # what SIGTERM does
        t.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["inputs"] == ["text"]
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError), httpx.Client(base_url=url, timeout=2) as c:
            c.get("/health")  # the listener is closed: no new requests once shutdown began


def test_closing_the_batcher_runs_the_queued_samples_then_refuses_new_ones() -> None:
    import asyncio

    from zoo.serve.batching import DynamicBatcher, Overloaded

    calls: list[list[int]] = []

    def double(samples: list[int]) -> list[int]:
        calls.append(list(samples))
        time.sleep(0.1)
        return [2 * s for s in samples]

    async def scenario() -> tuple[list[list[int]], str]:
        b = DynamicBatcher(double, max_batch_size=2, max_wait_s=0.0, max_queue=10)
        b.start()
        waiting = [asyncio.ensure_future(b.submit([i])) for i in range(5)]
        await asyncio.sleep(0.02)  # the first batch runs, the rest queue
        closed = asyncio.ensure_future(asyncio.to_thread(b.close, 10.0))
        results = await asyncio.gather(*waiting)
        assert await closed
        with pytest.raises(Overloaded) as refused:
            await b.submit([9])
        return results, str(refused.value)

    results, refused = asyncio.run(scenario())
    assert results == [[0], [2], [4], [6], [8]]
    assert sorted(x for c in calls for x in c) == [0, 1, 2, 3, 4] and max(map(len, calls)) == 2
    assert "shutting down" in refused


def test_the_expected_wait_is_per_sample_and_never_less_than_the_oldest_wait() -> None:
    """What admission compares with --max-queue-wait: samples ahead x recent busy seconds per sample (weighted by
    batch size, older batches x0.8), at least the measured wait of the oldest queued sample."""
    import asyncio

    from zoo.serve.batching import DynamicBatcher

    b = DynamicBatcher(lambda xs: xs, max_batch_size=8, max_wait_s=0.0, max_queue=10)  # not started: nothing runs
    assert b.expected_wait_s(100) == 0.0  # no batch yet, no estimate
    b.stats.record(4, 2.0)
    assert b.expected_wait_s(3) == pytest.approx(3 * 0.5)
    b.stats.record(8, 1.0)  # a full, faster batch now weighs most
    assert b.stats.recent_sample_s == pytest.approx((0.8 * 2.0 + 1.0) / (0.8 * 4 + 8))

    async def queued_then_waited() -> float:
        b.enqueue([1, 2])
        await asyncio.sleep(0.6)
        return b.expected_wait_s(0)

    assert asyncio.run(queued_then_waited()) >= 0.6 > 2 * b.stats.recent_sample_s  # the measured wait wins


# the command ---------------------------------------------------------------------------------------
def test_cli_rejects_bad_options_and_unknown_models(capsys: pytest.CaptureFixture[str]) -> None:
    from recipes.cli import main  # `fusion-zoo serve` is dispatched to zoo.cli

    assert main(["serve", "--model", "tridigits-late-gating", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size 0" in capsys.readouterr().err
    assert main(["serve", "--model", "no-such-model-xyz"]) == 2
    assert "no-such-model-xyz" in capsys.readouterr().err
    assert main(["serve", "--model", "tridigits-late-gating", "--max-queue", "8", "--max-batch-items", "64"]) == 2
    assert "max_batch_items=64 > max_queue=8" in capsys.readouterr().err
    assert main(["serve", "--model", "tridigits-late-gating", "--max-queue-wait", "0"]) == 2
    assert "--max-queue-wait 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0 and "--max-wait-ms" in capsys.readouterr().out


def test_a_lower_max_queue_alone_is_a_valid_setting() -> None:
    """Issue 30 (11): --max-queue 8 with the default --max-batch-items (64) was refused; the default now follows."""
    import argparse

    from zoo.serve import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--model", "m", "--max-queue", "8"]))
    assert (cfg.max_queue, cfg.limits.max_batch_items) == (8, 8)
    assert config_from_args(parser.parse_args(["--model", "m"])).limits.max_batch_items == 64
    default = config_from_args(parser.parse_args(["--model", "m", "--timeout", "20"]))
    assert default.queue_wait_s == 5.0  # a quarter of the request timeout unless --max-queue-wait says otherwise
    assert config_from_args(parser.parse_args(["--model", "m", "--max-queue-wait", "2"])).queue_wait_s == 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_cli_serves_a_shipped_model_and_stops_gracefully_on_sigterm(tmp_path: Any) -> None:
    from recipes.build_pretrained import raw_split

    raw, labels = raw_split("test", limit=1)
    buf = io.BytesIO()
    raw["image"][0].save(buf, "PNG")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "zoo.cli", "serve", "--model", "tridigits-late-gating", "--port", str(port),
           "--threads", "1", "--max-wait-ms", "1500"]
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"the server exited: {(tmp_path / 'server.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not come up in 240 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.5)
        info = httpx.get(f"{url}/model").json()
        assert info["name"] == "tridigits-late-gating" and info["labels"] == [str(i) for i in range(10)]
        assert info["metrics"]["test"]["fused"]["accuracy"] > 0  # the card's metrics are served
        result: dict[str, Any] = {}

        def call() -> None:
            result["r"] = httpx.post(f"{url}/predict", data={"text": raw["text"][0]}, timeout=60,
                                     files={"image": ("d.png", buf.getvalue(), "image/png")})

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.5)  # the request now waits up to 1.5 s for a batch to fill
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].json()["label"] == labels[0]  # the dataset's label of this sample
        assert proc.wait(60) == 0  # a drained stop is a success
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = (tmp_path / "server.log").read_text()
    assert "Application shutdown complete" in out and "Traceback" not in out


def test_serving_folds_image_encoders_and_runs_them_as_checked_graphs() -> None:
    import copy

    import torch
    from PIL import Image

    from zoo import FusionModel
    from zoo.config import FusionModelConfig
    from zoo.fold import count_batchnorms
    from zoo.graph import GRAPH_AFTER_CALLS, GraphEncode
    from zoo.serve import optimize_for_serving

    torch.manual_seed(0)
    model = FusionModel(FusionModelConfig(encoders={"image": "tiny-image"}, labels=("a", "b"), hidden_dim=8)).eval()
    for m in model.modules():  # non-trivial statistics, so a wrong fold would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8))
              for i in range(3)]
    want = model.predict(image=images, fold=False)
    assert not isinstance(optimize_for_serving(copy.deepcopy(model)).encoders["image"].encode, GraphEncode)  # opt-in
    served = optimize_for_serving(model, graph=True)
    encoder = served.encoders["image"]
    assert count_batchnorms(encoder) == 0 and isinstance(encoder.encode, GraphEncode)
    for _ in range(GRAPH_AFTER_CALLS + 1):  # repeated requests: the graph is built, checked and used
        got = served.predict(image=images, fold=False)
    assert any(g is not None for g in encoder.encode._graphs.values())
    for g, w in zip(got, want, strict=True):
        assert g["label"] == w["label"] and g["probs"] == pytest.approx(w["probs"], abs=1e-4)
