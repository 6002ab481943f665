"""API docs that work offline: Swagger UI served from the swagger-ui-bundle package (no CDN), and an OpenAPI
schema that documents the errors the server really sends (400 for a bad body, not FastAPI's 422)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

ASSETS = "/docs/assets"
_ERROR = {
    "type": "object",
    "description": "OpenAI's error shape.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}
_REF = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def install(app: FastAPI) -> None:
    """Serve /docs from packaged assets and give APP an OpenAPI schema with its real error responses."""
    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _with_errors(
                get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


def _with_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """Every operation: 400 (not 422) for a body that is not the schema, 401 where a key is checked, and the
    error shape for every other status it may answer."""
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = _ERROR
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if "requestBody" in operation:
                responses["400"] = {"description": "The body is not JSON or not the schema.", **_REF}
            if operation.get("security"):
                responses["401"] = {"description": "No API key, or an unknown one.", **_REF}
            responses["default"] = {"description": "Any other error, in OpenAI's shape.", **_REF}
    return spec
