"""Issue 30 (1): a local checkpoint folder never makes ``predict`` or ``serve`` contact the Hugging Face Hub.

A text encoder whose ``model_name`` is neither a file in the folder nor an installed encoder used to be looked up
on the Hub (6 requests before failing). Here ``HF_ENDPOINT`` points at a local listener that counts connections:
without ``--online`` none may arrive, and the command fails in one line with exit 2; ``--online`` (the user's
opt-in) does reach the endpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from zoo.checkpoint import hub_access
from zoo.config import FusionModelConfig
from zoo.model import FusionModel

ROOT = Path(__file__).resolve().parents[2]


class Listener:
    """A TCP listener on 127.0.0.1 that answers every connection with a 404 and counts them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.stop = True
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def hub_named(tmp_path: Path) -> Path:
    """A saved tiny model whose text encoder names a Hub id that is not on this machine."""
    cfg = FusionModelConfig(encoders={"text": "tiny-text"}, labels=("a", "b"), hidden_dim=8)
    torch.manual_seed(0)
    folder = FusionModel(cfg).save_pretrained(tmp_path / "ck")
    doc = json.loads((folder / "config.json").read_text())
    doc["model"]["encoders"]["text"] = {**doc["model"]["encoders"]["text"], "name": "hf-text",
                                        "options": {"model_name": "acme/not-on-this-machine", "pretrained": False}}
    (folder / "config.json").write_text(json.dumps(doc))
    return folder


def _run(args: list[str], port: int, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "recipes.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_a_local_folder_never_contacts_the_hub(command: str, hub_named: Path, listener: Listener) -> None:
    args = ["predict", "--model", str(hub_named), "--text", "hello"] if command == "predict" else \
        ["serve", "--model", str(hub_named), "--port", "0"]
    proc = _run(args, listener.port)
    assert listener.connections == 0, proc.stderr[-2000:]
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "acme/not-on-this-machine" in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_online_opts_in_to_the_hub(hub_named: Path, listener: Listener) -> None:
    proc = _run(["predict", "--model", str(hub_named), "--text", "hello", "--online"], listener.port)
    assert listener.connections > 0  # the user asked for the network: the (fake) Hub was asked
    assert proc.returncode != 0  # ... and it has no such model


def test_hub_access_switches_the_hub_client_off_and_back() -> None:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    with hub_access(False):
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == before
    with hub_access(True):
        assert constants.HF_HUB_OFFLINE == before  # allowing never turns on what the user switched off


def _closed_port() -> int:
    """A local port nothing listens on (bound, then closed): connections to it are refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_an_unreachable_hub_fails_in_one_try_not_after_retries(hub_named: Path) -> None:
    """Issue 30 (13): with the network down, a Hub id retried for ~50 s (40 "Retrying" lines) before the clear
    error; one connection check now decides, and the command fails in one line."""
    proc = _run(["predict", "--model", str(hub_named), "--text", "hello", "--online"], _closed_port())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Retrying" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "acme/not-on-this-machine" in lines[0], proc.stderr[-2000:]
    assert "Hugging Face Hub is unreachable (127.0.0.1:" in lines[0] and "connection refused" in lines[0]


def test_hub_or_cache_turns_the_client_offline_only_while_the_hub_is_unreachable(
        monkeypatch: pytest.MonkeyPatch, listener: Listener) -> None:
    from huggingface_hub import constants

    from fusion_common import hub as _hub
    from fusion_common.hub import hub_or_cache

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_hub, "_VERDICTS", {})
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with hub_or_cache("acme/x") as why:
        assert why is not None and "connection refused" in why and constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{listener.port}")
    with hub_or_cache("acme/x") as why:
        assert why is None and constants.HF_HUB_OFFLINE is False  # reachable: the download may go ahead
    for _ in range(50):  # the listener thread counts the connection once it accepts it
        if listener.connections:
            break
        time.sleep(0.1)
    assert listener.connections == 1
    with hub_or_cache(str(ROOT)) as why:  # a local folder needs no check
        assert why is None
    assert listener.connections == 1
