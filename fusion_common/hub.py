"""One quick reachability check of the Hugging Face Hub before an encoder or a fused model downloads from it.

The Hub client retries a refused or timed-out connection several times with backoff before it says the model is
not in the local cache. :func:`hub_or_cache` instead opens one TCP connection to the Hub (or the proxy) with a
short timeout; when that fails, the load runs with the client offline, so a model in the local cache still loads
and a missing one fails at once with a message that says the Hub is unreachable.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

__all__ = ["HUB_CONNECT_TIMEOUT", "hub_or_cache", "hub_unreachable"]

HUB_CONNECT_TIMEOUT = 3.0  # seconds for the one connection attempt
_REMEMBER_SECONDS = 60.0  # a verdict is reused this long, so a model of three encoders probes once
_VERDICTS: dict[tuple[str, int], tuple[float, str | None]] = {}


def _client_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _target(endpoint: str) -> tuple[str, int]:
    """The host and port the first connection goes to: the proxy when one is set, else the endpoint."""
    scheme = urlsplit(endpoint).scheme or "https"
    for var in (f"{scheme.upper()}_PROXY", f"{scheme}_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(var):
            endpoint = os.environ[var] if "://" in os.environ[var] else f"http://{os.environ[var]}"
            break
    parts = urlsplit(endpoint)
    return parts.hostname or "huggingface.co", parts.port or (443 if parts.scheme == "https" else 80)


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (``"127.0.0.1:9: connection refused"``), or None when one connection opened."""
    host, port = _target(_endpoint())
    now = time.monotonic()
    seen = _VERDICTS.get((host, port))
    if seen is not None and now - seen[0] < _REMEMBER_SECONDS:
        return seen[1]
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT).close()
        why = None
    except OSError as e:  # refused, unresolvable name, no route, timeout
        why = f"{host}:{port}: {e.strerror or type(e).__name__}".lower()
    _VERDICTS[(host, port)] = (now, why)
    return why


@contextlib.contextmanager
def hub_or_cache(name: str) -> Iterator[str | None]:
    """Around a ``from_pretrained(name)``: when ``name`` is not a local folder and the Hub client is on, check
    once that the Hub answers; if it does not, switch the client offline for the block (the local cache still
    serves). Yields why the Hub is unreachable (None: reachable, a folder, or the client already offline), for the
    caller's error message."""
    if os.path.isdir(name) or _client_offline():
        yield None
        return
    why = hub_unreachable()
    if why is None:
        yield None
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield why
    finally:
        constants.HF_HUB_OFFLINE = saved
