"""Conversation downloads from the page: short-lived signed grant URLs on the FastAPI app.

The page never hands out a server path and never serves a file the client names. When a
conversation is open, the page shows links ``download/<grant>``; a grant is
``<payload>.<HMAC>`` over (owner, conversation id, format, expiry), signed with a key derived
from the server's persistent secret (chatbot/identity.py). The route checks the signature and
the expiry, then renders the export from memory *for that owner* (``ChatMemory.export``), so a
grant opens one conversation of one owner, for ``GRANT_TTL_S`` seconds, and nothing else. Under
``server.auth`` with sign-in, the signed-in user must also be the grant's owner.

Hand-written on hmac rather than itsdangerous: twenty lines, and no new dependency.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from chatbot.identity import USER_PREFIX
from chatbot.memory import ChatMemory, ConversationNotFound, export_markdown

GRANT_TTL_S = 300  # long enough to click, short enough that a copied link soon opens nothing
Format = Literal["json", "md"]
FORMATS: tuple[Format, ...] = ("json", "md")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class DownloadGrants:
    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time):
        # A key of its own: a grant can never be mistaken for a browser id, nor the reverse.
        self._key = hmac.new(secret, b"download-grant", hashlib.sha256).digest()
        self.clock = clock

    def issue(self, owner: str, conversation_id: str, fmt: Format, ttl_s: float = GRANT_TTL_S) -> str:
        payload = _b64(json.dumps([owner, conversation_id, fmt, int(self.clock() + ttl_s)]).encode())
        return f"{payload}.{_b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest()[:20])}"

    def check(self, grant: str) -> tuple[str, str, Format] | None:
        """(owner, conversation id, format) for a valid, unexpired grant; None for anything else."""
        if not isinstance(grant, str) or len(grant) > 512 or grant.count(".") != 1:
            return None
        payload, mac = grant.split(".")
        try:
            expected = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()[:20]
            if not hmac.compare_digest(_unb64(mac), expected):
                return None
            owner, conversation_id, fmt, expires = json.loads(_unb64(payload))
        except (ValueError, TypeError):
            return None
        if fmt not in FORMATS or self.clock() > expires:
            return None
        return owner, conversation_id, fmt


def export_response(memory: ChatMemory, owner: str, conversation_id: str, fmt: Format) -> Response:
    """The export as a file download (raises ConversationNotFound)."""
    export = memory.export(owner, conversation_id)
    name = f"ragtune-conversation-{conversation_id[:12]}.{fmt}"
    headers = {"content-disposition": f'attachment; filename="{name}"', "cache-control": "no-store"}
    if fmt == "json":
        return JSONResponse(export, headers=headers)
    return PlainTextResponse(export_markdown(export), headers=headers, media_type="text/markdown; charset=utf-8")


def build_download_router(memory: ChatMemory, grants: DownloadGrants, identity_header: str) -> APIRouter:
    router = APIRouter()

    @router.get("/download/{grant}", include_in_schema=False)
    def download(grant: str, request: Request) -> Response:
        checked = grants.check(grant)
        signed_in = request.headers.get(identity_header)
        if checked is None or (signed_in and checked[0] != USER_PREFIX + signed_in):
            return PlainTextResponse("This download link is not valid or has expired: open the conversation "
                                     "and use its Download link again.", status_code=404)
        owner, conversation_id, fmt = checked
        try:
            return export_response(memory, owner, conversation_id, fmt)
        except ConversationNotFound:
            return PlainTextResponse("That conversation no longer exists.", status_code=404)

    return router
