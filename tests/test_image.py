"""The built image, run: its entrypoint inside the image, checked from outside over HTTP.

`docker/build-local.sh` builds the real Dockerfile (CI does, before the tests). Here Debian's
buildah (as root) starts the image's own ENTRYPOINT, as its own USER, with its own ENV, in a
working container on the host's network; the checks are what `docker run` users see: readiness,
the HEALTHCHECK command, generation and SSE, the uid, the /cache volume kept across a restart,
and SIGTERM draining to exit 0. The tests run in order: the first start's module fixture is
ended by the SIGTERM test, then the second start reuses the container.

Marked `image` (deselected by default: `pytest -m image` runs them). Without buildah or the
image they skip, except in CI (`CI` set), where they fail: there the image must have been built.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from api_helpers import wait_until
from httpx_sse import EventSource

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(600)]

IMAGE = os.environ.get("SONAR_LLM_IMAGE", "localhost/sonar-llm-server:local")
BUILDAH = ["buildah"]  # its default storage, as docker/build-local.sh uses
START_TIMEOUT = 300.0  # importing torch, building and loading the demo bundle on a busy CPU
GRACE = 20
UID = 10001


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI builds the image with docker/build-local.sh first)")
    pytest.skip(reason)


def buildah(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [*BUILDAH, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"buildah {' '.join(args)}: {done.stderr}"
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Container:
    """A working container of the image, its root on the host, and the image's Docker config."""

    name: str
    root: Path
    config: dict[str, Any]

    port: int

    def run(self, argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        """`argv` inside the container, on the host's network, as the image's USER, with the
        image's environment (plus the container's port and drain time)."""
        return subprocess.Popen(
            [*BUILDAH, "run", "--isolation", "chroot", "--network", "host", self.name, "--",
             *argv],
            **popen,
        )  # fmt: skip

    def healthcheck(self) -> int:
        """The image's HEALTHCHECK command, run in the container: its exit status."""
        test = self.config["Healthcheck"]["Test"]
        argv = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]
        proc = self.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return proc.wait(60)


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    if shutil.which("buildah") is None or os.geteuid() != 0:
        _unavailable("needs Debian's buildah, run as root")
    probe = subprocess.run([*BUILDAH, "inspect", "--type", "image", IMAGE], capture_output=True)
    if probe.returncode != 0:
        _unavailable(f"no image {IMAGE}: build it with `bash docker/build-local.sh`")
    config = json.loads(probe.stdout)["Docker"]["config"]
    name = f"sonar-llm-image-test-{os.getpid()}"
    buildah("from", "--name", name, IMAGE)
    try:
        # As `docker run -e`: the server and the HEALTHCHECK command both see these. The host's
        # network is shared, so the port is a free one, not the image's 8000.
        env = {"SONAR_LLM_PORT": str(free_port()), "SONAR_LLM_SHUTDOWN_GRACE": str(GRACE)}
        buildah("config", *(f"--env={k}={v}" for k, v in env.items()), name)
        root = Path(buildah("mount", name).strip())
        yield Container(name, root, config, int(env["SONAR_LLM_PORT"]))
    finally:
        subprocess.run([*BUILDAH, "rm", name], capture_output=True, check=False)


def test_image_config(container: Container) -> None:
    """What `docker run` and Kubernetes read from the image before starting it."""
    config = container.config
    assert config["User"].split(":")[0] == str(UID)  # numeric: runAsNonRoot can check it
    assert "8000/tcp" in config["ExposedPorts"]
    assert "/cache" in config["Volumes"]
    assert config["StopSignal"] == "SIGTERM"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert (env["SONAR_LLM_HOST"], env["SONAR_LLM_PORT"]) == ("0.0.0.0", "8000")


