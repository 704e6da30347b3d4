"""MkDocs hook: the API reference page, rendered from `openapi.yaml` at build time.

A page holding the line `<!-- generated: openapi -->` gets every route (grouped by tag, in the
file's order) and every schema as Markdown tables, so the site needs no JavaScript and no
network, and the contract is written once: in the app, exported to `openapi.yaml`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

MARKER = "<!-- generated: openapi -->"
SPEC = Path(__file__).resolve().parents[2] / "openapi.yaml"
CONSTRAINTS = {
    "minimum": "≥ {}",
    "maximum": "≤ {}",
    "exclusiveMinimum": "> {}",
    "exclusiveMaximum": "< {}",
    "minLength": "length ≥ {}",
    "maxLength": "length ≤ {}",
    "minItems": "items ≥ {}",
    "maxItems": "items ≤ {}",
    "pattern": "pattern `{}`",
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    spec = yaml.safe_load(SPEC.read_text())
    return markdown.replace(MARKER, render(spec))


def render(spec: dict[str, Any]) -> str:
    by_tag: dict[str, list[str]] = {}
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            tag = (op.get("tags") or ["other"])[0]
            by_tag.setdefault(tag, []).append(_operation(method, path, op))
    out = []
    for tag, ops in by_tag.items():
        out.append(f"## Routes: {tag}\n")
        out.extend(ops)
    out.append("## Schemas\n")
    for name, schema in spec["components"]["schemas"].items():
        out.append(_schema(name, schema))
    return "\n".join(out)


def _operation(method: str, path: str, op: dict[str, Any]) -> str:
    lines = [f"### {method.upper()} {path}\n", f"{_text(op.get('summary', ''))}.\n"]
    if op.get("description"):
        lines.append(_text(op["description"]) + "\n")
    if op.get("security"):
        lines.append("Needs an API key when the server has keys (`--api-key`).\n")
    params = op.get("parameters", [])
    if params:
        lines.append("| parameter | in | type |\n|---|---|---|")
        lines += [f"| `{p['name']}` | {p['in']} | {_type(p['schema'])} |" for p in params]
        lines.append("")
    body = op.get("requestBody", {}).get("content", {})
    for media, content in body.items():
        lines.append(f"Request body (`{media}`): {_type(content['schema'])}.\n")
    lines.append("| status | meaning | body |\n|---|---|---|")
    for status, resp in op.get("responses", {}).items():
        bodies = [_body(media, c.get("schema")) for media, c in resp.get("content", {}).items()]
        lines.append(f"| {status} | {_cell(resp.get('description', ''))} | {'<br>'.join(bodies)} |")
    return "\n".join(lines) + "\n"


def _body(media: str, schema: dict[str, Any] | None) -> str:
    if not schema:
        return f"`{media}`"
    events = []
    for variant in schema.get("oneOf", []):
        props = variant.get("properties", {})
        if "event" in props:
            data = _type(props["data"].get("contentSchema", {}))
            events.append(f"`event: {props['event']['const']}` {data}")
    if events:
        return f"`{media}`: " + ", ".join(events)
    if set(schema.get("properties", {})) == {"data"}:
        return f"`{media}`: `data:` lines"
    return f"`{media}`: {_type(schema)}"


def _schema(name: str, schema: dict[str, Any]) -> str:
    lines = [f"### {name}\n"]
    if schema.get("description"):
        lines.append(_text(schema["description"]) + "\n")
    props = schema.get("properties", {})
    if not props:
        lines.append(f"Type: {_type(schema)}.\n")
        return "\n".join(lines)
    required = set(schema.get("required", []))
    lines.append("| field | type | default | meaning |\n|---|---|---|---|")
    for field, sub in props.items():
        default = json.dumps(sub["default"]) if "default" in sub else ""
        meaning = _cell(sub.get("description", ""))
        limits = _constraints(sub)
        if limits:
            meaning = f"{meaning} ({limits})" if meaning else limits
        mark = " **required**" if field in required else ""
        lines.append(
            f"| `{field}`{mark} | {_type(sub)} | {_cell(f'`{default}`' if default else '')} "
            f"| {meaning} |"
        )
    if schema.get("additionalProperties") is False:
        lines.append("\nAny other field is refused (400).")
    return "\n".join(lines) + "\n"


def _type(schema: dict[str, Any]) -> str:
    """A schema as a short phrase, linking named schemas to their tables."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            kinds = [_type(s) for s in schema[key] if s.get("type") != "null"]
            return " or ".join(dict.fromkeys(kinds)) or "null"
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {_type(schema['additionalProperties'])}"
    return str(kind) if kind else "any"


def _constraints(schema: dict[str, Any]) -> str:
    """The bounds of a field and of the variants it allows (a list's items included)."""
    found: list[str] = []
    variants = [schema, *schema.get("anyOf", []), *schema.get("oneOf", [])]
    for v in variants:
        for key, fmt in CONSTRAINTS.items():
            if key in v:
                value = v[key]
                text = fmt.format(_number(value))
                if text not in found:
                    found.append(text)
    return ", ".join(found)


def _number(value: Any) -> Any:
    """JSON Schema bounds come as floats (`16.0`): show whole ones as integers."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return f"{value:g}" if isinstance(value, float) else value


def _text(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    return _text(text).replace("|", "\\|")
