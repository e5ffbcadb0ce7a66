"""A request the service refuses: an HTTP status and one sentence for the client."""

from __future__ import annotations


class RequestProblem(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

