"""`sonar-llm serve` (or `ray`) as a child process on a loopback port, for tests and benchmarks.

Both start the server as a user would and wait until it answers readiness; this is the one
place that does it (it lives in the package, which bench/ and tests/ both import).
Waiting is for an event with a deadline: readiness answered 200, or the process exited.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

# How often readiness is asked while the model loads. The wait in between is `Popen.wait`, so
# a server that exits is noticed at once, not after the interval.
POLL_S = 0.2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sonar_llm_command() -> list[str]:
    """The installed `sonar-llm` script beside this interpreter, else the module."""
    script = Path(sys.executable).parent / "sonar-llm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


class ServerProcess:
    """`sonar-llm COMMAND --port P ARGS...` with its output in `log_path`.

    The environment is this process's without `SONAR_LLM_*` and `RAY_ADDRESS` (only the
    arguments configure the server), plus `env`. As a context manager it starts the process and
    makes sure it is gone at the end.
    """

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        command: str = "serve",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.argv = [*sonar_llm_command(), command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.argv += args
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("SONAR_LLM_") and k != "RAY_ADDRESS"
        }
        self.env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        # Readiness answers other than 200 seen while starting (503 while loading).
        self.not_ready: list[httpx.Response] = []

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> float:
        """Seconds until `/health/ready` answered 200; RuntimeError (with the log's tail) if
        the process exits first or `timeout` passes."""
        assert self.proc is not None, "not started"
        t0 = time.monotonic()
        deadline = t0 + timeout
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):  # not listening yet
                    r = client.get("/health/ready")
                    if r.status_code == 200:
                        return time.monotonic() - t0
                    self.not_ready.append(r)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"not ready after {timeout:.0f} s:\n{self.log_tail()}")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self.proc.wait(min(POLL_S, left))
                    raise RuntimeError(f"server exited ({code}):\n{self.log_tail()}")

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `grace` seconds: the exit code."""
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
