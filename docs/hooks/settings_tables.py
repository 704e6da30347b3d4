"""MkDocs hook: the configuration tables, made at build time from the code that defines them.

- `<!-- generated: settings -->`: every server setting, from `server.settings.Settings` (default,
  description) and the flags `add_serve_args` gives `sonar-llm serve`, with its environment
  variable (the settings' `env_prefix`). A new setting appears here by itself.
- `<!-- generated: options -->`: every generation option, from `models.options.OPTIONS` (the
  table the HTTP schemas and the `sonar-llm generate` flags are made from).
"""

from __future__ import annotations

import argparse
from typing import Any

SETTINGS_MARKER = "<!-- generated: settings -->"
OPTIONS_MARKER = "<!-- generated: options -->"
BOUNDS = {
    "ge": "≥ {}",
    "gt": "> {}",
    "le": "≤ {}",
    "min_length": "length ≥ {}",
    "max_length": "length ≤ {}",
    "pattern": "`{}`",
}
TYPES = {int: "integer", float: "number", str: "string"}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_table())
    if OPTIONS_MARKER in markdown:
        markdown = markdown.replace(OPTIONS_MARKER, options_table())
    return markdown


def settings_table() -> str:
    from server.settings import Settings, add_serve_args

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    prefix = Settings.model_config.get("env_prefix", "")
    rows = ["| flag and environment variable | default | meaning |", "|---|---|---|"]
    for action in parser._actions:  # argparse has no public accessor for its actions
        field = Settings.model_fields.get(action.dest)
        if field is None:
            continue
        flags = " / ".join(f"`{f}`" for f in action.option_strings)
        default = field.get_default(call_default_factory=True)
        # Descriptions are argparse help strings: `%%` stands for `%`.
        meaning = (field.description or "").replace("%%", "%")
        env = f"`{prefix}{action.dest.upper()}`"
        rows.append(f"| {flags}<br>{env} | {_value(default)} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def options_table() -> str:
    from models.options import OPTIONS
    from server.cli import _add_generation_args

    parser = argparse.ArgumentParser()
    _add_generation_args(parser)  # the `sonar-llm generate` flags
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    rows = ["| field / flag | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        kind = (
            f"string or list of ≤ {o.max_items} strings"
            if o.many
            else TYPES.get(o.type, o.type.__name__)
        )
        bounds = ", ".join(
            BOUNDS[k].format(f"{v:g}" if isinstance(v, float) else v) for k, v in o.bounds().items()
        )
        rows.append(
            f"| `{o.name}` / `{flags[o.name]}` | {kind} | {_value(o.default)} | {_cell(bounds)} "
            f"| {_cell(o.description)} |"
        )
    return "\n".join(rows) + "\n"


def _value(value: Any) -> str:
    if value is None or value == [] or value == ():
        return "–"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
