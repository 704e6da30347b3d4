"""MkDocs hook: the plots in `bench/results/` join the site as `bench/<name>.png`.

The benchmarks page links them where the scripts write them, so a re-run updates the page and
no copy of a plot is kept in `docs/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def on_files(files: Files, config: Any) -> Files:
    for plot in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"bench/{plot.name}", abs_src_path=str(plot)))
    return files
