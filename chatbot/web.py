"""HTTP-level policy for the app: who may frame it, who may use it, and who they are.

Gradio sets no X-Frame-Options or CSP ``frame-ancestors`` and its login cookie fails inside an
iframe where third-party cookies are blocked. So this pure ASGI middleware, wrapped around the
whole FastAPI app, does three things on every request:

1. every response carries ``Content-Security-Policy: frame-ancestors <server.allowed_embedders>;
   img-src 'self' data:``: a browser refuses to show the app inside a page of any other origin,
   and refuses any image from another origin, should markup from a document or an answer ever
   get past the sanitiser (chatbot/render.py): an image URL is how a poisoned document would
   make the browser send data to a third party without a click;
2. authentication without cookies: ``password`` checks HTTP Basic credentials on each request
   (the browser re-sends them itself, also inside an iframe), with wrong passwords slowed down
   and locked out (chatbot/limits.py); ``trusted_header`` believes the identity header set by
   the intranet's SSO proxy, but only from ``server.trusted_proxies``;
3. the identity it established is passed on as ``x-ragtune-user``, after deleting any such
   header the client sent, so the app can scope conversations to it without being spoofed;
4. with ``chat.anonymous_uploads`` off and no sign-in, Gradio's upload route is refused, so no
   visitor can put files on the server's disk at all;
5. the OpenAI-compatible API (``/v1``, chatbot/api.py): with ``server.api_keys`` set it checks
   its own Bearer keys, so this middleware does not ask those requests for a password; its
   refusals on /v1 are in OpenAI's error shape, so that API clients can read them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from chatbot.limits import LoginGuard, lockout_message
from core.settings import LimitSettings, ServerSettings

IDENTITY_HEADER = "x-ragtune-user"
_OPEN_PATHS = {"/healthz"}  # probes carry no credentials
_UPLOAD_PATH = "/gradio_api/upload"
API_PREFIX = "/v1/"
IMAGE_POLICY = "img-src 'self' data:"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def frame_headers(server: ServerSettings) -> list[tuple[bytes, bytes]]:
    ancestors = " ".join(server.allowed_embedders) or "'none'"
    headers = [(b"content-security-policy", f"frame-ancestors {ancestors}; {IMAGE_POLICY}".encode())]
    if server.allowed_embedders == ["'self'"]:
        headers.append((b"x-frame-options", b"SAMEORIGIN"))  # for browsers without CSP level 2
    return headers


class AccessMiddleware:
    def __init__(self, app: Callable[..., Awaitable[None]], server: ServerSettings,
                 limits: LimitSettings | None = None, anonymous_uploads: bool = True):
        self.app = app
        self.server = server
        self.extra_headers = frame_headers(server)
        self.trusted_header = server.trusted_header.lower().encode()
        self.logins = LoginGuard(limits or LimitSettings())
        self.uploads_refused = server.auth == "none" and not anonymous_uploads
        self.api_checks_keys = bool(server.api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers", []) if k != IDENTITY_HEADER.encode()]
        path = scope.get("path", "")
        root = scope.get("root_path", "") or self.server.root_path
        relative = path[len(root):] if root and path.startswith(root) else path
        user: str | None = None
        api = relative.startswith(API_PREFIX)
        if relative not in _OPEN_PATHS and self.server.auth != "none" and not (api and self.api_checks_keys):
            user, refusal = await self._authenticate(scope, dict(headers))
            if refusal is not None:
                await self._refuse(scope, send, *refusal, api=api)
                return
        if self.uploads_refused and relative.rstrip("/") == _UPLOAD_PATH:
            await self._refuse(scope, send, 403, "Adding documents needs sign-in on this server (chat.anonymous_uploads).")
            return
        if user:
            headers.append((IDENTITY_HEADER.encode(), user.encode()))
        scope = dict(scope, headers=headers)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message, headers=[*message.get("headers", []),
                                                 *(h for h in self.extra_headers if h[0] not in names)])
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _authenticate(
        self, scope: Scope, headers: dict[bytes, bytes]
    ) -> tuple[str | None, tuple[int, str, float | None] | None]:
        if self.server.auth == "trusted_header":
            client = (scope.get("client") or ("", 0))[0]
            value = headers.get(self.trusted_header, b"").decode("latin-1").strip()
            if client not in self.server.trusted_proxies:
                return None, (403, "This app is reached through the intranet's sign-in proxy only.", None)
            if not value:
                return None, (401, f"The sign-in proxy sent no {self.server.trusted_header} header.", None)
            return value, None
        # password: HTTP Basic on every request, no cookie needed inside an iframe
        raw = headers.get(b"authorization", b"").decode("latin-1")
        if not raw.lower().startswith("basic "):
            return None, (401, "Sign in to use ragtune.", None)  # not an attempt: the browser asks first
        try:
            name, _, password = base64.b64decode(raw[6:]).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            name, password = "", ""
        keys = [f"address:{(scope.get('client') or ('', 0))[0]}", f"name:{name}"]
        locked = self.logins.locked(keys)
        if locked is not None:
            return None, (429, lockout_message(locked), locked)
        expected = self.server.users.get(name)
        if expected is not None and hmac.compare_digest(password.encode(), expected.encode()):
            self.logins.succeeded(keys)
            return name, None
        await asyncio.sleep(self.logins.failed(keys))  # other requests go on meanwhile
        return None, (401, "Wrong user name or password.", None)

    async def _refuse(self, scope: Scope, send: Send, status: int, message: str, retry_after: float | None = None,
                      api: bool = False) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        kind = b"application/json" if api else b"text/plain; charset=utf-8"
        headers = [(b"content-type", kind), *self.extra_headers]
        if status == 401 and self.server.auth == "password":
            headers.append((b"www-authenticate", b'Basic realm="ragtune", charset="UTF-8"'))
        if retry_after is not None:
            headers.append((b"retry-after", str(max(1, int(retry_after + 0.999))).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if api:  # OpenAI's error shape
            code = {401: "invalid_api_key", 403: "permission_denied", 429: "rate_limit_exceeded"}.get(status, "refused")
            kind_name = "rate_limit_exceeded" if status == 429 else "invalid_request_error"
            message = json.dumps({"error": {"message": message, "type": kind_name, "code": code}})
        await send({"type": "http.response.body", "body": message.encode()})
