"""The published API contract: `openapi.yaml` at the repository root, written from the app itself.

`python -m server.api.openapi` rewrites the file; `--check` exits 1 with a unified diff when the
file no longer matches the app (CI runs it, and so does tests/server/test_contract.py).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from server.api.app import create_app
from server.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACT_PATH = REPO_ROOT / "openapi.yaml"
REGENERATE = "python -m server.api.openapi"
HEADER = f"# The published API contract. Generated from the app by `{REGENERATE}`; do not edit.\n"


def project_version() -> str | None:
    """`[project].version` from pyproject.toml, or None outside a source checkout."""
    try:
        data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    version = data.get("project", {}).get("version")
    return version if isinstance(version, str) else None


def contract_schema() -> dict[str, Any]:
    """The app's OpenAPI document, with `info.version` taken from pyproject.toml.

    The app reports the *installed* package's version ("unknown" when not installed, stale after a
    bump without reinstall); the contract follows the source, so it reads the same in every
    checkout.
    """
    schema = create_app(Settings()).openapi()
    version = project_version()
    if version is not None:
        schema["info"]["version"] = version
    return schema


def render(schema: dict[str, Any]) -> str:
    """YAML in FastAPI's key order (not sorted), so diffs follow the app's structure."""
    return HEADER + yaml.safe_dump(schema, sort_keys=False, allow_unicode=True)


def diff(current: str, expected: str, path: Path = CONTRACT_PATH) -> str:
    """A unified diff from the file on disk to what the app publishes ("" when equal)."""
    lines = difflib.unified_diff(
        current.splitlines(keepends=True),
        expected.splitlines(keepends=True),
        fromfile=f"{path.name} (on disk)",
        tofile=f"{path.name} (from the app)",
    )
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.api.openapi", description="Write or check openapi.yaml."
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 with a diff if the file is not current"
    )
    parser.add_argument("--output", type=Path, default=CONTRACT_PATH, help="file to write/check")
    args = parser.parse_args(argv)
    expected = render(contract_schema())
    if args.check:
        try:
            current = args.output.read_text()
        except FileNotFoundError:
            current = ""
        if current == expected:
            print(f"{args.output} is current")
            return 0
        sys.stdout.write(diff(current, expected, args.output))
        print(f"\n{args.output} differs from the app's schema; run `{REGENERATE}`", file=sys.stderr)
        return 1
    args.output.write_text(expected)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
