"""The web app: FastAPI with the Gradio chat mounted at ``/`` and ``/healthz`` beside it.

The UI is thin: callbacks translate between Gradio components and the services (chain,
memory, identities, limits, uploads) and hold no business logic.

What a client sends is never trusted to name anything on the server (docs/security.md):

- The chat is shown from the server's memory by conversation id; the Chatbot's value is an
  output only, never an input, so a client's copy of the history cannot be turned into file
  reads. Every event's inputs are plain values that are validated (question, mode, browser id);
  conversation ids and message ids are server-side ``gr.State``.
- Gradio's own check of client-supplied file paths runs only for a Blocks that has "launched",
  which ``mount_gradio_app`` never marks: ``create_app`` does, so a path in any input is refused
  unless Gradio received that file in an upload. The upload event also accepts only files in
  Gradio's record of received uploads.
- Identity: the signed-in user, else a browser id minted and signed by this server, kept in the
  browser (gr.BrowserState, key derived from the persistent secret: it survives restarts).
  The question box opens only once the page's load event has given the browser its id, so no
  question is ever stored under a throw-away id; an API client without one gets one minted,
  returned in the outputs and kept for its session.
- Each question passes the rate limits before it may take a queue slot (the chat event's
  validator); the REST route that would skip the queue is closed (``api_open=False``).
- Downloads of a conversation go through short-lived grant URLs signed for its owner
  (chatbot/downloads.py), never a path; the Compare tab runs chatbot/compare.py's service in the
  same queue as the chat. The OpenAI-compatible API (chatbot/api.py) is mounted beside the page.
"""

# No ``from __future__ import annotations`` here: Gradio reads gr.Request / gr.LikeData from
# the callbacks' real annotations to inject them.
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from fastapi import FastAPI

from core.modes import MODES
from chatbot.api import build_api_router
from chatbot.chain import Answer, InvalidQuestion
from chatbot.compare import COMPARE_ORDER, REPORT_PATH, CompareService, ModeResult, favoured_note
from chatbot.downloads import GRANT_TTL_S, DownloadGrants, build_download_router
from chatbot.identity import load_or_create_secret
from chatbot.limits import RateLimited
from chatbot.memory import INTERRUPTED, INTERRUPTED_TEXT, ConversationNotFound
from chatbot.render import render_list, render_markdown, render_plain, render_sources
from chatbot.web import IDENTITY_HEADER, AccessMiddleware

if TYPE_CHECKING:
    from chatbot.runtime import Runtime

log = logging.getLogger(__name__)


def signed_in_user(request: gr.Request | None) -> str | None:
    """The user AccessMiddleware established (a client's own header of that name is deleted)."""
    headers = getattr(request, "headers", None) if request is not None else None
    return (headers.get(IDENTITY_HEADER) if headers is not None else None) or None


def opening_mode(configured: str, has_adapter: bool) -> str:
    """The mode the page opens in: ``chat.default_mode``, where 'auto' means hybrid with an adapter."""
    if configured == "auto":
        return "hybrid" if has_adapter else "rag"
    return configured


def recover_after_restart(runtime: "Runtime") -> None:
    """At start: mark answers a stop interrupted, finish or roll back interrupted uploads."""
    marked = runtime.memory.mark_interrupted(before=time.time())
    if marked:
        log.warning("%d answers were interrupted by the last stop; they are marked as such", marked)
    for line in runtime.uploads.recover():
        log.warning("upload recovery: %s", line)


