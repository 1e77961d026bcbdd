"""Status bodies and the exception that carries them, shaped like the real API server's."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cause:
    field: str
    message: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "field": self.field}


def go_value(value: Any) -> str:
    """Render a value the way the server's field errors do (Go's %#v for simple values)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return json.dumps(str(value))


@dataclass(frozen=True)
class FieldError:
    """One validation failure at a field path, like k8s.io/apimachinery's field.Error."""

    path: str
    reason: str  # FieldValueInvalid, FieldValueRequired, ...
    detail: str

    @property
    def message(self) -> str:
        return self.detail

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}" if self.path else self.detail

    def cause(self) -> Cause:
        return Cause(self.path, self.detail, self.reason)


def invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError(path, "FieldValueInvalid", f"Invalid value: {go_value(value)}: {detail}")


def required(path: str, detail: str = "") -> FieldError:
    return FieldError(path, "FieldValueRequired", "Required value" + (f": {detail}" if detail else ""))


def not_supported(path: str, value: Any, allowed: list[Any]) -> FieldError:
    choices = ", ".join(go_value(a) for a in allowed)
    return FieldError(path, "FieldValueNotSupported",
                      f"Unsupported value: {go_value(value)}: supported values: {choices}")


def too_long(path: str, limit: int) -> FieldError:
    return FieldError(path, "FieldValueTooLong", f"Too long: may not be more than {limit} bytes")


def too_many(path: str, actual: int, limit: int) -> FieldError:
    return FieldError(path, "FieldValueTooMany", f"Too many: {actual}: must have at most {limit} items")


def forbidden_field(path: str, detail: str) -> FieldError:
    return FieldError(path, "FieldValueForbidden", f"Forbidden: {detail}")


@dataclass
class ApiError(Exception):
    """Raised anywhere in request handling; the handler turns it into a Status response."""

    code: int
    reason: str
    message: str
    details: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            status["details"] = self.details
        return status


def qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, group: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{qualified(resource, group)} "{name}" not found',
                    {"name": name, "group": group, "kind": resource})


def already_exists(resource: str, group: str, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{qualified(resource, group)} "{name}" already exists',
                    {"name": name, "group": group, "kind": resource})


def conflict(resource: str, group: str, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict",
                    f'Operation cannot be fulfilled on {qualified(resource, group)} "{name}": {why}',
                    {"name": name, "group": group, "kind": resource})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed(message: str = "the server does not allow this method on the requested resource"
                       ) -> ApiError:
    return ApiError(405, "MethodNotAllowed", message)


def unprocessable(kind: str, group: str, name: str, errors: list[FieldError]) -> ApiError:
    """422 Invalid, listing every field error (as the server does, in brackets when several)."""
    kind_q = f"{kind}.{group}" if group else kind
    text = ", ".join(str(e) for e in errors)
    if len(errors) > 1:
        text = f"[{text}]"
    return ApiError(422, "Invalid", f'{kind_q} "{name}" is invalid: {text}',
                    {"name": name, "group": group, "kind": kind,
                     "causes": [e.cause().as_dict() for e in errors]})


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)
