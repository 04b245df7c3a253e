"""The gateway's errors, in OpenAI's shape."""

from __future__ import annotations

from schemas.errors import ZooterError


class GatewayError(ZooterError):
    """An answer in OpenAI's error shape: `status`, and `code`/`param` naming what to fix."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