def build_blocks(runtime: "Runtime", grants: DownloadGrants | None = None) -> gr.Blocks:
    """``grants``: sign download links (the FastAPI app serves them); None (Gradio's own server,
    --share) offers no downloads."""
    settings = runtime.settings
    chain, memory, identities, limiter = runtime.chain, runtime.memory, runtime.identities, runtime.limiter
    default_mode = opening_mode(settings.chat.default_mode, chain.models.has_adapter)
    comparer = CompareService(chain)
    uploads_offered = settings.server.auth != "none" or settings.chat.anonymous_uploads

    # -- identity ------------------------------------------------------------------------------
    def known_identity(token: Any, session_token: Any, request: gr.Request | None) -> tuple[str | None, str | None]:
        """(owner, browser id) from what is already established, without minting."""
        for candidate in (token, session_token):
            if identities.browser_owner(candidate):
                return identities.owner(signed_in_user(request), candidate), candidate
        return identities.owner(signed_in_user(request), None), None

    def identity(token: Any, session_token: Any, request: gr.Request | None) -> tuple[str, str]:
        owner, token = known_identity(token, session_token, request)
        if token is None:
            token = identities.mint()
            owner = owner or identities.owner(None, token)
        assert owner is not None
        return owner, token

    def limit_keys(token: Any, session_token: Any, request: gr.Request | None) -> list[str]:
        owner, _ = known_identity(token, session_token, request)
        session = getattr(request, "session_hash", None)
        return [k for k in (owner, f"session:{session}" if session else None) if k]

    # -- views from memory ---------------------------------------------------------------------
    def conversation_choices(owner: str) -> list[tuple[str, str]]:
        return [(c.title, c.id) for c in memory.list(owner)]

    def conversation_view(owner: str, conversation_id: str) -> tuple[list[dict], list[int | None], str]:
        chat: list[dict] = []
        ids: list[int | None] = []
        last_sources: list[dict] | None = None
        for m in memory.messages(owner, conversation_id):
            if m.role == "assistant" and m.status == INTERRUPTED:
                chat.append({"role": "assistant", "content": render_plain(f"⚠ {m.content}")})
                ids.append(None)
                continue
            chat.append({"role": m.role, "content": render_markdown(m.content)})
            ids.append(m.id if m.role == "assistant" else None)
            if m.role == "assistant":
                last_sources = m.sources
            elif m.status == INTERRUPTED:  # a question whose answer a stop cut off, asked again later
                chat.append({"role": "assistant", "content": render_plain(f"⚠ {INTERRUPTED_TEXT}")})
                ids.append(None)
        return chat, ids, render_sources(last_sources) if last_sources is not None else ""

    # -- events --------------------------------------------------------------------------------
    def on_load(token: Any, session_token: Any, request: gr.Request):
        owner, token = identity(token, session_token, request)
        ready = gr.update(interactive=True)
        return (token, token, gr.update(choices=conversation_choices(owner), value=None),
                gr.update(interactive=True, placeholder="Ask about the documents…"), ready,
                gr.update(interactive=True, placeholder="One question for every mode…"), ready)

    def admit_question(question: Any, mode: Any, conversation_id: Any, token: Any, session_token: Any,
                       request: gr.Request):
        """Runs before the question may enter the queue: bad input and rate limits are refused here."""
        fine = gr.validate(True, "")
        try:
            chain.validate(question)
        except InvalidQuestion as refusal:
            return [gr.validate(False, str(refusal)), fine, fine, fine, fine]
        if mode not in MODES:
            return [fine, gr.validate(False, f"Choose one of {', '.join(MODES)}."), fine, fine, fine]
        try:
            limiter.admit(limit_keys(token, session_token, request))
        except RateLimited as wait:
            return [gr.validate(False, str(wait)), fine, fine, fine, fine]
        return [fine] * 5

    def on_submit(question: str, mode: str, conversation_id: str | None, token: Any, session_token: Any,
                  request: gr.Request):
        keys = limit_keys(token, session_token, request)
        try:
            yield from answer_question(question, mode, conversation_id, token, session_token, request)
        finally:
            limiter.release(keys)

    def answer_question(question, mode, conversation_id, token, session_token, request):
        owner, token = identity(token, session_token, request)
        if conversation_id and memory.exists(owner, conversation_id):
            chat, ids, _ = conversation_view(owner, conversation_id)
        else:
            conversation_id, chat, ids = None, [], []
        try:
            text = chain.validate(question)
            stream = chain.stream(text, owner=owner, conversation_id=conversation_id, mode=mode)
            first = next(stream)
        except InvalidQuestion as refusal:
            gr.Warning(str(refusal))
            yield question, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), token, token
            return
        chat += [{"role": "user", "content": render_markdown(text)}, {"role": "assistant", "content": ""}]
        ids += [None, None]
        partial = ""
        answer: Answer | None = None
        answering = render_plain("Answering…")
        for event in _chain_events(first, stream):
            if event.answer is not None:
                answer = event.answer
                break
            partial += event.text
            chat[-1] = {"role": "assistant", "content": render_markdown(partial)}
            yield "", chat, ids, gr.update(), gr.update(), answering, token, token
        assert answer is not None
        chat, ids, _ = conversation_view(owner, answer.conversation_id)  # what was stored is the truth
        yield ("", chat, ids, answer.conversation_id,
               gr.update(choices=conversation_choices(owner), value=answer.conversation_id),
               render_sources(answer.sources_as_dicts(), answer.citations_attributed), token, token)

    def on_new():
        return None, [], [], gr.update(value=None), ""

    def on_conversation(conversation_id: Any, token: Any, session_token: Any, request: gr.Request):
        """The open conversation's download links (signed for its owner) and its Delete button."""
        owner, _ = known_identity(token, session_token, request)
        if grants is None or owner is None or not isinstance(conversation_id, str) or not memory.exists(owner, conversation_id):
            return "", gr.update(interactive=False)
        links = " · ".join(
            f'<a href="download/{grants.issue(owner, conversation_id, fmt)}" download id="download-{fmt}">{label}</a>'
            for fmt, label in (("md", "Markdown"), ("json", "JSON")))
        return f"Download this conversation: {links}", gr.update(interactive=True)

    def on_delete(conversation_id: Any, token: Any, session_token: Any, request: gr.Request):
        owner, _ = known_identity(token, session_token, request)
        if owner is not None and isinstance(conversation_id, str) and memory.delete(owner, conversation_id):
            gr.Info("The conversation was deleted.")
        choices = conversation_choices(owner) if owner else []
        return None, [], [], gr.update(choices=choices, value=None), "", "", gr.update(interactive=False)

    # -- the Compare tab -----------------------------------------------------------------------
    def admit_compare(question: Any, conversation_id: Any, token: Any, session_token: Any, request: gr.Request):
        fine = gr.validate(True, "")
        try:
            chain.validate(question)
            limiter.admit(limit_keys(token, session_token, request))  # one question, like the chat's
        except (InvalidQuestion, RateLimited) as refusal:
            return [gr.validate(False, str(refusal)), fine, fine, fine]
        return [fine] * 4

    def compare_view(results: dict[str, ModeResult]) -> list[str]:
        views: list[str] = []
        for mode in COMPARE_ORDER:
            result = results[mode]
            views += [render_markdown(result.text) if result.text else render_plain("…" if result.state != "waiting" else ""),
                      render_plain(result.timing()),
                      render_sources(result.sources, result.citations_attributed) if result.sources else ""]
        return views

    def on_compare(question: str, conversation_id: Any, token: Any, session_token: Any, request: gr.Request):
        keys = limit_keys(token, session_token, request)
        try:
            owner, token = identity(token, session_token, request)
            history = (memory.turns(owner, conversation_id)
                       if isinstance(conversation_id, str) and memory.exists(owner, conversation_id) else [])
            try:
                for results in comparer.run(question, owner=owner, history=history):
                    yield compare_view(results)
            except InvalidQuestion as refusal:
                gr.Warning(str(refusal))
        finally:
            limiter.release(keys)

    def on_open(conversation_id: Any, token: Any, session_token: Any, request: gr.Request):
        owner, _ = known_identity(token, session_token, request)
        if not conversation_id or not isinstance(conversation_id, str) or owner is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        try:
            chat, ids, sources = conversation_view(owner, conversation_id)
        except ConversationNotFound:
            gr.Warning("That conversation does not exist.")
            return None, [], [], ""
        return conversation_id, chat, ids, sources

    def on_feedback(feedback: gr.LikeData, ids: list[int | None], token: Any, session_token: Any, request: gr.Request):
        owner, _ = known_identity(token, session_token, request)
        index = feedback.index[0] if isinstance(feedback.index, (list, tuple)) else feedback.index
        if owner is None or not isinstance(index, int) or not ids or not 0 <= index < len(ids) or ids[index] is None:
            return
        value = None if feedback.liked in (None, "") else (1 if feedback.liked is True or feedback.liked == "Like" else -1)
        memory.set_feedback(owner, ids[index], value)

    def on_upload(files: Any, token: Any, session_token: Any, request: gr.Request):
        owner, token = identity(token, session_token, request)
        paths = [Path(f) for f in (files or []) if isinstance(f, str)]
        received = {os.path.realpath(p) for p in blocks.upload_file_set}
        outcome = runtime.uploads.add(owner, paths, lambda p: os.path.realpath(p) in received,
                                      signed_in=signed_in_user(request) is not None)
        return render_list(outcome.lines()), token, token

    # -- the page ------------------------------------------------------------------------------
    with gr.Blocks(title="ragtune", fill_height=True) as blocks:
        browser_token = gr.BrowserState(None, storage_key="ragtune-user", secret=identities.browser_state_secret)
        session_token = gr.State(None)  # the same id, server-side: API clients have no browser storage
        conversation_id = gr.State(None)
        message_ids = gr.State([])
        gr.Markdown("## ragtune — answers from your documents, with citations")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Chat", id="chat-tab", elem_id="chat-tab"):
                with gr.Row():
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(
                            label="Chat", height=520, sanitize_html=True, render_markdown=False, latex_delimiters=[],
                            feedback_options=("Like", "Dislike"), elem_id="chat",
                        )
                        with gr.Row():
                            question = gr.Textbox(
                                placeholder="Loading…", show_label=False, scale=5, elem_id="question",
                                max_length=settings.chat.max_question_chars * 5, interactive=False,
                            )
                            send = gr.Button("Send", variant="primary", scale=1, elem_id="send", interactive=False)
                        gr.Examples(examples=[[q] for q in settings.chat.examples], inputs=[question], label="Examples")
                    with gr.Column(scale=2):
                        mode = gr.Radio(list(MODES), value=default_mode, label="Mode", elem_id="mode",
                                        info="hybrid = fine-tuned + retrieval · rag = retrieval · finetuned = adapter only · base = neither")
                        new = gr.Button("New conversation", elem_id="new")
                        past = gr.Dropdown(choices=[], label="Past conversations", elem_id="past", allow_custom_value=False)
                        downloads = gr.HTML("", elem_id="downloads")
                        delete = gr.Button("Delete conversation", elem_id="delete", variant="stop", size="sm",
                                           interactive=False)
                        with gr.Accordion("Sources", open=True):
                            sources = gr.Markdown("", elem_id="sources", latex_delimiters=[])
                        with gr.Accordion("Add documents", open=False):
                            if uploads_offered:
                                upload = gr.File(file_count="multiple", file_types=list(settings.chat.upload_types),
                                                 label=f"Up to {settings.chat.upload_max_mb:g} MB each", elem_id="upload")
                                upload_status = gr.Markdown("", elem_id="upload-status", latex_delimiters=[])
                            else:
                                gr.Markdown("Adding documents needs sign-in on this server.")
            with gr.Tab("Compare", id="compare-tab", elem_id="compare-tab"):
                gr.Markdown(favoured_note(default_mode), elem_id="compare-note")
                with gr.Row():
                    compare_question = gr.Textbox(
                        placeholder="Loading…", show_label=False, scale=5, elem_id="compare-question",
                        max_length=settings.chat.max_question_chars * 5, interactive=False,
                    )
                    compare_send = gr.Button("Compare", variant="primary", scale=1, elem_id="compare-send",
                                             interactive=False)
                compare_outputs = []
                with gr.Row():
                    for compare_mode in COMPARE_ORDER:
                        with gr.Column(min_width=220):
                            gr.Markdown(f"### {compare_mode}")
                            compare_outputs += [
                                gr.Markdown("", elem_id=f"compare-{compare_mode}-answer", latex_delimiters=[]),
                                gr.Markdown("", elem_id=f"compare-{compare_mode}-time", latex_delimiters=[]),
                                gr.Markdown("", elem_id=f"compare-{compare_mode}-sources", latex_delimiters=[]),
                            ]

        identity_outputs = [browser_token, session_token]
        blocks.load(on_load, inputs=[browser_token, session_token],
                    outputs=[*identity_outputs, past, question, send, compare_question, compare_send], api_name=False)
        outputs = [question, chatbot, message_ids, conversation_id, past, sources, *identity_outputs]
        inputs = [question, mode, conversation_id, browser_token, session_token]
        # The download links are signed for GRANT_TTL_S: issued afresh whenever the open
        # conversation changes or gets an answer, and before they expire on an idle page.
        refresh_downloads = dict(fn=on_conversation, inputs=[conversation_id, browser_token, session_token],
                                 outputs=[downloads, delete], api_name=False, show_progress="hidden")
        send.click(on_submit, inputs, outputs, api_name="chat", concurrency_id="generate",
                   validator=admit_question, show_progress="full", show_progress_on=[chatbot]).then(**refresh_downloads)
        question.submit(on_submit, inputs, outputs, api_name=False, concurrency_id="generate",
                        validator=admit_question, show_progress="full", show_progress_on=[chatbot]).then(**refresh_downloads)
        new.click(on_new, None, [conversation_id, chatbot, message_ids, past, sources], api_name=False).then(**refresh_downloads)
        past.input(on_open, [past, browser_token, session_token], [conversation_id, chatbot, message_ids, sources],
                   api_name=False).then(**refresh_downloads)
        gr.Timer(GRANT_TTL_S * 0.8).tick(**refresh_downloads)
        delete.click(on_delete, [conversation_id, browser_token, session_token],
                     [conversation_id, chatbot, message_ids, past, sources, downloads, delete], api_name=False)
        compare_inputs = [compare_question, conversation_id, browser_token, session_token]
        compare_send.click(on_compare, compare_inputs, compare_outputs, api_name="compare", concurrency_id="generate",
                           validator=admit_compare, show_progress="minimal")
        compare_question.submit(on_compare, compare_inputs, compare_outputs, api_name=False, concurrency_id="generate",
                                validator=admit_compare, show_progress="minimal")
        chatbot.like(on_feedback, [message_ids, browser_token, session_token], None, api_name=False)
        if uploads_offered:
            upload.upload(on_upload, [upload, browser_token, session_token], [upload_status, *identity_outputs],
                          api_name="upload", concurrency_id="upload")
    # api_open=False: Gradio's /run/<name> REST route would skip the queue and the validator.
    blocks.queue(default_concurrency_limit=settings.chat.generation_concurrency, max_size=settings.chat.queue_size,
                 api_open=False)
    return blocks


