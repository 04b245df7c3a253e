"""The gateway's errors, in OpenAI's shape, and how an expert's error answer is summarised for the client."""

from __future__ import annotations

import json
import re
from http import HTTPStatus

import httpx

from schemas.errors import ZooterError


class GatewayError(ZooterError):
    """An answer in OpenAI's error shape: `status`, and `code`/`param` naming what to fix; `headers` go with it
    (`Retry-After` on a 429)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.param, self.kind, self.headers = status, code, param, kind, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


UPSTREAM_HEAD_BYTES = 64 * 1024  # of an expert's error answer, read to summarise it
UPSTREAM_MESSAGE_CHARS = 200  # of an expert's own 4xx error message, in the summary


async def upstream_head(resp: httpx.Response) -> bytes:
    """The first UPSTREAM_HEAD_BYTES of a streamed answer's body (an expert cannot make the gateway hold more)."""
    got = b""
    async for chunk in resp.aiter_bytes():
        got += chunk
        if len(got) >= UPSTREAM_HEAD_BYTES:
            break
    return got[:UPSTREAM_HEAD_BYTES]


def _short(v: object, pattern: str = r"[A-Za-z0-9_.\-]{1,64}") -> str | None:
    return v if isinstance(v, str) and re.fullmatch(pattern, v) else None


def upstream_status(expert: str, status: int, body: bytes) -> GatewayError:
    """An expert's error answer, summarised: a 5xx is a 502 naming the expert and its status only (its body may
    hold a traceback or internal names; the gateway logs it); a 4xx keeps its status and, when its body has
    OpenAI's error shape, the first line of its message (at most UPSTREAM_MESSAGE_CHARS), its `code` and `param`
    where they are short names. Nothing else of the body reaches the client."""
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
    if status >= 500:
        return GatewayError(502, f"expert {expert} answered {status} {reason}", "expert_error", kind="server_error")
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):  # not JSON, or not an object
        err = None
    err = err if isinstance(err, dict) else {}
    said = err.get("message") if isinstance(err.get("message"), str) else ""
    said = " ".join(said.strip().splitlines()[:1])
    said = "".join(c if c.isprintable() else " " for c in said)
    if len(said) > UPSTREAM_MESSAGE_CHARS:
        said = said[:UPSTREAM_MESSAGE_CHARS - 3] + "..."
    return GatewayError(status, f"expert {expert} refused the request ({status} {reason})" + (f": {said}" if said
                        else ""), _short(err.get("code")) or "expert_rejected", _short(err.get("param")))
