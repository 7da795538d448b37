"""The web app: FastAPI with the Gradio chat mounted at ``/`` and ``/healthz`` beside it.

The UI is thin: callbacks translate between Gradio components and the chain / memory / ingest
services, and hold no business logic. Every callback takes the user's identity from
``identity()``: a random id kept in the browser's localStorage (gr.BrowserState), so a person's
past conversations reopen after a reload and nobody else's are ever listed or readable.
"""

# No ``from __future__ import annotations`` here: Gradio reads gr.Request / gr.LikeData from
# the callbacks' real annotations to inject them.
import logging
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from fastapi import FastAPI

from core.modes import MODES
from chatbot.chain import Answer, InvalidQuestion
from chatbot.memory import ConversationNotFound
from chatbot.render import safe_markdown, sources_markdown
from chatbot.web import IDENTITY_HEADER, AccessMiddleware

if TYPE_CHECKING:
    from chatbot.runtime import Runtime

log = logging.getLogger(__name__)

def identity(browser_id: str | None, request: gr.Request | None) -> str:
    """Who is asking: the signed-in user (set by AccessMiddleware, never by the client), else
    this browser's random id, else (an API client has no browser storage) its Gradio session."""
    headers = getattr(request, "headers", None) if request is not None else None
    user = headers.get(IDENTITY_HEADER) if headers is not None else None
    if user:
        return f"user:{user}"
    if browser_id:
        return f"browser:{browser_id}"
    session = getattr(request, "session_hash", None) if request is not None else None
    return f"session:{session or uuid.uuid4().hex}"


def opening_mode(configured: str, has_adapter: bool) -> str:
    """The mode the page opens in: ``chat.default_mode``, where 'auto' means hybrid with an adapter."""
    if configured == "auto":
        return "hybrid" if has_adapter else "rag"
    return configured


