"""`sonar-llm ray` as a process: it starts its own Ray, serves, and SIGTERM leaves no Ray
process behind (marked `slow` and `ray`: run with `pytest -m ray`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from api_helpers import wait_until
from httpx_sse import EventSource

pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]

START_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sonar_llm() -> list[str]:
    script = Path(sys.executable).parent / "sonar-llm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_drains_and_leaves_no_ray_process(bundle_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (tmp_path / "ray.log").open("wb")
    proc = subprocess.Popen(
        [
            *sonar_llm(),
            "ray",
            "--model",
            str(bundle_dir),
            "--device",
            "cpu",
            "--cache-memory",
            "64MiB",
            "--port",
            str(port),
            "--replicas",
            "1",
            "--ray-num-cpus",
            "2",
            "--no-dashboard",
            "--shutdown-grace",
            "10",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: ready(url) or proc.poll() is not None, timeout=START_TIMEOUT, what="ready"
        )
        assert proc.poll() is None, (tmp_path / "ray.log").read_text()[-3000:]
        family = psutil.Process(proc.pid).children(recursive=True)
        titles = " ".join(" ".join(p.cmdline()) for p in family if p.is_running())
        assert "raylet" in titles and "ServeReplica" in titles  # it started Ray and a replica

        # A request in flight when SIGTERM arrives (its first sentence streamed) still gets
        # all of its answer (the drain).
        request = {
            "prompt": "One. Two. Three.", "max_sentences": 6, "eos_threshold": 1.0,
            "stream": True,
        }  # fmt: skip
        with (
            httpx.Client(base_url=url, timeout=120) as client,
            client.stream("POST", "/generate", json=request) as response,
        ):
            assert response.status_code == 200
            events = EventSource(response).iter_sse()
            assert next(events).event == "sentence"
            proc.send_signal(signal.SIGTERM)
            rest = [sse.event for sse in events]
        assert rest == ["sentence"] * 5 + ["done"]
        assert proc.wait(timeout=180) == 0
        # Nothing it started survives it: GCS, raylet, dashboard agents, workers, replicas.
        _, alive = psutil.wait_procs(family, timeout=60)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
