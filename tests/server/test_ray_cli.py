"""`sonar-llm ray` as a process: it starts its own Ray, serves, and SIGTERM leaves no Ray
process behind (marked `slow` and `ray`: run with `pytest -m ray`)."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import psutil
import pytest
from httpx_sse import connect_sse

from server.testing import ServerProcess

pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]

START_TIMEOUT = 300.0


def test_sigterm_drains_and_leaves_no_ray_process(bundle_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(bundle_dir), "--device", "cpu", "--cache-memory", "64MiB"]
    args += ["--replicas", "1", "--ray-num-cpus", "2", "--no-dashboard", "--shutdown-grace", "10"]
    with ServerProcess(args, tmp_path / "ray.log", command="ray") as server:
        server.wait_ready(START_TIMEOUT)
        proc = server.proc
        assert proc is not None
        family = psutil.Process(proc.pid).children(recursive=True)
        titles = " ".join(" ".join(p.cmdline()) for p in family if p.is_running())
        assert "raylet" in titles and "ServeReplica" in titles  # it started Ray and a replica

        # A request in flight when SIGTERM arrives still gets its answer (the drain): the
        # signal goes once its first sentence has arrived.
        request = {"prompt": "One. Two. Three.", "max_sentences": 6, "eos_threshold": 1.0}
        with (
            httpx.Client(base_url=server.url, timeout=120) as client,
            connect_sse(client, "POST", "/generate", json={**request, "stream": True}) as events,
        ):
            assert events.response.status_code == 200, events.response.read()
            kinds = []
            for sse in events.iter_sse():
                kinds.append(sse.event)
                if len(kinds) == 1:
                    proc.send_signal(signal.SIGTERM)
        assert kinds == ["sentence"] * 6 + ["done"]
        assert proc.wait(timeout=180) == 0
        # Nothing it started survives it: GCS, raylet, dashboard agents, workers, replicas.
        _, alive = psutil.wait_procs(family, timeout=60)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
