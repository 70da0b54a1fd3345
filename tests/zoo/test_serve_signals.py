"""``fusion-zoo serve`` as a process (issue 30, 11): SIGTERM drains (``/health`` 503, the open request answered)
and exits 0; Ctrl-C at idle returns at once with exit 0.

The served model is a tiny folder (the weight-free ``pixels`` image encoder), so no test here needs real weights.
Time bounds are generous timeouts on waiting, not measurements.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'fusion-zoo[serve]'")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zoo import FusionModel, FusionModelConfig

    path = tmp_path_factory.mktemp("pixels-model")
    FusionModel(FusionModelConfig(encoders={"image": "pixels"}, labels=("a", "b"), hidden_dim=8)).save_pretrained(path)
    return path


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@contextlib.contextmanager
def serving(folder: Path, tmp_path: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``fusion-zoo serve --model <folder>`` on a free port; yields (process, URL) once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "zoo.cli", "serve", "--model", str(folder), "--port", str(port), "--threads", "1",
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not come up in 120 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_drains_with_health_503_then_exits_0(folder: Path, tmp_path: Path) -> None:
    image = _png()
    with serving(folder, tmp_path, "--max-wait-ms", "2000") as (proc, url), ThreadPoolExecutor(1) as pool:
        # the request waits up to 2 s for a batch to fill: it is open when the signal arrives
        open_request = pool.submit(httpx.post, f"{url}/predict", files={"image": ("x.png", image)}, timeout=60)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["in_flight"] == 0:
            assert time.monotonic() < deadline and not open_request.done()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        health = httpx.get(f"{url}/health")  # still listening while it drains
        assert open_request.result().status_code == 200
        assert proc.wait(30) == 0
    assert health.status_code == 503 and health.json()["status"] == "stopping"
    text = (tmp_path / "server.log").read_text()
    assert "draining" in text and "Traceback" not in text


def test_ctrl_c_at_idle_returns_at_once_with_exit_0(folder: Path, tmp_path: Path) -> None:
    with serving(folder, tmp_path) as (proc, url):
        assert httpx.post(f"{url}/predict", files={"image": ("x.png", _png())}).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=3) == 0  # was 6-9 s: the interpreter's teardown of torch, now skipped
    assert "Traceback" not in (tmp_path / "server.log").read_text()