def test_venv_holds_the_runtime_and_ray_not_dev_tools(container: Container) -> None:
    """The locked dependencies with the `ray` extra, the project installed (not a link to
    sources that are not in the image), and no dev tools."""
    check = (
        "import importlib.util as u, ray.serve, server; "
        "assert not any(u.find_spec(m) for m in ('pytest', 'ruff', 'mypy')); "
        "print(server.__file__)"
    )
    proc = container.run(["python", "-c", check], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert out.decode().strip().startswith("/opt/venv/lib/")
    assert not (container.root / "src").exists()


@dataclass
class Started:
    proc: subprocess.Popen[bytes]  # buildah run
    url: str
    log_path: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", httpx.Timeout(60.0, connect=10.0))
        return httpx.Client(base_url=self.url, trust_env=False, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def server(self) -> psutil.Process:
        """The entrypoint's process: below buildah's own helpers (`buildah-chroot-exec ARGV`
        runs it and reports its exit status)."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            argv = child.cmdline()
            if argv and "buildah" not in argv[0] and "sonar-llm" in " ".join(argv):
                return child
        raise AssertionError(f"no sonar-llm process under buildah run:\n{self.log()[-3000:]}")

    def stop(self) -> int:
        """SIGTERM to the entrypoint's process, as `docker stop` sends it; its exit status."""
        self.server().send_signal(signal.SIGTERM)
        return self.proc.wait(GRACE + 60)


def start(container: Container, log_path: Path) -> Started:
    """The image's ENTRYPOINT + CMD; waits for ready."""
    argv = [*container.config["Entrypoint"], *(container.config.get("Cmd") or [])]
    with log_path.open("wb") as log:
        proc = container.run(argv, stdout=log, stderr=subprocess.STDOUT)
    started = Started(proc, f"http://127.0.0.1:{container.port}", log_path)
    with started.client(timeout=5.0) as c:

        def ready() -> bool:
            assert proc.poll() is None, f"the entrypoint exited:\n{started.log()[-3000:]}"
            try:
                return c.get("/health/ready").status_code == 200
            except httpx.TransportError:
                return False  # not listening yet

        wait_until(ready, START_TIMEOUT, "the image's server to become ready")
    return started


def bundle_files(container: Container) -> dict[str, tuple[int, str]]:
    """The demo bundle's files in the container's /cache volume: (owner uid, mtime) by path.
    Read from inside (buildah keeps a container's volumes outside its root filesystem)."""
    listing = "find /cache/sonar-llm/demo-bundle -type f -printf '%P %U %T@\\n' 2>/dev/null || true"
    proc = container.run(["/bin/sh", "-c", listing], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    files = {}
    for line in out.decode().splitlines():
        path, uid, mtime = line.rsplit(" ", 2)
        files[path] = (int(uid), mtime)
    return files


@pytest.fixture(scope="module")
def first(container: Container, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    # Before the server starts the HEALTHCHECK fails: so its later 0 means something.
    assert container.healthcheck() != 0
    assert bundle_files(container) == {}  # the image ships an empty /cache
    started = start(container, tmp_path_factory.mktemp("image") / "first.log")
    try:
        yield started
    finally:
        if started.proc.poll() is None:
            started.proc.kill()
            started.proc.wait(30)


def test_ready_and_healthcheck_passes(container: Container, first: Started) -> None:
    with first.client() as c:
        assert c.get("/health/ready").json()["status"] == "ok"
    assert container.healthcheck() == 0


def test_generate_and_stream_on_the_demo_bundle(first: Started) -> None:
    request = {"prompt": "The cat runs home. It is late.", "max_sentences": 2, "max_tokens": 24}
    with first.client() as c:
        r = c.post("/generate", json=request)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["sentences"]) == 2 and all(isinstance(s, str) for s in body["sentences"])
        with c.stream("POST", "/generate", json={**request, "stream": True}) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            events = [(e.event, e.json()) for e in EventSource(s).iter_sse()]
    assert [name for name, _ in events] == ["sentence", "sentence", "done"]
    assert [data["text"] for _, data in events[:2]] == events[-1][1]["sentences"]


def test_sentences_are_split_by_the_baked_in_punkt_tab(first: Started) -> None:
    """The build put nltk's trained punkt_tab in the image; nothing was fetched at start."""
    text = "Dr. Smith arrived at 5 p.m. on Monday. He left."
    with first.client() as c:
        r = c.post("/segment", json={"text": text})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "sentences": ["Dr. Smith arrived at 5 p.m. on Monday.", "He left."],
        "splitter": "punkt_tab",
    }


def test_runs_as_uid_10001(first: Started) -> None:
    uids = first.server().uids()
    assert (uids.real, uids.effective) == (UID, UID)


def test_first_start_writes_the_demo_bundle_to_cache(container: Container, first: Started) -> None:
    files = bundle_files(container)
    assert "bundle.json" in files, sorted(files)
    assert {uid for uid, _ in files.values()} == {UID}


def test_sigterm_drains_in_flight_stream_then_exits_0(first: Started) -> None:
    request = {
        "prompt": "The cat runs home. It is late.",
        "stream": True,
        "max_sentences": 6,
        "max_tokens": 32,
        "eos_threshold": 1.0,
    }
    with first.client() as client, client.stream("POST", "/generate", json=request) as r:
        assert r.status_code == 200
        events = EventSource(r).iter_sse()
        assert next(events).event == "sentence"
        server = first.server()
        server.send_signal(signal.SIGTERM)
        with first.client() as other:

            def draining() -> bool:
                ready = other.get("/health/ready")
                return ready.status_code == 503 and ready.json()["status"] == "draining"

            wait_until(draining, 30, "readiness to report draining")
        rest = [sse.event for sse in events]
    assert rest == ["sentence"] * 5 + ["done"]  # the request in flight finished
    assert first.proc.wait(GRACE + 60) == 0, first.log()[-3000:]
    assert not server.is_running()


def test_second_start_reuses_the_cached_bundle(
    container: Container, first: Started, tmp_path: Path
) -> None:
    assert first.proc.poll() == 0  # the first start has ended (previous test)
    before = bundle_files(container)
    assert before
    second = start(container, tmp_path / "second.log")
    try:
        with second.client() as c:
            r = c.post("/generate", json={"prompt": "Hello there.", "max_sentences": 1})
            assert r.status_code == 200, r.text
        assert bundle_files(container) == before  # same files, not rewritten
        assert second.stop() == 0
    finally:
        if second.proc.poll() is None:
            second.proc.kill()
            second.proc.wait(30)
