"""ragtune as an OpenAI-compatible endpoint: ``/v1/models`` and ``/v1/chat/completions``.

Any client of the chat-completions protocol (the ``openai`` package, LangChain's ``ChatOpenAI``,
Open WebUI, LibreChat, IDE plugins) can use ragtune: the models are the answer modes
(``ragtune-hybrid``, ``ragtune-rag``, ``ragtune-finetuned``, ``ragtune-base``, from core.modes).

How a request maps onto ragtune's conversation:

- the last message must be the user's: it is the question; earlier user/assistant pairs are the
  history (``chain.stream(history=...)``), not the server's memory; system messages are ignored
  (ragtune's prompt is its own: a client's system prompt must not override the citation rules);
- extension field ``conversation_id``: continue a stored conversation instead (its history from
  memory; earlier request messages are then ignored). Every answer is recorded, and the response
  says in which conversation (``conversation_id``), so ``/v1/conversations`` can export or
  delete it;
- ``stream: true``: server-sent events in OpenAI's chunk shape, ending with ``data: [DONE]``;
- the sources come back twice: as the extension field ``sources`` (n, title, source, page,
  section, score, cited) on the response or the last chunk, and as numbered references at the end
  of the text (``Sources:\\n[1] title (heading), source``), so that a plain client shows them too.
- OpenAI's sampling parameters (temperature, max_tokens, ...) are accepted and ignored: the
  answer settings are the server's (``llm``), as the page's are.

Identity, scopes and limits are the page's: with ``server.api_keys`` set, ``Authorization: Bearer
<key>`` is required on /v1 (401 otherwise) and the key acts as its ``user``, exactly as if that
user had signed in (``user:<name>``: the same conversations, document scope and rate limits);
wrong keys from an address are slowed down and locked out as wrong passwords are (``limits.login_*``).
Without keys, /v1 follows ``server.auth`` (AccessMiddleware signs the user in); with ``auth:
none`` an anonymous client gets a fresh identity per request (it can send history, but cannot
continue or list stored conversations: nothing would tie two requests together). Every question
passes ``chatbot.limits.QuestionLimiter`` (per identity and per address) before any work, and
generation shares the chain's slots (``chat.generation_concurrency``) with the page: the API adds
no concurrency. Errors use OpenAI's shape ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatbot.chain import Answer, InvalidQuestion
from chatbot.downloads import FORMATS, export_response
from chatbot.limits import LoginGuard, RateLimited, lockout_message
from chatbot.memory import ConversationNotFound
from core.modes import MODES

if TYPE_CHECKING:
    from chatbot.runtime import Runtime

log = logging.getLogger(__name__)
MODEL_PREFIX = "ragtune-"
SOURCE_FIELDS = ("n", "title", "source", "page", "section", "score", "cited")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str, code: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.retry_after = status, message, type_, code, retry_after

    def response(self) -> JSONResponse:
        headers = {"retry-after": str(max(1, math.ceil(self.retry_after)))} if self.retry_after is not None else None
        return JSONResponse({"error": {"message": self.message, "type": self.type, "code": self.code}},
                            status_code=self.status, headers=headers)


def _bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self, where: str) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad_request(f"{where}: only text content is supported (got a {part.get('type')!r} part)",
                                   "unsupported_content")
            parts.append(part["text"])
        return "\n".join(parts)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # temperature, max_tokens, ...: the server's settings apply
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    conversation_id: str | None = Field(None, max_length=64)


def mode_of(model: str) -> str:
    mode = model[len(MODEL_PREFIX):] if model.startswith(MODEL_PREFIX) else None
    if mode not in MODES:
        raise ApiError(400, f"The model {model!r} does not exist; choose one of "
                       f"{', '.join(MODEL_PREFIX + m for m in MODES)} (GET /v1/models).",
                       "invalid_request_error", "model_not_found")
    return mode


def question_and_history(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """The last user message, and the user/assistant pairs before it (system messages left out)."""
    turns = [(i, m) for i, m in enumerate(messages) if m.role in ("user", "assistant")]
    if not turns or turns[-1][1].role != "user":
        raise _bad_request("messages: the last message must be the user's question.", "invalid_messages")
    *earlier, (last_index, last) = turns
    history: list[tuple[str, str]] = []
    pending: str | None = None
    for index, message in earlier:
        text = message.text(f"messages[{index}]")
        if message.role == "user":
            pending = text  # two user messages in a row: the later one is the question of its turn
        elif pending is not None:
            history.append((pending, text))
            pending = None
    return last.text(f"messages[{last_index}]"), history


def references(sources: list[dict[str, Any]]) -> str:
    """Numbered references for the end of the text, so that a plain client shows the sources."""
    if not sources:
        return ""
    lines = []
    for s in sources:
        heading = (s.get("section") or "").split(" > ")[-1]  # chunks of one document differ by heading
        where = (f" ({heading})" if heading and heading != s["title"] else "") + (f", page {s['page']}" if s.get("page") else "")
        lines.append(f"[{s['n']}] {s['title']}{where}, {s['source']}")
    return "\n\nSources:\n" + "\n".join(lines)


def source_fields(answer: Answer) -> list[dict[str, Any]]:
    return [{k: s[k] for k in SOURCE_FIELDS} for s in answer.sources_as_dicts()]


def build_api_router(runtime: "Runtime", identity_header: str) -> APIRouter:
    settings = runtime.settings
    chain, memory, identities, limiter = runtime.chain, runtime.memory, runtime.identities, runtime.limiter
    api_keys = settings.server.api_keys
    wrong_keys = LoginGuard(settings.limits)  # wrong keys are slowed down and locked out like passwords
    router = APIRouter(prefix="/v1")

    async def caller(request: Request) -> tuple[str | None, list[str]]:
        """(owner or None for an anonymous caller, rate-limit keys)."""
        address = f"address:{(request.client.host if request.client else '')}"
        if api_keys:
            raw = request.headers.get("authorization", "")
            token = raw[7:].strip() if raw.lower().startswith("bearer ") else ""
            if not token:
                raise ApiError(401, "No API key: send 'Authorization: Bearer <key>' with a key from server.api_keys.",
                               "invalid_request_error", "invalid_api_key")
            locked = wrong_keys.locked([address])
            if locked is not None:
                raise ApiError(429, lockout_message(locked).replace("passwords", "API keys"), "rate_limit_exceeded",
                               "rate_limit_exceeded", locked)
            for key in api_keys:  # compare_digest on each: no timing hint which key nearly matched
                if hmac.compare_digest(token.encode(), key.key.encode()):
                    wrong_keys.succeeded([address])
                    owner = identities.owner(key.user, None)
                    assert owner is not None
                    return owner, [owner]
            await asyncio.sleep(wrong_keys.failed([address]))  # other requests go on meanwhile
            raise ApiError(401, "This API key is not valid: use a key from server.api_keys.",
                           "invalid_request_error", "invalid_api_key")
        owner = identities.owner(request.headers.get(identity_header) or None, None)  # signed in by the middleware
        return owner, [k for k in (owner, address) if k]

    async def identified(request: Request) -> str:
        owner, _ = await caller(request)
        if owner is None:
            raise ApiError(403, "Stored conversations need an identity: an API key (server.api_keys) or sign-in "
                           "(server.auth).", "permission_error", "identity_required")
        return owner

    async def handled(call) -> Response:
        try:
            return await call()
        except ApiError as error:
            return error.response()

    @router.get("/models")
    async def models(request: Request) -> Response:
        async def call() -> Response:
            await caller(request)
            return JSONResponse({"object": "list", "data": [
                {"id": MODEL_PREFIX + m, "object": "model", "created": 0, "owned_by": "ragtune"} for m in MODES]})
        return await handled(call)

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        async def call() -> Response:
            owner, limit_keys = await caller(request)
            try:
                body = ChatRequest.model_validate(await request.json())
            except (ValidationError, ValueError) as exc:
                problems = ("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                            if isinstance(exc, ValidationError) else "the body is not JSON")
                raise _bad_request(f"Invalid request: {problems}") from exc
            mode = mode_of(body.model)
            question, history = question_and_history(body.messages)
            try:
                question = chain.validate(question)
            except InvalidQuestion as refusal:
                raise _bad_request(str(refusal), "invalid_question") from refusal
            if body.conversation_id is not None:
                if owner is None or not memory.exists(owner, body.conversation_id):
                    raise ApiError(404, f"No conversation {body.conversation_id!r} for this identity"
                                   + ("" if owner else " (an anonymous caller has no stored conversations)") + ".",
                                   "invalid_request_error", "conversation_not_found")
                history_arg = None  # the stored conversation's, from memory
            else:
                history_arg = history
            if owner is None:
                owner = identities.owner(None, identities.mint())
                assert owner is not None
            try:
                limiter.admit(limit_keys or [owner])
            except RateLimited as wait:
                raise ApiError(429, str(wait), "rate_limit_exceeded", "rate_limit_exceeded", wait.wait_s) from wait
            events = chain.stream(question, owner=owner, conversation_id=body.conversation_id, mode=mode,
                                  history=history_arg)
            completion_id = f"chatcmpl-{uuid.uuid4().hex}"
            model = MODEL_PREFIX + mode
            if body.stream:
                return StreamingResponse(_sse(events, completion_id, model, lambda: limiter.release(limit_keys or [owner])),
                                         media_type="text/event-stream", headers={"cache-control": "no-store"})
            try:
                answer = await run_in_threadpool(_last_answer, events)
            finally:
                limiter.release(limit_keys or [owner])
            text = answer.text + references(source_fields(answer))
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": _usage(answer), **_extensions(answer),
            })
        return await handled(call)

    @router.get("/conversations")
    async def conversations(request: Request) -> Response:
        async def call() -> Response:
            owner = await identified(request)
            return JSONResponse({"object": "list", "data": [
                {"id": c.id, "object": "conversation", "title": c.title, "updated": c.updated}
                for c in memory.list(owner)]})
        return await handled(call)

    @router.get("/conversations/{conversation_id}")
    async def export(conversation_id: str, request: Request, format: str = "json") -> Response:  # noqa: A002
        async def call() -> Response:
            owner = await identified(request)
            if format not in FORMATS:
                raise _bad_request(f"format: choose one of {', '.join(FORMATS)}.", "invalid_format")
            try:
                return export_response(memory, owner, conversation_id, format)  # type: ignore[arg-type]
            except ConversationNotFound:
                raise _not_found(conversation_id) from None
        return await handled(call)

    @router.delete("/conversations/{conversation_id}")
    async def delete(conversation_id: str, request: Request) -> Response:
        async def call() -> Response:
            owner = await identified(request)
            if not memory.delete(owner, conversation_id):
                raise _not_found(conversation_id)
            return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})
        return await handled(call)

    return router


def _not_found(conversation_id: str) -> ApiError:
    return ApiError(404, f"No conversation {conversation_id!r} for this identity.", "invalid_request_error",
                    "conversation_not_found")


def _last_answer(events: Iterator) -> Answer:
    for event in events:
        if event.answer is not None:
            return event.answer
    raise AssertionError("the chain ended without an answer")


def _usage(answer: Answer) -> dict[str, int]:
    prompt = int(answer.timings.get("prompt_tokens", 0))
    completion = int(answer.timings.get("tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extensions(answer: Answer) -> dict[str, Any]:
    """ragtune's fields beside OpenAI's: clients that know them get structure, others ignore them."""
    return {"sources": source_fields(answer), "conversation_id": answer.conversation_id,
            "ragtune": {"mode": answer.mode, "answer": answer.text, "cited": answer.cited, "query": answer.query,
                        "citations_attributed": answer.citations_attributed, "refused": answer.refused,
                        "timings": answer.timings}}


def _sse(events: Iterator, completion_id: str, model: str, release) -> Iterator[str]:
    """OpenAI's chunk stream: a role chunk, a chunk per token, the references and the sources in
    the last chunk (finish_reason 'stop'), then ``[DONE]``. Runs in Starlette's thread pool."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        for event in events:
            if event.answer is None:
                yield chunk({"content": event.text})
                continue
            answer = event.answer
            yield chunk({"content": references(source_fields(answer))}, "stop", usage=_usage(answer),
                        **_extensions(answer))
        yield "data: [DONE]\n\n"
    except Exception:  # noqa: BLE001 - the status line is sent: say so in the stream, OpenAI-style
        log.exception("a streamed API answer failed")
        yield f"data: {json.dumps({'error': {'message': 'The answer failed on the server.', 'type': 'server_error', 'code': 'internal_error'}})}\n\n"
    finally:
        release()
