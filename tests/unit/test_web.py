"""AccessMiddleware: framing policy, cookie-free auth, and an identity the client cannot forge."""

from __future__ import annotations

import base64

import httpx
import pytest
from fastapi import FastAPI, Request

from chatbot.web import IDENTITY_HEADER, AccessMiddleware
from core.settings import LimitSettings, ServerSettings


def make_app(limits: LimitSettings | None = None, **server) -> FastAPI:
    app = FastAPI()

    @app.get("/whoami")
    def whoami(request: Request) -> dict:
        return {"user": request.headers.get(IDENTITY_HEADER)}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models(request: Request) -> dict:  # stands in for chatbot/api.py, which checks its own keys
        return {"user": request.headers.get(IDENTITY_HEADER), "authorization": request.headers.get("authorization")}

    app.add_middleware(AccessMiddleware, server=ServerSettings(**server), limits=limits)
    return app


async def get(app: FastAPI, path: str, client_ip: str = "127.0.0.1", **headers: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client_ip, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://ragtune.test") as client:
        return await client.get(path, headers=headers)


@pytest.mark.anyio
async def test_frame_ancestors_default_to_self_and_follow_settings() -> None:
    default = await get(make_app(), "/whoami")
    assert default.headers["content-security-policy"] == "frame-ancestors 'self'; img-src 'self' data:"
    assert default.headers["x-frame-options"] == "SAMEORIGIN"
    intranet = await get(make_app(allowed_embedders=["'self'", "https://intranet.example"]), "/whoami")
    assert intranet.headers["content-security-policy"] == "frame-ancestors 'self' https://intranet.example; img-src 'self' data:"
    assert "x-frame-options" not in intranet.headers  # it would forbid the allowed intranet


@pytest.mark.anyio
async def test_identity_header_from_the_client_is_never_believed() -> None:
    response = await get(make_app(), "/whoami", **{IDENTITY_HEADER: "admin"})
    assert response.json() == {"user": None}


@pytest.mark.anyio
async def test_trusted_header_only_from_the_proxy() -> None:
    app = make_app(auth="trusted_header", trusted_header="X-Forwarded-User", trusted_proxies=["10.1.2.3"])
    from_proxy = await get(app, "/whoami", client_ip="10.1.2.3", **{"X-Forwarded-User": "alice"})
    assert from_proxy.json() == {"user": "alice"}
    spoofed = await get(app, "/whoami", client_ip="10.9.9.9", **{"X-Forwarded-User": "alice"})
    assert spoofed.status_code == 403 and "proxy" in spoofed.text
    assert spoofed.headers["content-security-policy"].startswith("frame-ancestors")
    missing = await get(app, "/whoami", client_ip="10.1.2.3")
    assert missing.status_code == 401
    probe = await get(app, "/healthz", client_ip="10.9.9.9")
    assert probe.status_code == 200  # liveness probes carry no identity


@pytest.mark.anyio
async def test_password_auth_is_basic_on_every_request() -> None:
    app = make_app(auth="password", users={"bob": "s3cret"})
    anonymous = await get(app, "/whoami")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic")
    wrong = await get(app, "/whoami", authorization="Basic " + base64.b64encode(b"bob:nope").decode())
    assert wrong.status_code == 401
    right = await get(app, "/whoami", authorization="Basic " + base64.b64encode(b"bob:s3cret").decode())
    assert right.json() == {"user": "bob"}


@pytest.mark.anyio
async def test_wrong_passwords_are_locked_out_with_the_wait_time() -> None:
    app = make_app(limits=LimitSettings(login_failures=3, login_delay_s=0, login_lockout_s=120),
                   auth="password", users={"bob": "s3cret", "eve": "x"})
    basic = lambda pair: "Basic " + base64.b64encode(pair).decode()  # noqa: E731
    for _ in range(3):
        assert (await get(app, "/whoami", authorization=basic(b"bob:guess"))).status_code == 401
    locked = await get(app, "/whoami", authorization=basic(b"bob:s3cret"))  # even the right one, now
    assert locked.status_code == 429 and "try again in 120 s" in locked.text
    assert locked.headers["retry-after"] == "120"
    elsewhere = await get(app, "/whoami", client_ip="10.0.0.9", authorization=basic(b"eve:x"))
    assert elsewhere.json() == {"user": "eve"}  # another address and name are not locked


def test_settings_refuse_incomplete_auth_and_bad_origins() -> None:
    with pytest.raises(ValueError, match="server.users"):
        ServerSettings(auth="password")
    with pytest.raises(ValueError, match="allowed_embedders"):
        ServerSettings(allowed_embedders=["intranet.example"])


@pytest.mark.anyio
async def test_v1_checks_its_own_keys_and_is_refused_in_openais_shape() -> None:
    key = "k" * 20
    users = {"alice": "pw"}
    with_keys = make_app(auth="password", users=users, api_keys=[{"key": key, "user": "bot"}])
    api = await get(with_keys, "/v1/models", authorization=f"Bearer {key}")
    assert api.status_code == 200 and api.json() == {"user": None, "authorization": f"Bearer {key}"}  # to the router
    assert (await get(with_keys, "/whoami", authorization=f"Bearer {key}")).status_code == 401  # the page still asks
    no_keys = await get(make_app(auth="password", users=users), "/v1/models", authorization=f"Bearer {key}")
    assert no_keys.status_code == 401 and no_keys.json()["error"]["code"] == "invalid_api_key"  # server.auth applies
    basic = base64.b64encode(b"alice:pw").decode()
    signed_in = await get(make_app(auth="password", users=users), "/v1/models", authorization=f"Basic {basic}")
    assert signed_in.json()["user"] == "alice"
