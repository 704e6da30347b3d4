"""Shared fixtures: one tiny random-weight bundle (released formats) per test session.

Tests marked `full` need a full-size bundle (`sonar-llm tiny DIR --preset full`): they run only
when `$SONAR_LLM_FULL_BUNDLE` names one, and get it as the `full_bundle_dir` fixture.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from file_server import FileServer, nltk_data_tree, proxy_env

from models import tiny
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import BACKENDS, DEFAULT_BACKEND

FULL_BUNDLE_ENV = "SONAR_LLM_FULL_BUNDLE"

# Loading a model fetches nltk's punkt_tab when it is missing; the suite (and the CLI processes it
# starts) never reaches for nltk's real index. The tests of that fetch name a local one.
os.environ.setdefault("SONAR_LLM_PUNKT_URL", "")


def _full_bundle_skip_reason() -> str | None:
    root = os.environ.get(FULL_BUNDLE_ENV)
    if not root:
        return (
            f"needs a full bundle: set {FULL_BUNDLE_ENV} to a DIR built by "
            "`sonar-llm tiny DIR --preset full`"
        )
    if not tiny.is_bundle(root):
        return f"{FULL_BUNDLE_ENV}={root} is not a bundle (no {tiny.BUNDLE_FILE})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Ray starts its cluster's processes by forking this one (a preexec_fn rules out vfork), and
    # after the rest of the suite this process maps gigabytes (full-size models, engines' page
    # pools) that such a fork must be able to commit: ENOMEM in CI. So the `ray` tests go first;
    # the sort is stable, every other test keeps its order.
    items.sort(key=lambda item: item.get_closest_marker("ray") is None)
    reason = _full_bundle_skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def full_bundle_dir() -> Path:
    reason = _full_bundle_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return Path(os.environ[FULL_BUNDLE_ENV])


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tiny.Bundle:
    return tiny.build(tmp_path_factory.mktemp("bundle"))


_PIPES: dict[tuple[Path, str], SonarLLMPipeline] = {}


def _pipe(bundle: tiny.Bundle, backend: str) -> SonarLLMPipeline:
    """One pipeline per bundle and SONAR backend for the whole session."""
    key = (bundle.root, backend)
    if key not in _PIPES:
        _PIPES[key] = SonarLLMPipeline.load(bundle.root, device="cpu", sonar_backend=backend)
    return _PIPES[key]


@pytest.fixture(scope="session")
def pipe(bundle: tiny.Bundle) -> SonarLLMPipeline:
    """The tiny bundle with the default SONAR backend."""
    return _pipe(bundle, DEFAULT_BACKEND)


@pytest.fixture(scope="session")
def fairseq2_pipe(bundle: tiny.Bundle) -> SonarLLMPipeline:
    """The tiny bundle on the fairseq2 backend: for tests that read fairseq2's own modules."""
    if importlib.util.find_spec("fairseq2") is None:
        pytest.skip("the fairseq2 backend is not installed")
    return _pipe(bundle, "fairseq2")


@pytest.fixture(scope="session", params=BACKENDS)
def any_pipe(request: pytest.FixtureRequest, bundle: tiny.Bundle) -> SonarLLMPipeline:
    """The tiny bundle with each SONAR backend in turn (for the equality tests); the fairseq2
    one only where fairseq2 is installed."""
    if request.param == "fairseq2" and importlib.util.find_spec("fairseq2") is None:
        pytest.skip("the fairseq2 backend is not installed")
    return _pipe(bundle, request.param)


@pytest.fixture(scope="session")
def bundle_dir(bundle: tiny.Bundle) -> Path:
    return bundle.root


@pytest.fixture
def no_punkt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A process that has no punkt_tab anywhere: nltk's path emptied, the project's cache in
    tmp_path, no proxy, no splitter made yet (and none left behind for other tests). Yields
    the folder punkt_tab is fetched to."""
    import nltk

    from models import sentences

    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setenv("SONAR_LLM_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    sentences._splitter.cache_clear()
    assert sentences.splitter_name() == "fallback"
    sentences._splitter.cache_clear()
    yield tmp_path / "cache" / "nltk_data"
    sentences._splitter.cache_clear()


@pytest.fixture
def nltk_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_punkt: Path
) -> Iterator[tuple[FileServer, bool]]:
    """A local nltk data server with punkt_tab (`file_server`), reached as the proxy for
    `file_server.NLTK_INDEX_URL`'s host; also says whether its punkt_tab is the real one."""
    _, real = nltk_data_tree(tmp_path / "nltk-server")
    server = FileServer(tmp_path / "nltk-server")
    for name, value in proxy_env(server.url).items():
        monkeypatch.setenv(name, value)
    yield server, real
    server.close()
