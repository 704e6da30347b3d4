"""openapi.yaml is the published contract: it must be exactly what the app serves."""

from __future__ import annotations

import re
from typing import Any

import fastapi.routing
import pytest
import yaml
from fastapi import FastAPI

from server.api import openapi
from server.api.app import create_app
from server.settings import Settings

ERROR_REF = "#/components/schemas/ErrorResponse"
GENERATION_ROUTES = ("/generate", "/summarize", "/v1/completions", "/v1/chat/completions")
# A bad field (400), no API key (401), body too large (413) or not JSON (415), and loading,
# draining or overloaded (503).
GENERATION_ERRORS = ("400", "401", "413", "415", "503")


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return create_app(Settings())


@pytest.fixture(scope="module")
def published() -> dict[str, Any]:
    return yaml.safe_load(openapi.CONTRACT_PATH.read_text())


def test_openapi_yaml_matches_the_app() -> None:
    expected = openapi.render(openapi.contract_schema())
    current = openapi.CONTRACT_PATH.read_text() if openapi.CONTRACT_PATH.exists() else ""
    if current != expected:
        pytest.fail(
            f"openapi.yaml differs from the app's schema; run `{openapi.REGENERATE}` and commit "
            f"the result.\n{openapi.diff(current, expected)}",
            pytrace=False,
        )


def test_contract_is_the_apps_schema_up_to_the_pinned_version(
    app: FastAPI, published: dict[str, Any]
) -> None:
    served = app.openapi()
    assert {**published, "info": {**published["info"], "version": "*"}} == {
        **served,
        "info": {**served["info"], "version": "*"},
    }
    assert published["info"]["version"] == openapi.project_version()


def _served_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(METHOD, path) of every route the app serves, but FastAPI's own docs pages."""
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    # FastAPI >= 0.120 nests included routers; iter_route_contexts flattens them.
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    routes: set[tuple[str, str]] = set()
    for route in flatten(app.routes) if flatten else app.routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if path is None or path in docs:
            continue
        path = re.sub(r":\w+}", "}", path)  # `{id:path}` is `{id}` in OpenAPI
        routes.update((method, path) for method in methods or () if method != "HEAD")
    return routes


def test_every_route_is_in_the_contract(app: FastAPI, published: dict[str, Any]) -> None:
    served = _served_routes(app)
    assert served, "the app has no routes?"
    in_file = {
        (method.upper(), path)
        for path, operations in published["paths"].items()
        for method in operations
    }
    missing = sorted(served - in_file)
    assert not missing, f"routes missing from openapi.yaml: {missing}"
    stale = sorted(in_file - served)
    assert not stale, f"openapi.yaml documents routes the app does not serve: {stale}"


@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_generation_routes_document_their_errors(published: dict[str, Any], path: str) -> None:
    responses = published["paths"][path]["post"]["responses"]
    for status in GENERATION_ERRORS:
        assert status in responses, f"POST {path} does not document {status}"
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": ERROR_REF}, f"POST {path} {status}: {schema}"
    streamed = responses["200"]["content"]
    assert "application/json" in streamed and "text/event-stream" in streamed


def test_every_post_route_documents_body_errors(published: dict[str, Any]) -> None:
    """Every POST body passes BodyGuard (413, 415) and validation (400) before its route."""
    posts = [path for path, ops in published["paths"].items() if "post" in ops]
    assert set(GENERATION_ROUTES) <= set(posts)
    for path in posts:
        responses = published["paths"][path]["post"]["responses"]
        for status in ("400", "413", "415"):
            assert status in responses, f"POST {path} does not document {status}"
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": ERROR_REF}, f"POST {path} {status}: {schema}"


def test_error_envelope_is_published(published: dict[str, Any]) -> None:
    schemas = published["components"]["schemas"]
    assert schemas["ErrorResponse"]["required"] == ["error"]
    body = schemas["ErrorBody"]
    assert list(body["properties"]) == ["message", "type", "param", "code"]
    assert body["required"] == ["message", "type"]


def test_check_mode_reports_a_stale_file(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "openapi.yaml"
    assert openapi.main(["--output", str(target)]) == 0
    assert openapi.main(["--check", "--output", str(target)]) == 0
    target.write_text(target.read_text().replace("sonar-llm-server", "renamed", 1))
    capsys.readouterr()
    assert openapi.main(["--check", "--output", str(target)]) == 1
    captured = capsys.readouterr()
    assert "-  title: renamed" in captured.out and "+  title: sonar-llm-server" in captured.out
    assert openapi.REGENERATE in captured.err