def build_blocks(runtime: "Runtime") -> gr.Blocks:
    settings = runtime.settings
    chain, memory = runtime.chain, runtime.memory
    default_mode = opening_mode(settings.chat.default_mode, chain.models.has_adapter)

    def conversation_choices(owner: str) -> list[tuple[str, str]]:
        return [(c.title, c.id) for c in memory.list(owner)]

    def history_for_ui(owner: str, conversation_id: str) -> tuple[list[dict], list[int | None], str]:
        messages = memory.messages(owner, conversation_id)
        chat = [{"role": m.role, "content": safe_markdown(m.content)} for m in messages]
        ids = [m.id if m.role == "assistant" else None for m in messages]
        last = next((m for m in reversed(messages) if m.role == "assistant"), None)
        return chat, ids, sources_markdown(last.sources) if last else ""

    def on_load(browser_id: str | None, request: gr.Request):
        browser_id = browser_id or uuid.uuid4().hex
        owner = identity(browser_id, request)
        return browser_id, gr.update(choices=conversation_choices(owner), value=None)

    def on_submit(question: str, mode: str, conversation_id: str | None, chat: list[dict],
                  ids: list[int | None], browser_id: str | None, request: gr.Request):
        owner = identity(browser_id, request)
        chat = list(chat or [])
        ids = list(ids or [])
        try:
            stream = chain.stream(question, owner=owner, conversation_id=conversation_id, mode=mode)
            first = next(stream)
        except InvalidQuestion as refusal:
            gr.Warning(str(refusal))
            yield question, chat, ids, conversation_id, gr.update(), gr.update()
            return
        chat += [{"role": "user", "content": safe_markdown(question.strip())}, {"role": "assistant", "content": ""}]
        ids += [None, None]
        partial = ""
        answer: Answer | None = None
        for event in _chain_events(first, stream):
            if event.answer is not None:
                answer = event.answer
                break
            partial += event.text
            chat[-1] = {"role": "assistant", "content": safe_markdown(partial)}
            yield "", chat, ids, conversation_id, gr.update(), gr.update(value="_Answering…_")
        assert answer is not None
        chat[-1] = {"role": "assistant", "content": safe_markdown(answer.text)}
        ids[-1] = answer.message_id
        yield ("", chat, ids, answer.conversation_id,
               gr.update(choices=conversation_choices(owner), value=answer.conversation_id),
               sources_markdown(answer.sources_as_dicts(), answer.citations_attributed))

    def on_new():
        return None, [], [], gr.update(value=None), ""

    def on_open(conversation_id: str | None, browser_id: str | None, request: gr.Request):
        owner = identity(browser_id, request)
        if not conversation_id:
            return gr.update(), gr.update(), gr.update(), gr.update()
        try:
            chat, ids, sources = history_for_ui(owner, conversation_id)
        except ConversationNotFound:
            gr.Warning("That conversation does not exist.")
            return None, [], [], ""
        return conversation_id, chat, ids, sources

    def on_feedback(feedback: gr.LikeData, ids: list[int | None], browser_id: str | None, request: gr.Request):
        owner = identity(browser_id, request)
        index = feedback.index[0] if isinstance(feedback.index, (list, tuple)) else feedback.index
        message_id = ids[index] if ids and 0 <= index < len(ids) else None
        if message_id is None:
            return
        value = None if feedback.liked in (None, "") else (1 if feedback.liked is True or feedback.liked == "Like" else -1)
        memory.set_feedback(owner, message_id, value)

    def on_upload(files: list[str] | None) -> str:
        if not files:
            return ""
        return upload_documents(runtime, [Path(f) for f in files])

    with gr.Blocks(title="ragtune", fill_height=True) as blocks:
        browser_id = gr.BrowserState(None, storage_key="ragtune-user")
        conversation_id = gr.State(None)
        message_ids = gr.State([])
        gr.Markdown("## ragtune — answers from your documents, with citations")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Chat", height=520, sanitize_html=True, render_markdown=True,
                    feedback_options=("Like", "Dislike"), elem_id="chat",
                )
                with gr.Row():
                    question = gr.Textbox(
                        placeholder="Ask about the documents…", show_label=False, scale=5, elem_id="question",
                        max_length=settings.chat.max_question_chars * 5,
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                gr.Examples(examples=[[q] for q in settings.chat.examples], inputs=[question], label="Examples")
            with gr.Column(scale=2):
                mode = gr.Radio(list(MODES), value=default_mode, label="Mode", elem_id="mode",
                                info="hybrid = fine-tuned + retrieval · rag = retrieval · finetuned = adapter only · base = neither")
                new = gr.Button("New conversation", elem_id="new")
                past = gr.Dropdown(choices=[], label="Past conversations", elem_id="past", allow_custom_value=False)
                with gr.Accordion("Sources", open=True):
                    sources = gr.Markdown("", elem_id="sources")
                with gr.Accordion("Add documents", open=False):
                    upload = gr.File(file_count="multiple", file_types=list(settings.chat.upload_types),
                                     label=f"Up to {settings.chat.upload_max_mb:g} MB each")
                    upload_status = gr.Markdown("")

        blocks.load(on_load, inputs=[browser_id], outputs=[browser_id, past], api_name=False)
        outputs = [question, chatbot, message_ids, conversation_id, past, sources]
        inputs = [question, mode, conversation_id, chatbot, message_ids, browser_id]
        send.click(on_submit, inputs, outputs, api_name="chat", concurrency_id="generate")
        question.submit(on_submit, inputs, outputs, api_name=False, concurrency_id="generate")
        new.click(on_new, None, [conversation_id, chatbot, message_ids, past, sources], api_name=False)
        past.input(on_open, [past, browser_id], [conversation_id, chatbot, message_ids, sources], api_name=False)
        chatbot.like(on_feedback, [message_ids, browser_id], None, api_name=False)
        upload.upload(on_upload, [upload], [upload_status], api_name=False)
    blocks.queue(default_concurrency_limit=settings.chat.generation_concurrency, max_size=settings.chat.queue_size)
    return blocks


def _chain_events(first, rest):
    yield first
    yield from rest


def upload_documents(runtime: "Runtime", files: list[Path]) -> str:
    """Check uploads against the settings, copy them under the data dir, and ingest them."""
    settings = runtime.settings.chat
    target = runtime.settings.data_dir / "uploads"
    target.mkdir(parents=True, exist_ok=True)
    accepted, refused = [], []
    for file in files:
        name = Path(file).name
        size_mb = file.stat().st_size / 1024 / 1024
        if file.suffix.lower() not in settings.upload_types:
            refused.append(f"{name}: type {file.suffix or '(none)'} is not accepted ({', '.join(settings.upload_types)})")
        elif size_mb > settings.upload_max_mb:
            refused.append(f"{name}: {size_mb:.1f} MB is over the {settings.upload_max_mb:g} MB limit")
        else:
            destination = target / name
            shutil.copyfile(file, destination)
            accepted.append(destination)
    lines = [f"- refused {safe_markdown(r)}" for r in refused]
    if accepted:
        report = runtime.indexer.run(accepted, progress=False)
        lines += [f"- added {safe_markdown(Path(s).name)}" for s in report.added]
        lines += [f"- updated {safe_markdown(Path(s).name)}" for s in report.changed]
        lines += [f"- unchanged {safe_markdown(Path(s).name)}" for s in report.unchanged]
        lines += [f"- failed {safe_markdown(str(f))}" for f in report.failed]
    return "\n".join(lines)


def create_app(runtime: "Runtime") -> FastAPI:
    app = FastAPI(title="ragtune", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        # Touches neither the model nor the index: a liveness probe must stay cheap.
        return {"status": "ok"}

    server = runtime.settings.server
    if server.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=server.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], allow_credentials=False)
    app.add_middleware(AccessMiddleware, server=server)
    blocks = build_blocks(runtime)
    return gr.mount_gradio_app(
        app, blocks, path="/", max_file_size=f"{runtime.settings.chat.upload_max_mb:g}mb",
        allowed_paths=[], show_error=False, root_path=server.root_path or None,
    )
