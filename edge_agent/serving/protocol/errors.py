"""Error values: what ``serving`` returns for a request-level problem, in OpenAI's shape.

``serving`` never raises for a request-level problem; it returns an ``ErrorResult``:
``status`` (the HTTP status the router sends), ``body`` (OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``) and ``headers`` (e.g. ``Retry-After``
on 429). The type of each status is ``ERROR_TYPES``: ``invalid_request_error`` (400, 413),
``authentication_error`` (401, a bad admin token), ``permission_error`` (403),
``not_found_error`` (404), ``rate_limited`` (429, queue full), ``server_error`` (500, the
runtime failed), ``service_unavailable`` (503, the MQTT face while the agent shuts down).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class ErrorResult:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.body["error"]["type"]

    @property
    def message(self) -> str:
        return self.body["error"]["message"]


# HTTP status → OpenAI error type. The router (cloud_router.protocol) keeps its own copy, as
# the packages share no code; tests/test_wire_contracts.py pins the two together.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
               429: "rate_limited", 500: "server_error", 503: "service_unavailable"}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(status: int, message: str, *, param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error body for ``status``: ``{"error": {"message", "type", "param", "code"}}``."""
    info = ErrorInfo(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"),
                     param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error(status: int, message: str, *, param: str | None = None, code: str | None = None,
          headers: dict[str, str] | None = None) -> ErrorResult:
    return ErrorResult(status, error_body(status, message, param=param, code=code),
                       headers or {})


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part) -> bool:
    """pydantic names the union member that failed in ``loc`` (``prompt.str``,
    ``stop.list[str]``); a client's parameter path has no such part."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


def validation_error(exc: ValidationError) -> ErrorResult:
    """A pydantic error as a 400 naming the first bad parameter."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if not _is_type_tag(p)) or None
    msg = first["msg"].removeprefix("Value error, ")
    return error(400, f"invalid parameter {param}: {msg}" if param else msg, param=param,
                 code="invalid_value")
