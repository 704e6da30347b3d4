"""The fairseq2 reference, where it is installed (the native-only CI leg has no fairseq2)."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def fairseq2_reference() -> None:
    """Skip unless fairseq2 and sonar-space can be imported (libsndfile made loadable first)."""
    if importlib.util.find_spec("fairseq2") is None or importlib.util.find_spec("sonar") is None:
        pytest.skip("fairseq2/sonar-space (the reference) are not installed")
    from models.libsndfile import ensure_libsndfile

    ensure_libsndfile()
