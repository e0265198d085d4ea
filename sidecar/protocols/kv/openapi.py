"""/openapi.json for the KV API, generated from the same msgspec structs that decode requests."""

from __future__ import annotations

from typing import Any

import msgspec

from sidecar.protocols.kv import models

_REF = "#/components/schemas/{name}"


def _body(name: str, batch: bool = False) -> dict[str, Any]:
    """A request body of struct `name`; with `batch`, a list of them is accepted too."""
    schema: dict[str, Any] = {"$ref": _REF.format(name=name)}
    if batch:
        schema = {"oneOf": [schema, {"type": "array", "minItems": 1, "items": schema}]}
    return {
        "required": True,
        "content": {"application/json": {"schema": schema}, "application/msgpack": {"schema": schema}},
    }


def _responses(ok: str, answer: str = "WriteResponse") -> dict[str, Any]:
    def ref(name: str) -> dict[str, Any]:
        return {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}

    return {
        "200": {"description": ok, "content": ref(answer)},
        "400": {"description": "invalid input; `field` names the offending field", "content": ref("ErrorResponse")},
        "404": {"description": "unknown namespace", "content": ref("ErrorResponse")},
        "413": {"description": "body or value too large", "content": ref("ErrorResponse")},
        "503": {
            "description": "not durable: the journal refused, failed or timed out (durable false/unknown); "
            "retry after Retry-After seconds",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            "content": ref(answer),
        },
    }


def _log_answers() -> dict[str, Any]:
    """WriteToLog answers one entry with a WriteResponse, a list of them with a LogBatchResponse."""
    responses = _responses("journaled", "WriteResponse")
    for status in ("200", "503"):
        responses[status]["content"]["application/json"]["schema"] = {"oneOf": [
            {"$ref": _REF.format(name="WriteResponse")}, {"$ref": _REF.format(name="LogBatchResponse")}]}
    responses["200"]["description"] = "journaled (a batch: every entry; each result has its own status)"
    responses["400"]["description"] += " (a batch: the first refused entry's status, unless one is 503)"
    return responses


_NS = {
    "name": "namespace", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": "^[a-z][a-z0-9_-]*$"},
}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}


def openapi_document() -> dict[str, Any]:
    structs = (
        models.WriteToLog, models.PutItems, models.DeleteItems, models.MutateItems,
        models.WriteResponse, models.LogBatchResponse, models.ErrorResponse, models.GetItemsResponse,
    )
    _, components = msgspec.json.schema_components(structs, ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "walcar key-value API",
            "version": "1",
            "description": "Every write is journaled to NATS JetStream before it is answered. "
            "`durable` is true only with the journal's acknowledgement in hand.",
        },
        "paths": {
            "/v1/log/{namespace}": {
                "post": {
                    "operationId": "writeToLog",
                    "parameters": [_NS],
                    "requestBody": {**_body("WriteToLog", batch=True), "description": "one entry, or a list of entries "
                                    "(at most the listener's max_items), each journaled and answered on its own"},
                    "responses": _log_answers(),
                }
            },
            "/v1/kv/{namespace}/{id}": {
                "put": {
                    "operationId": "putItems",
                    "parameters": [_NS, _ID],
                    "requestBody": _body("PutItems"),
                    "responses": _responses("journaled"),
                },
                "get": {
                    "operationId": "getItems",
                    "parameters": [_NS, _ID, {"name": "items", "in": "query", "required": False,
                                              "schema": {"type": "string"},
                                              "description": "comma-separated item keys (default: all)"}],
                    "responses": {
                        "200": {"description": "the record's items, read through the primary target",
                                "content": {"application/json": {"schema": {"$ref": _REF.format(
                                    name="GetItemsResponse")}}}},
                        "404": {"description": "unknown namespace, or no such record"},
                        "503": {"description": "the primary target is unavailable"},
                    },
                },
                "delete": {
                    "operationId": "deleteItems",
                    "parameters": [_NS, _ID],
                    "requestBody": {**_body("DeleteItems"), "required": False},
                    "responses": _responses("journaled"),
                },
            },
            "/v1/kv/{namespace}/mutate": {
                "post": {
                    "operationId": "mutateItems",
                    "parameters": [_NS],
                    "requestBody": _body("MutateItems"),
                    "responses": _responses("all mutations journaled atomically"),
                }
            },
        },
        "components": {"schemas": components},
    }
