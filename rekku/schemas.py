"""Typed bodies of the HTTP API: the OpenAPI schema (and schemathesis) follow from these."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Id = str | int


class RequestContext(BaseModel):
    """Where the actions come from: the chat and user they answer."""

    model_config = ConfigDict(extra="ignore")
    interface: str | None = Field(None, max_length=64)
    chat_id: Id | None = None
    thread_id: Id | None = None
    user_id: Id | None = None
    username: str | None = Field(None, max_length=256)
    message_id: Id | None = None


class SubmitRequest(BaseModel):
    """Either ``actions`` (any of the three JSON forms) or ``text`` (a raw LLM reply), not both."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "oneOf": [{"required": ["actions"]}, {"required": ["text"]}]})
    actions: (list[Any] | Annotated[dict[str, Any], Field(min_length=1)]) = Field(
        None, description="the LLM's actions, in any accepted form")
    text: str = Field(None, min_length=1, description="a raw LLM reply; fences and prose around the JSON are tolerated")
    context: RequestContext | None = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=255)


class AcceptedAction(BaseModel):
    index: int
    id: str
    type: str
    queue: str


class RejectedAction(BaseModel):
    index: int | None
    type: str | None
    errors: list[str]


class SubmitResponse(BaseModel):
    batch_id: str | None
    accepted: list[AcceptedAction]
    rejected: list[RejectedAction]
    correction: dict[str, Any] | None


class ActionState(BaseModel):
    id: str
    batch_id: str
    type: str
    status: Status
    queue: str
    payload: dict[str, Any]
    context: dict[str, Any]
    result: Any = None
    error: str | None
    progress: dict[str, Any] | None
    attempts: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    worker: str | None


class BatchState(BaseModel):
    batch_id: str
    actions: list[ActionState]
    done: bool


class CancelResponse(BaseModel):
    id: str
    status: Status
    detail: str


class Capability(BaseModel):
    model_config = ConfigDict(extra="allow")
    description: str
    required_fields: list[str]
    optional_fields: list[str]
    instructions: dict[str, Any]
    queue: str


class CapabilitiesResponse(BaseModel):
    actions: dict[str, Capability]
    interfaces: list[Any]
    errors: list[str]
    disabled: dict[str, str]


class FeedPage(BaseModel):
    """A page of the model's feed (``GET /v1/feed``)."""

    items: list[dict[str, Any]]
    #: The ``after`` of the next call: the last item's id, or the ``after`` given when there was none.
    next: int


class ErrorResponse(BaseModel):
    """Every error of the API has this shape."""

    detail: str
    errors: list[Any] = []


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}
