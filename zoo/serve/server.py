"""The uvicorn server of ``fusion-zoo serve``: drain first on SIGINT/SIGTERM, then stop, and exit 0.

uvicorn alone closes its listener the moment a signal arrives (a load balancer's health check then meets a
refused connection, not the documented 503) and re-raises the signal once it has stopped (exit -15 on SIGTERM).
:class:`GracefulServer` instead keeps listening while it drains: ``/health`` answers 503 "stopping", new
predictions 503 + Retry-After, the open ones finish (at most ``drain_timeout_s``); then uvicorn's own shutdown
runs. A second Ctrl-C stops at once. At idle the drain ends on the next tick (0.1 s).
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from .app import Gate

__all__ = ["GracefulServer"]

log = logging.getLogger("uvicorn.error")  # configured by uvicorn: these lines show beside its own


class GracefulServer(uvicorn.Server):
    """``uvicorn.Server`` that drains through ``gate`` (``app.state.gate`` of :func:`zoo.serve.create_app`)."""

    def __init__(self, config: uvicorn.Config, gate: Gate, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.gate = gate
        self.drain_timeout_s = drain_timeout_s
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # the signal is not recorded in uvicorn's list, so it is not re-raised after the stop: the exit code is 0
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            self.gate.draining = True
            log.info("draining: %d request(s) in flight; /health answers 503 (a second Ctrl+C stops at once)",
                     self.gate.in_flight)
            return
        self.should_exit = True
        if sig == signal.SIGINT:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        started = self.drain_started
        if started is not None and not self.should_exit:
            if self.gate.in_flight == 0:
                self.should_exit = True
            elif time.monotonic() - started > self.drain_timeout_s:
                log.warning("drain timed out after %.0f s with %d request(s) open", self.drain_timeout_s,
                            self.gate.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)
