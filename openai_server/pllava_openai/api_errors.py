"""Errors in the OpenAI shape, and the decoder's gRPC statuses as HTTP statuses.

Every refusal is ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status the
OpenAI clients act on (the ``openai`` package raises ``BadRequestError`` for 400,
``AuthenticationError`` for 401, ``RateLimitError`` for 429 and retries 429 and 5xx).
"""
from __future__ import annotations

import grpc

#: The error ``type`` for each HTTP status (OpenAI's words where it has them).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout",
}

#: What a decoder status becomes: the caller's mistakes 4xx, the decoder's state 429/503.
HTTP_STATUS_FOR_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 502,
    grpc.StatusCode.DATA_LOSS: 502,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 503,  # the decoder stopped the call (shutting down)
    grpc.StatusCode.ABORTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class ApiError(Exception):
    """A request answered with an OpenAI error object and ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def from_grpc(status: grpc.StatusCode, message: str) -> ApiError:
    """The error a decoder refusal becomes; the code is the gRPC status name, lower case."""
    if status == grpc.StatusCode.UNAVAILABLE and "decoder" not in message:  # gRPC's words, not the decoder's
        message = f"the decoder cannot be reached: {message}"
    return ApiError(HTTP_STATUS_FOR_GRPC.get(status, 502), message, code=status.name.lower())
