"""Who is asking: the signed-in user, else a browser id this server minted and signed.

Without sign-in (``server.auth: none``) a browser's id is its only credential, so:

- ids are minted here, never chosen by the client: ``<random>.<HMAC of it>``; anything else a
  client sends (a made-up string, a file reference, a number) is not an id;
- the HMAC key is a secret kept under the data directory (created once, mode 0600), so the id a
  browser stored before a restart is still valid after it, and the page lists its past
  conversations again; gr.BrowserState's own encryption key is derived from the same secret
  (with a random key per start, as by default, a restarted server could not read it back);
- conversations are stored under a digest of the id, not the id itself: a copy of the chat
  database does not contain the credentials that open it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

USER_PREFIX = "user:"
BROWSER_PREFIX = "browser:"
_RANDOM_BYTES = 18
_MAC_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def load_or_create_secret(path: Path) -> bytes:
    """The secret in ``path``, created (32 random bytes, readable by this user only) if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = bytes.fromhex(path.read_text().strip())
        if len(secret) < 16:
            raise ValueError(f"{path}: the server secret is shorter than 16 bytes; delete it to make a new one")
        return secret
    secret = secrets.token_bytes(32)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret.hex())
        file.flush()
        os.fsync(file.fileno())
    return secret


class Identities:
    """Mints browser ids and turns ids (or signed-in names) into conversation owners."""

    def __init__(self, secret: bytes):
        self._secret = secret

    @classmethod
    def from_file(cls, path: Path) -> "Identities":
        return cls(load_or_create_secret(path))

    def _mac(self, purpose: str, data: bytes) -> bytes:
        return hmac.new(self._secret, purpose.encode() + b"\0" + data, hashlib.sha256).digest()

    @property
    def browser_state_secret(self) -> str:
        """gr.BrowserState's encryption key: sent to the page, so derived, never the secret itself."""
        return _b64(self._mac("browser-state", b""))

    def mint(self) -> str:
        random = secrets.token_bytes(_RANDOM_BYTES)
        return f"{_b64(random)}.{_b64(self._mac('id', random)[:_MAC_BYTES])}"

    def browser_owner(self, token: object) -> str | None:
        """The owner for a browser id this server minted; None for anything else."""
        if not isinstance(token, str) or len(token) > 64 or token.count(".") != 1:
            return None
        random_part, mac_part = token.split(".")
        try:
            random = base64.urlsafe_b64decode(random_part + "=" * (-len(random_part) % 4))
            mac = base64.urlsafe_b64decode(mac_part + "=" * (-len(mac_part) % 4))
        except (ValueError, TypeError):
            return None
        if len(random) != _RANDOM_BYTES or not hmac.compare_digest(mac, self._mac("id", random)[:_MAC_BYTES]):
            return None
        return BROWSER_PREFIX + self._mac("owner", random).hex()[:32]

    def owner(self, signed_in_user: str | None, token: object) -> str | None:
        """The signed-in user (set by AccessMiddleware, never by the client), else the browser id's
        owner, else None (no identity yet: the caller mints one)."""
        if signed_in_user:
            return USER_PREFIX + signed_in_user
        return self.browser_owner(token)