def _chain_events(first, rest):
    yield first
    yield from rest


def create_app(runtime: "Runtime") -> FastAPI:
    app = FastAPI(title="ragtune", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        # Touches neither the model nor the index: a liveness probe must stay cheap.
        return {"status": "ok"}

    settings = runtime.settings
    server = settings.server
    if server.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=server.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], allow_credentials=False)
    app.add_middleware(AccessMiddleware, server=server, limits=settings.limits,
                       anonymous_uploads=settings.chat.anonymous_uploads)
    grants = DownloadGrants(load_or_create_secret(settings.secret_file))
    # Before Gradio's mount at "/": these routes are matched first.
    app.include_router(build_api_router(runtime, IDENTITY_HEADER))
    app.include_router(build_download_router(runtime.memory, grants, IDENTITY_HEADER))
    report = Path(__file__).resolve().parent.parent / REPORT_PATH

    @app.get(f"/{REPORT_PATH}", include_in_schema=False)
    def evals_report() -> Any:
        # The Compare tab links here: one fixed file, never a path the client names.
        from fastapi.responses import PlainTextResponse

        text = report.read_text(encoding="utf-8") if report.is_file() else "No evals report in this installation."
        return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")

    blocks = build_blocks(runtime, grants)
    app = gr.mount_gradio_app(
        app, blocks, path="/", max_file_size=f"{settings.chat.upload_max_mb:g}mb",
        allowed_paths=[], blocked_paths=_blocked_paths(runtime), show_error=False,
        root_path=server.root_path or None,
    )
    # Gradio refuses a client-supplied file path (processing_utils._check_allowed: in an input,
    # only files it received in an upload) only when ``blocks.has_launched``, which launch()
    # sets and mount_gradio_app does not. Unset, any input could copy any readable file into
    # Gradio's cache and serve it (issue 14: /etc/passwd, settings.yaml, the chat database).
    blocks.has_launched = True
    return app


def _blocked_paths(runtime: "Runtime") -> list[str]:
    """Never served, whatever else allows it: the data directory (index, chat history, secret,
    uploads) and the settings file, unless Gradio's own upload folder was put inside them."""
    from gradio.utils import get_upload_folder

    upload_folder = Path(get_upload_folder()).resolve()
    candidates = [runtime.settings.data_dir, runtime.settings.uploads_dir, runtime.settings.history_db,
                  runtime.settings.secret_file, Path("settings.yaml")]
    blocked = []
    for candidate in candidates:
        resolved = candidate.expanduser().resolve()
        if resolved != upload_folder and resolved not in upload_folder.parents and str(resolved) not in blocked:
            blocked.append(str(resolved))
    return blocked
