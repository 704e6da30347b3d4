"""MkDocs hook: the metrics table, made at build time from the instruments the server registers.

A page holding `<!-- generated: metrics -->` gets one row per metric of the HTTP layer, the engine
and the connection guard (name as Prometheus shows it, type, labels, help text), so a new
metric appears here by itself.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- generated: metrics -->"
SUFFIX = {"counter": "_total", "info": "_info"}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, metrics_table())


def metrics_table() -> str:
    from prometheus_client import CollectorRegistry

    from server.api.state import HTTPMetrics
    from server.connections import ConnectionMetrics
    from server.engine.metrics import EngineMetrics

    registry = CollectorRegistry()
    groups = [HTTPMetrics(registry), EngineMetrics(registry), ConnectionMetrics(registry)]
    labels = {
        m._name: m._labelnames  # prometheus_client has no public accessor for these
        for group in groups
        for m in vars(group).values()
        if hasattr(m, "_labelnames")
    }
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for family in registry.collect():
        name = family.name + SUFFIX.get(family.type, "")
        names = ", ".join(f"`{label}`" for label in labels.get(family.name, ()))
        help_text = " ".join(family.documentation.split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {family.type} | {names} | {help_text} |")
    return "\n".join(rows) + "\n"
