"""The server as a Ray Serve application, on a real local Ray cluster (CPU, tiny bundle).

One cluster and one two-replica application for the module (each replica loads torch and the
bundle: slow on a shared 2-core CPU). The replica-killing test and the autoscaling test change
the fleet, so they come last. Marked `slow` and `ray`: a plain `pytest` leaves them out,
`pytest -m ray` runs them (about 4 minutes on an idle 2-core machine, more when it is busy).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from api_helpers import wait_until
from helpers import PROMPTS, options, single
from httpx_sse import EventSource, connect_sse
from prometheus_client.parser import text_string_to_metric_families

from models.pipeline import SonarLLMPipeline

pytest.importorskip("ray.serve")

import ray
from ray import serve

from server.ray_app import DEPLOYMENT, build, split_args
from server.ray_cli import start_ray

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]

APP = "sonar"
START_TIMEOUT = 300.0  # two replicas importing torch on a busy 2-core machine
NO_EOS = {"eos_threshold": 1.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    url: str
    dashboard: str
    metrics_export: str
    bundle_dir: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", httpx.Timeout(120.0, connect=10.0))
        return httpx.Client(base_url=self.url, **kwargs)

    def exported(self, sample: str, app: str = APP) -> dict[str, float]:
        """replica -> value of one engine metric in Ray's Prometheus export."""
        text = httpx.get(self.metrics_export, timeout=10).text
        by_replica: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == sample and s.labels.get("application") == app:
                    by_replica[s.labels["replica"]] = s.value
        return by_replica

    def settings_args(self, **extra: Any) -> dict[str, Any]:
        """Builder args as `serve run ... key=value` gives them: strings."""
        args = {
            "model": str(self.bundle_dir),
            "device": "cpu",
            "cache_memory": "64MiB",
            "max_running": "4",
            "max_waiting": "16",
            "shutdown_grace": "5",
            "num_cpus": "1",
            "health_check_period_s": "2",
        }
        return {**args, **{k: str(v) for k, v in extra.items()}}


