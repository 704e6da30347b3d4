"""The project's own cache folder (demo bundle, nltk data): one rule, read by every user."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$SONAR_LLM_CACHE_DIR`, else `$XDG_CACHE_HOME/sonar-llm` (`~/.cache/sonar-llm`)."""
    if os.environ.get("SONAR_LLM_CACHE_DIR"):
        return Path(os.environ["SONAR_LLM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sonar-llm"
