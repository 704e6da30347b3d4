"""`sonar-llm serve`: uvicorn with a graceful drain on SIGTERM.

First SIGTERM/SIGINT: readiness turns 503 and new generation requests are refused, requests
in flight finish (up to `shutdown_grace` seconds; those still running then end with
finish_reason "cancelled"), then uvicorn stops and the process exits 0.
A second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from models.pipeline import warn_demo
from server.api.app import create_app
from server.api.state import AppState
from server.connections import protocol_class, raise_open_file_limit
from server.log_config import configure_logging
from server.settings import Settings, settings_from_args

log = logging.getLogger("sonar_llm.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.info("signal %s: draining (grace %.0fs)", sig, self.state.settings.shutdown_grace)
        self.state.status = "draining"
        threading.Thread(target=self._drain, name="drain", daemon=True).start()

    def _drain(self) -> None:
        if not self._wait_idle(self.state.settings.shutdown_grace):
            # Grace is over: end what still runs (finish_reason "cancelled"), so each client
            # gets an answer and the process exits now, not after uvicorn's own
            # graceful-shutdown timeout on top (then cutting requests off with a bare 500).
            log.warning("grace period over: ending the requests still in flight")
            engine = self.state.engine
            if engine is not None:
                engine.stop()
            self._wait_idle(2.0)  # let those last answers go out
        self.should_exit = True

    def _wait_idle(self, seconds: float) -> bool:
        """Wait until no request is in flight; False if some still are after `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            engine = self.state.engine
            busy = self.state.active_requests > 0 or (
                engine is not None and engine.alive and (engine.num_running or engine.num_waiting)
            )
            if not busy:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def fatal(self, message: str) -> None:
        log.error("cannot serve: %s", message)
        self.exit_code = 1
        self.should_exit = True


def uvicorn_config(app: FastAPI, settings: Settings, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for `app`, with the connection guard (read timeouts, connection cap,
    protocol errors in the envelope; see `server.connections`)."""
    http = protocol_class(
        read_timeout=settings.read_timeout,
        body_timeout=settings.body_timeout,
        max_connections=settings.max_connections,
        registry=app.state.sonar.registry,
    )
    kwargs.setdefault("timeout_graceful_shutdown", max(1, int(settings.shutdown_grace)))
    return uvicorn.Config(app, http=http, log_config=None, lifespan="on", **kwargs)


def serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    configure_logging(settings.log_format, settings.log_level)
    if settings.model is None:
        warn_demo()
    raise_open_file_limit()  # before the connection cap's default is derived from it
    app = create_app(settings)
    config = uvicorn_config(app, settings, host=settings.host, port=settings.port)
    server = DrainingServer(config, app.state.sonar)
    app.state.sonar.on_fatal = server.fatal
    server.run()
    return server.exit_code
