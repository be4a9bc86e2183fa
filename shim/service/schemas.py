"""The service's own response bodies (jobs, health, errors) and its OpenAPI document.

The command and answer schemas are :mod:`commands.schemas`; the envelopes around them are
described here as arrays of single-key objects, exactly as GSON writes them.
"""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields, validate

from commands.schemas import ANSWER_SCHEMAS, COMMAND_SCHEMAS
from shim.service.jobs import JobState

API_VERSION = "1"


class ProblemSchema(Schema):
    """One problem of a bad request: where (a JSON pointer, empty for the whole body), what."""

    field = fields.String(required=True)
    message = fields.String(required=True)


class ErrorSchema(Schema):
    """The body of every 4xx/5xx response."""

    error = fields.String(required=True)
    problems = fields.List(fields.Nested(ProblemSchema))


class JobAcceptedSchema(Schema):
    """The body of ``202 Accepted``: where to follow the job."""

    job_id = fields.String(data_key="jobId", required=True)


class ProgressSchema(Schema):
    """Bytes processed of the total, from libvirt's job statistics."""

    processed = fields.Integer(required=True)
    total = fields.Integer(required=True)


class JobStatusSchema(Schema):
    """A job: its state, its progress, and once finished the answer envelope."""

    job_id = fields.String(data_key="jobId", required=True)
    state = fields.String(required=True, validate=validate.OneOf([s.value for s in JobState]))
    progress = fields.Nested(ProgressSchema, required=True)
    abort_requested = fields.Boolean(
        data_key="abortRequested",
        metadata={"description": "an abort was asked for (the job may still be cleaning up)"},
    )
    answers = fields.List(
        fields.Dict(), metadata={"description": "the answer envelope, once finished"}
    )


class VersionsSchema(Schema):
    """Dotted versions of the hypervisor's parts."""

    qemu = fields.String()
    libvirt = fields.String()


class LibvirtHealthSchema(Schema):
    """Whether libvirt answers, and its versions."""

    reachable = fields.Boolean(required=True)
    versions = fields.Nested(VersionsSchema)
    error = fields.String()


class JobCountsSchema(Schema):
    """Jobs not finished, by state."""

    in_flight = fields.Integer(data_key="inFlight", required=True)
    queued = fields.Integer(required=True)
    running = fields.Integer(required=True)
    max_backups = fields.Integer(data_key="maxBackups", required=True)


class HealthSchema(Schema):
    """``GET /v1/health``."""

    status = fields.String(required=True, validate=validate.OneOf(["ok", "unavailable"]))
    libvirt = fields.Nested(LibvirtHealthSchema, required=True)
    jobs = fields.Nested(JobCountsSchema, required=True)


def _short(java_class: str) -> str:
    return java_class.rsplit(".", 1)[-1]


def _envelope(schemas: dict[str, Any], what: str) -> dict[str, Any]:
    wrappers = [
        {
            "type": "object",
            "properties": {name: {"$ref": f"#/components/schemas/{_short(name)}"}},
            "required": [name],
            "additionalProperties": False,
        }
        for name in schemas
    ]
    return {
        "type": "array",
        "minItems": 1,
        "description": f"GSON's wire form: {what}, each as {{fully qualified class: fields}}",
        "items": {"oneOf": wrappers},
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 document of the service, generated from the schemas."""
    spec = APISpec(
        title="cloudstack-nasbackup-shim",
        version=API_VERSION,
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "CloudStack's NAS backup commands over a local socket."},
    )
    for name, schema in {**COMMAND_SCHEMAS, **ANSWER_SCHEMAS}.items():
        spec.components.schema(_short(name), schema=schema)
    for service_schema in (ErrorSchema, JobAcceptedSchema, JobStatusSchema, HealthSchema):
        spec.components.schema(
            service_schema.__name__.removesuffix("Schema"), schema=service_schema
        )
    spec.components.schema("CommandEnvelope", _envelope(COMMAND_SCHEMAS, "commands"))
    spec.components.schema("AnswerEnvelope", _envelope(ANSWER_SCHEMAS, "answers"))
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    bad = _json("Error", "a bad request: every problem, by field; nothing was run")
    unauthorized = _json("Error", "TCP listener only: missing or wrong bearer token")
    unknown_job = _json("Error", "no such job")
    spec.path(
        path="/v1/commands",
        operations={
            "post": {
                "summary": "Run an envelope of commands, in order",
                "parameters": [
                    {
                        "name": "async",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["0", "1", "false", "true"]},
                        "description": "1: answer at once with a job to follow",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/CommandEnvelope"}
                        }
                    },
                },
                "responses": {
                    "200": _json("AnswerEnvelope", "the answers, in the commands' order"),
                    "202": _json("JobAccepted", "async: the job to follow"),
                    "400": bad,
                    "401": unauthorized,
                },
            }
        },
    )
    spec.path(
        path="/v1/jobs/{jobId}",
        parameters=[
            {"name": "jobId", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        operations={
            "get": {
                "summary": "A job's state, progress and (once finished) answers",
                "responses": {
                    "200": _json("JobStatus", "the job"),
                    "401": unauthorized,
                    "404": unknown_job,
                },
            },
            "delete": {
                "summary": "Abort a job (cleaned up as after any failure); the stop begins at "
                "once, the answer comes within a second",
                "responses": {
                    "200": _json("JobStatus", "the job, aborted and cleaned up"),
                    "202": _json("JobStatus", "the job, stopping: poll GET for its end"),
                    "401": unauthorized,
                    "404": unknown_job,
                    "409": _json("Error", "the job had already finished"),
                },
            },
        },
    )
    spec.path(
        path="/v1/health",
        operations={
            "get": {
                "summary": "libvirt reachable, QEMU and libvirt versions, jobs in flight",
                "responses": {
                    "200": _json("Health", "healthy"),
                    "401": unauthorized,
                    "503": _json("Health", "libvirt unreachable"),
                },
            }
        },
    )
    spec.path(
        path="/v1/openapi.json",
        operations={
            "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"}}}
        },
    )
    document = spec.to_dict()
    document["security"] = [{}, {"bearer": []}]  # none on the Unix socket; bearer on TCP
    return document
