"""Shared fixtures: one tiny random-weight bundle (released formats) per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import tiny
from models.pipeline import SonarLLMPipeline


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tiny.Bundle:
    return tiny.build(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="session")
def pipe(bundle: tiny.Bundle) -> SonarLLMPipeline:
    return SonarLLMPipeline.load(bundle.root, device="cpu")


@pytest.fixture(scope="session")
def bundle_dir(bundle: tiny.Bundle) -> Path:
    return bundle.root
