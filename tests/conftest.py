"""Shared fixtures: one tiny random-weight bundle (released formats) per test session.

Tests marked `full` need a full-size bundle (`sonar-llm tiny DIR --preset full`): they run only
when `$SONAR_LLM_FULL_BUNDLE` names one, and get it as the `full_bundle_dir` fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models import tiny
from models.pipeline import SonarLLMPipeline

FULL_BUNDLE_ENV = "SONAR_LLM_FULL_BUNDLE"


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


@pytest.fixture(scope="session")
def pipe(bundle: tiny.Bundle) -> SonarLLMPipeline:
    return SonarLLMPipeline.load(bundle.root, device="cpu")


@pytest.fixture(scope="session")
def bundle_dir(bundle: tiny.Bundle) -> Path:
    return bundle.root