def replica_pids(app: str = APP) -> dict[int, str]:
    """pid -> process title of this app's replica processes (Ray's workers of this test)."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if f"ServeReplica:{app}:{DEPLOYMENT}" in title:
            found[proc.pid] = title
    return found


def running_replicas(app: str = APP) -> int:
    status = serve.status().applications.get(app)
    if status is None:
        return 0
    deployment = status.deployments[DEPLOYMENT]
    return int(deployment.replica_states.get("RUNNING", 0))


def start_cluster(attempts: int = 3) -> tuple[int, int]:
    """A local Ray with its dashboard and metrics export on free ports: (dashboard, metrics).

    A port found free can be taken before Ray binds it (Ray's own processes start on random
    ports): then Ray refuses to start, and the start is tried again on other ports."""
    for attempt in range(1, attempts + 1):
        dashboard_port, metrics_port = free_port(), free_port()
        try:
            start_ray(
                num_cpus=4,
                include_dashboard=True,
                dashboard_port=dashboard_port,
                _metrics_export_port=metrics_port,
                _system_config={"metrics_report_interval_ms": 1000},
                log_to_driver=False,
            )
            return dashboard_port, metrics_port
        except ValueError as e:
            if "already occupied" not in str(e) or attempt == attempts:
                raise
            ray.shutdown()
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def cluster(bundle_dir: Path) -> Iterator[Cluster]:
    os.environ.pop("RAY_ADDRESS", None)
    dashboard_port, metrics_port = start_cluster()
    http_port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        c = Cluster(
            url=f"http://127.0.0.1:{http_port}",
            dashboard=f"http://127.0.0.1:{dashboard_port}",
            metrics_export=f"http://127.0.0.1:{metrics_port}/metrics",
            bundle_dir=bundle_dir,
        )
        settings, scale = split_args(c.settings_args(replicas=2))
        serve.run(build(settings, scale), name=APP, route_prefix="/")
        yield c
    finally:
        serve.shutdown()
        ray.shutdown()


def body(prompt: str, i: int, **extra: Any) -> dict[str, Any]:
    opts = options(i)
    return {
        "prompt": prompt,
        "max_sentences": opts.max_sentences,
        "max_tokens": opts.decode.max_tokens,
        "beam_size": opts.decode.beam_size,
        **extra,
    }


def test_builder_derives_serve_options_from_settings(cluster: Cluster) -> None:
    from server.ray_app import deployment_options

    settings, scale = split_args(cluster.settings_args(replicas=2))
    opts = deployment_options(settings, scale)
    assert opts["max_ongoing_requests"] == 4 + 16
    assert opts["graceful_shutdown_timeout_s"] == 5
    assert opts["num_replicas"] == 2
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    with pytest.raises(ValueError, match="unknown argument"):
        split_args({"max_runing": "3"})


def test_two_replicas_answer_like_one_engine(cluster: Cluster, pipe: SonarLLMPipeline) -> None:
    """Both replicas answer, each with exactly the single-engine sentences."""
    cases = [(p, i) for i, p in enumerate(PROMPTS[:6])] * 2
    expected = {i: single(pipe, p, options(i)) for p, i in cases}

    def ask(case: tuple[str, int]) -> tuple[int, httpx.Response]:
        prompt, i = case
        with cluster.client() as client:
            return i, client.post("/generate", json=body(prompt, i))

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(ask, cases))
    replicas = set()
    for i, r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["sentences"] == expected[i].sentences
        assert r.json()["finish_reason"] == expected[i].finish_reason
        replicas.add(r.headers["x-replica-id"])
    assert len(replicas) == 2, replicas


def test_streaming_passes_through_the_proxy(cluster: Cluster) -> None:
    """The first sentence event arrives while the request is still generating."""
    request = {"prompt": PROMPTS[1], "max_sentences": 8, "max_tokens": 32, "stream": True}
    with cluster.client() as client:
        start = time.perf_counter()
        with connect_sse(client, "POST", "/generate", json={**request, **NO_EOS}) as events:
            assert events.response.headers["content-type"].startswith("text/event-stream")
            received = [
                (sse.event, sse.json(), time.perf_counter() - start) for sse in events.iter_sse()
            ]
    names = [name for name, _, _ in received]
    assert names == ["sentence"] * 8 + ["done"]
    first_arrival = received[0][2]
    done = received[-1][1]
    # The client started before the server did, so arriving within the server's total time
    # means the first sentence arrived before the last one was generated.
    assert first_arrival < done["usage"]["total_time"], (first_arrival, done["usage"])


def test_openai_streaming_through_the_proxy(cluster: Cluster) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPTS[2]}],
            stream=True,
            max_tokens=32,
            extra_body={"max_sentences": 3, **NO_EOS},
        )
    )
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3
    assert chunks[-1].choices[0].finish_reason == "length"


def test_serve_status_shows_the_replicas(cluster: Cluster) -> None:
    serve_cli = Path(sys.executable).parent / "serve"
    result = subprocess.run(
        [str(serve_cli), "status", "-a", cluster.dashboard],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    status = yaml.safe_load(result.stdout)
    app = status["applications"][APP]
    assert app["status"] == "RUNNING"
    deployment = app["deployments"][DEPLOYMENT]
    assert deployment["status"] == "HEALTHY"
    assert deployment["replica_states"] == {"RUNNING": 2}


def test_each_answer_names_its_replica(cluster: Cluster) -> None:
    with cluster.client() as client:
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            info = client.get("/info")
            assert info.status_code == 200
            seen[info.headers["x-replica-id"]] = info.json()["replica"]
        assert len(seen) == 2 and all(k == v for k, v in seen.items()), seen
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        replica = metrics.headers["x-replica-id"]
        targets = [
            s.labels
            for f in text_string_to_metric_families(metrics.text)
            for s in f.samples
            if s.name == "target_info"
        ]
        assert targets == [{"replica": replica}]  # one replica's metrics, and it says so
        ready = client.get("/health/ready")
        assert ready.status_code == 200 and ready.headers["x-replica-id"] in seen


def test_engine_metrics_reach_ray_export_per_replica(cluster: Cluster) -> None:
    """Each replica's engine metrics are in Ray's Prometheus export, with a replica label."""
    with cluster.client() as client:
        ids = {client.get("/info").headers["x-replica-id"] for _ in range(20)}

    def generated() -> dict[str, float]:
        return cluster.exported("ray_sonar_llm_sentences_generated_total")

    wait_until(lambda: set(generated()) >= ids, timeout=90, what="per-replica Ray metrics")
    assert all(v > 0 for v in generated().values())  # both replicas generated above


def test_killing_a_replica_loses_only_its_requests(cluster: Cluster) -> None:
    """SIGKILL one replica under load: every request ends (answer or error, no hang), the
    others succeed, and Serve brings a replacement up."""
    before = replica_pids()
    assert len(before) == 2, before
    victim = next(iter(before))
    request = {"prompt": PROMPTS[3], "max_sentences": 24, "max_tokens": 32, **NO_EOS}

    streaming: set[str] = set()  # replicas with a stream under way

    def ask(_: int) -> tuple[int | None, str]:
        """Status 200 for a stream that reached `done`, -1 for one cut off, None for a hang."""
        try:
            with (
                cluster.client(timeout=httpx.Timeout(180.0, connect=10.0)) as client,
                client.stream("POST", "/generate", json={**request, "stream": True}) as r,
            ):
                replica = r.headers.get("x-replica-id", "")
                if r.status_code != 200:
                    return r.status_code, replica
                names = []
                for sse in EventSource(r).iter_sse():
                    names.append(sse.event)
                    streaming.add(replica)
                return (200 if names[-1:] == ["done"] else -1), replica
        except httpx.TimeoutException:
            return None, "hung"
        except httpx.HTTPError as e:  # the connection dropped: an error, not a hang
            return -1, type(e).__name__

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, n) for n in range(8)]
        wait_until(lambda: len(streaming) == 2, timeout=120, what="streams on both replicas")
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=240) for f in futures]
    assert all(status is not None for status, _ in results), results
    ok = [r for r in results if r[0] == 200]
    failed = [r for r in results if r[0] != 200]
    assert ok, results  # the surviving replica's requests were answered
    assert all(status == -1 or status >= 500 for status, _ in failed), results

    def replaced() -> bool:
        pids = replica_pids()
        return victim not in pids and len(pids) == 2 and running_replicas() == 2

    # Serve notices the death (health check or actor death) and starts a replacement.
    wait_until(replaced, timeout=START_TIMEOUT, what="replica replaced")
    with cluster.client() as client:
        assert client.post("/generate", json={**request, "max_sentences": 1}).status_code == 200


def test_autoscaling_from_one_to_two_replicas(cluster: Cluster) -> None:
    serve.delete(APP)  # make room on the 2-core machine
    settings, scale = split_args(
        cluster.settings_args(
            min_replicas=1,
            max_replicas=2,
            target_ongoing_requests=1,
            upscale_delay_s=1,
            downscale_delay_s=600,
            look_back_period_s=12,  # above Serve's 10 s metrics interval
            max_running=2,
        )
    )
    serve.run(build(settings, scale), name="auto", route_prefix="/auto")
    assert running_replicas("auto") == 1
    stop = time.monotonic() + START_TIMEOUT
    request = {"prompt": PROMPTS[3], "max_sentences": 6, "max_tokens": 24, **NO_EOS}

    def load(_: int) -> int:
        n = 0
        with cluster.client() as client:
            while running_replicas("auto") < 2 and time.monotonic() < stop:
                assert client.post("/auto/generate", json=request).status_code == 200
                n += 1
        return n

    with ThreadPoolExecutor(4) as pool:
        sent = sum(pool.map(load, range(4)))
    assert running_replicas("auto") == 2, f"no upscale after {sent} requests"
    with cluster.client() as client:
        ids = {client.get("/auto/info").headers["x-replica-id"] for _ in range(20)}
    assert len(ids) == 2
