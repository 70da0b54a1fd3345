"""Issue 30: fuzzing the server's request bodies. Hypothesis-generated bodies (JSON of any shape, depth, size and
types; raw bytes under each media type; deep nesting; numbers past Python's limits) must each get a 200 or a 4xx
whose detail is one line in plain words, never a 500; and the server keeps answering afterwards.

Bounded for CI: derandomized, a fixed number of examples each, one tiny model served for the module (a few seconds
on 2 CPU cores). Tiny limits, so the size cases cost little.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'fusion-zoo[serve]'")
httpx = pytest.importorskip("httpx")

from zoo.serve import Limits  # noqa: E402
from zoo.serve.app import ServeConfig, create_app  # noqa: E402

from .test_serve import running  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LIMITS = Limits(max_request_bytes=40_000, max_image_pixels=32 * 32, max_audio_seconds=0.2, max_text_chars=40,
                max_batch_items=4)
JARGON = re.compile(r"object at 0x|Error opening|<_io|body\.(text|image|audio)|codec can't|Traceback|NoneType")


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _wav(seconds: float) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(16000 * seconds), dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


FILES = [_b64(_png(8, 8)), _b64(_png(40, 40)), _b64(_png(8, 8)[:30]), _b64(_wav(0.05)), _b64(_wav(0.5)),
         _b64(b"not a file"), "data:image/png;base64," + _b64(_png(4, 4)), "%%%", "", "   ", "AAAA", "A"]
LEAVES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=60)
          | st.sampled_from(FILES) | st.sampled_from([10**400, -(10**40), 1e308, 0.0]))
KEYS = st.sampled_from(["text", "image", "audio", "items"]) | st.text(max_size=6)
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=4),
                    max_leaves=16)
SAMPLE = st.fixed_dictionaries({}, optional={"text": LEAVES, "image": LEAVES, "audio": LEAVES})


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    import torch

    from zoo.config import FusionModelConfig
    from zoo.model import FusionModel

    torch.manual_seed(0)
    encoders = {m: {"name": f"zoo-fake-{m}"} for m in ("audio", "image", "text")}  # tests/zoo/conftest.py
    model = FusionModel(FusionModelConfig(encoders=encoders, labels=("a", "b", "c"), hidden_dim=8,
                                          fusion_head="gating")).eval()
    with running(create_app(model, config=ServeConfig(limits=LIMITS))) as (address, _):
        yield address


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[Any]:
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def _check(r: Any, batch: bool = False) -> None:
    assert r.status_code in (200, 413, 415, 422), (r.status_code, r.text[:300])
    body = r.json()
    if r.status_code == 200:
        if batch:
            assert all(("label" in p) != ("error" in p) for p in body["predictions"]), body
            for p in body["predictions"]:
                if "error" in p:
                    assert not JARGON.search(p["error"]), p["error"]
        else:
            assert "label" in body and body["inputs"], body
        return
    detail = body["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail and len(detail) < 1000, detail
    assert not JARGON.search(detail), detail


@FUZZ
@given(doc=JSON)
def test_any_json_body_gets_a_prediction_or_a_plain_4xx(client: Any, doc: Any) -> None:
    for path in ("/predict", "/predict/batch"):
        r = client.post(path, content=json.dumps(doc).encode(), headers={"content-type": "application/json"})
        _check(r, batch=path.endswith("batch"))


@FUZZ
@given(samples=st.lists(SAMPLE, min_size=0, max_size=6))
def test_batches_of_any_items_answer_per_item_or_a_plain_4xx(client: Any, samples: list[dict[str, Any]]) -> None:
    r = client.post("/predict/batch", content=json.dumps({"items": samples}).encode(),
                    headers={"content-type": "application/json"})
    _check(r, batch=True)
    if r.status_code == 200:
        assert len(r.json()["predictions"]) == len(samples)


@FUZZ
@given(depth=st.integers(1, 200_000), opener=st.sampled_from(["[", '{"text":', '{"items":[']),
       where=st.sampled_from(["/predict", "/predict/batch"]))
def test_nesting_of_any_depth_is_a_4xx(client: Any, depth: int, opener: str, where: str) -> None:
    closer = {"[": "]", '{"text":': "}", '{"items":[': "]}"}[opener]
    body = (opener * depth + "1" + closer * depth).encode()
    r = client.post(where, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (413, 422), (depth, r.status_code, r.text[:200])
    _check(r)


@FUZZ
@given(digits=st.integers(1, 10_000), key=st.sampled_from(["text", "image", "items", "x"]),
       sign=st.sampled_from(["", "-"]), tail=st.sampled_from(["", ".5", "e5", "e999"]))
def test_numbers_of_any_length_are_a_plain_4xx(client: Any, digits: int, key: str, sign: str, tail: str) -> None:
    """A 5,000-digit number was a 500 (Python refuses to read ints over 4,300 digits)."""
    body = f'{{"{key}": {sign}{"9" * digits}{tail}}}'.encode()
    for path in ("/predict", "/predict/batch"):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text[:200]
        _check(r)


@FUZZ
@given(data=st.binary(max_size=400) | st.builds(lambda n, b: bytes([b]) * n, st.integers(39_000, 41_000),
                                                 st.integers(0, 255)),
       kind=st.sampled_from(["application/json", "multipart/form-data; boundary=xyz", "multipart/form-data",
                             "application/x-www-form-urlencoded", "text/plain", ""]))
def test_raw_bytes_under_any_media_type_get_a_plain_4xx(client: Any, data: bytes, kind: str) -> None:
    r = client.post("/predict", content=data, headers={"content-type": kind} if kind else {})
    assert r.status_code != 200 or kind.startswith("application/x-www"), r.text[:200]
    _check(r)


@FUZZ
@given(text=st.text(max_size=60), image=st.sampled_from([None, *FILES[:5]]),
       field=st.sampled_from(["text", "image", "audio", "video", "text2"]))
def test_multipart_forms_of_any_fields_and_sizes(client: Any, text: str, image: str | None, field: str) -> None:
    files: list[tuple[str, Any]] = [(field, (None, text))]
    if image is not None:
        files.append(("image", ("x.png", base64.b64decode(image) if image.strip() else b"")))
    _check(client.post("/predict", files=files))


def test_the_server_still_answers_after_the_fuzzing(client: Any) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/predict", json={"text": "still here"}).status_code == 200
