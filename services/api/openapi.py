"""The edge's OpenAPI schema as the contract it keeps (``schemathesis run /openapi.json
--checks all`` finds nothing):
- every refusal is documented with the body it has (``{"error": {"code", "message"}}``), and
  a request the schema calls invalid is answered 400, as OpenAI's API and ragline's own
  refusals are (FastAPI's default 422 is not used, so it is not documented);
- the server's own limits (``max_top_k``, ``max_query_chars``) are the schema's, so a request
  the schema allows is one the server takes;
- routes that read their body themselves (JSON or a multipart upload) document both."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.api.schemas import (
    DocumentBody,
    DocumentRequest,
    JobRequest,
)
from services.api.settings import ApiSettings

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "e.g. invalid_argument, not_found"},
                "message": {"type": "string", "description": "what is wrong and what to do"},
                "trace_id": {"type": "string"},
                "stage": {"type": "string", "description": "the stage that refused, if one did"},
            },
        }
    },
}
REFUSALS = {
    "400": "invalid request: the message says which field and why",
    "401": "missing or wrong API key (when the edge has keys)",
    "403": "the API key may not use this collection",
    "404": "no such collection, document or job",
    "409": "already exists",
    "413": "request body over the server's limit",
    "415": "unsupported document type",
    "429": "busy: retry after the Retry-After header",
    "500": "internal error (the trace_id says where to look in the logs)",
    "502": "a stage failed",
    "503": "a stage is unavailable or not ready",
    "504": "the request's time budget ran out",
}
PROBES = {"/healthz", "/livez", "/readyz"}
LIMITED = ("ChatRequest", "SearchRequest", "ChatCompletionRequest")  # take top_k and a query


def upload_body(json_schema: str, file_field: str) -> dict:
    """``openapi_extra`` of a route that reads its body itself: the JSON ``json_schema`` is
    the schema; the multipart form (``file_field``) is said in the description only. A form
    part is text whatever type a schema gives it, so a fuzzer's "wrong type" parts cannot be
    told from right ones: describing the form in the schema would make its negative tests
    unfalsifiable."""
    multipart = (
        f"Also multipart/form-data: one or more '{file_field}' parts (.txt, .md, .html or .pdf "
        "by file name; a part without one is read by its Content-Type: text/plain, "
        "text/markdown, text/html, application/pdf)"
    )
    if file_field == "file":
        multipart += " and an optional 'document_id' field"
    return {
        "description": multipart + ".",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_schema}"}}
            },
        },
    }


def contract(app: FastAPI, settings: ApiSettings) -> Callable[[], dict]:
    """The ``app.openapi`` that builds (once) the schema described above."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)  # fmt: skip
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (DocumentRequest, DocumentBody, JobRequest):
            found = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(found.pop("$defs", {}))
            components[model.__name__] = found
        components["Error"] = ERROR
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        _json_schema_bounds(components)
        for name in LIMITED:
            props = components[name]["properties"]
            _set_limit(props["top_k"], "maximum", settings.max_top_k)
            if "query" in props:
                props["query"]["maxLength"] = settings.max_query_chars
        for path, operations in schema["paths"].items():
            for op in operations.values():
                responses = op["responses"]
                responses.pop("422", None)
                if path in PROBES:
                    continue
                for status, why in REFUSALS.items():
                    responses.setdefault(status, {
                        "description": why,
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/Error"}}},
                    })  # fmt: skip
        readyz = schema["paths"].get("/readyz", {}).get("get")
        if readyz:
            readyz["responses"]["503"] = {"description": "a stage has no replica serving"}
        app.openapi_schema = schema
        return schema

    return openapi


_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _json_schema_bounds(node) -> None:
    """Pydantic leaves ``ge``/``le`` as they are on a constrained type behind a validator
    (``schemas.PositiveInt``): they become JSON Schema's ``minimum``/``maximum``."""
    if isinstance(node, dict):
        for short, name in _BOUNDS.items():
            if short in node and node.get("type") in ("integer", "number"):
                node[name] = node.pop(short)
        for value in node.values():
            _json_schema_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _json_schema_bounds(value)


def _set_limit(prop: dict, key: str, value: int) -> None:
    """On an optional field (``anyOf: [{integer}, {null}]``) the limit goes on the integer."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option[key] = value
