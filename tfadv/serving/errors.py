"""Errors with TF Serving's status codes, mapped to gRPC codes and HTTP statuses."""

from __future__ import annotations

import grpc

# TF Serving's REST gateway maps canonical codes to HTTP statuses this way.
_HTTP = {
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "INTERNAL": 500,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """A request the server refuses, with its canonical status code name.

    Args:
        code: a `grpc.StatusCode` member name such as "NOT_FOUND" or
            "INVALID_ARGUMENT".
        message: what went wrong and what to send instead.
    """

    def __init__(self, code: str, message: str):
        if code not in _HTTP:
            raise ValueError(f"Expected a status code name in {sorted(_HTTP)}. Received: {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        """The HTTP status TF Serving's REST API answers with for this code."""
        return _HTTP[self.code]

    @property
    def grpc_code(self):
        """The `grpc.StatusCode` for this error."""

        return grpc.StatusCode[self.code]

    def __repr__(self):
        return f"ServingError({self.code}, {self.message!r})"


def not_found(message):
    return ServingError("NOT_FOUND", message)


def invalid(message):
    return ServingError("INVALID_ARGUMENT", message)
