"""python -m chatbot: the chat in a browser, or one question in the terminal.

Examples:
  python -m chatbot                                   # http://127.0.0.1:7860 (ingests data/demo on first start)
  python -m chatbot --host 0.0.0.0 --port 8080
  python -m chatbot ask "What is the effect of Cardivexin on a patient with HTN and T2DM?" --mode rag
  python -m chatbot ask "And what if eGFR is below 45?" --conversation 3f2a... --mode rag
  python -m chatbot ask "What does STEMI mean?" --json     # answer, sources and timings as JSON
  python -m chatbot ask "What is HTN?" --mode hybrid --set llm.adapter=demo
  python -m chatbot export 3f2a... --format md > conversation.md   # every message, its sources and feedback
  python -m chatbot export 3f2a... --format json --owner user:alice
  python -m chatbot delete 3f2a...                                 # gone from the list and from SQLite
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

from core.hub import ModelUnavailableError
from core.logs import setup_logging
from core.modes import MODES
from core.settings import Settings, SettingsError, load_settings, parse_overrides
from core.store import StoreError

log = logging.getLogger("chatbot")
CLI_OWNER = "cli"  # terminal conversations belong to the local user, apart from browser ones


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chatbot", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--settings", type=Path, help="settings YAML (default ./settings.yaml if present)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override a setting, e.g. --set llm.adapter=demo (repeatable)")
    parser.add_argument("--host", help="default server.host (127.0.0.1)")
    parser.add_argument("--port", type=int, help="default server.port (7860)")
    parser.add_argument("--share", action="store_true", help="a public Gradio share link (needs internet)")
    commands = parser.add_subparsers(dest="command")
    ask = commands.add_parser("ask", help="answer one question in the terminal")
    ask.add_argument("question")
    ask.add_argument("--mode", choices=MODES, default="rag")
    ask.add_argument("--conversation", help="continue this conversation id (printed after each answer)")
    ask.add_argument("--json", action="store_true", help="print the answer, sources and timings as JSON")
    # Also accepted after the question, where people type it.
    ask.add_argument("--set", dest="ask_overrides", action="append", metavar="KEY=VALUE",
                     help="override a setting, e.g. --set llm.adapter=demo")
    for name, text in (("export", "print a conversation (Markdown or JSON) with its sources and feedback"),
                       ("delete", "delete a conversation, its messages, sources and feedback from SQLite")):
        command = commands.add_parser(name, help=text)
        command.add_argument("conversation", help="the conversation id (printed after each answer)")
        command.add_argument("--owner", default=CLI_OWNER,
                             help=f"whose conversation: {CLI_OWNER!r} (the terminal's, default), 'user:NAME' for a "
                             "signed-in user or an API key's user")
        if name == "export":
            command.add_argument("--format", choices=("md", "json"), default="md")
    return parser


def ensure_indexed(runtime, settings: Settings) -> None:
    """First start: an empty collection gets the demo knowledge base, with visible progress."""
    corpus = settings.chat.demo_corpus
    if runtime.store.count() > 0 or corpus is None or not Path(corpus).is_dir():
        return
    print(f"The index is empty: indexing {corpus} (first start, about a minute)...", file=sys.stderr, flush=True)
    report = runtime.indexer.run([Path(corpus)], progress=sys.stderr.isatty(),
                                 on_event=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    print(f"  {report.summary()}", file=sys.stderr, flush=True)
    runtime.refresh_knowledge_base_terms()


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    overrides = parse_overrides((args.overrides or []) + (getattr(args, "ask_overrides", None) or []))
    for key in ("host", "port"):
        if getattr(args, key) is not None:
            overrides.setdefault("server", {})[key] = getattr(args, key)
    if args.share:
        overrides.setdefault("server", {})["share"] = True
    try:
        settings = load_settings(args.settings, overrides)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level if args.command not in ("ask", "export", "delete") else "WARNING")
    if args.command in ("export", "delete"):
        return conversation_command(settings, args)  # the database only: no model, no index

    from chatbot.runtime import build_runtime

    try:
        runtime = build_runtime(settings)
        ensure_indexed(runtime, settings)
    except (StoreError, ModelUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "ask":
            return ask(runtime, args)
        return serve(runtime, settings)
    finally:
        runtime.close()


def ask(runtime, args: argparse.Namespace) -> int:
    from chatbot.chain import InvalidQuestion

    try:
        answer = None
        for event in runtime.chain.stream(args.question, owner=CLI_OWNER, conversation_id=args.conversation, mode=args.mode):
            if event.answer is not None:
                answer = event.answer
            elif not args.json:
                print(event.text, end="", flush=True)
    except InvalidQuestion as refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    assert answer is not None
    if args.json:
        print(json.dumps({
            "answer": answer.text, "mode": answer.mode, "conversation_id": answer.conversation_id,
            "query": answer.query, "cited": answer.cited, "citations_attributed": answer.citations_attributed,
            "sources": answer.sources_as_dicts(), "timings": answer.timings, "refused": answer.refused,
        }, indent=2))
        return 0
    if answer.citations_attributed:
        print(f"\n\n(with citations added by ragtune) {answer.text}")
    print()
    for source in answer.sources:
        where = f", page {source.page}" if source.page else ""
        print(f"[{source.n}] {'*' if source.cited else ' '} {source.title}{where} — {source.source} (score {source.score:.2f})")
    print(f"\nconversation: {answer.conversation_id}  ({answer.timings})", file=sys.stderr)
    return 0


def conversation_command(settings: Settings, args: argparse.Namespace) -> int:
    from chatbot.memory import ChatMemory, ConversationNotFound, export_markdown

    memory = ChatMemory(settings.history_db)
    if args.command == "delete":
        if not memory.delete(args.owner, args.conversation):
            print(f"error: no conversation {args.conversation} of {args.owner} in {settings.history_db}", file=sys.stderr)
            return 1
        print(f"deleted conversation {args.conversation} from {settings.history_db}", file=sys.stderr)
        return 0
    try:
        export = memory.export(args.owner, args.conversation)
    except ConversationNotFound:
        print(f"error: no conversation {args.conversation} of {args.owner} in {settings.history_db}", file=sys.stderr)
        return 1
    print(json.dumps(export, indent=2, ensure_ascii=False) if args.format == "json" else export_markdown(export), end="\n" if args.format == "json" else "")
    return 0


def serve(runtime, settings: Settings) -> int:
    import uvicorn

    from chatbot.app import build_blocks, create_app, recover_after_restart

    recover_after_restart(runtime)  # before the first request: nothing is in flight yet
    # Load the model while the server starts: /healthz and the page answer at once, and the
    # first question waits only for whatever is left of the load.
    threading.Thread(target=runtime.generation.warm_up, args=(False,), daemon=True).start()
    server = settings.server
    if server.share:
        # A share link goes through Gradio's own server: without the FastAPI headers and auth.
        build_blocks(runtime).launch(server_name=server.host, server_port=server.port, share=True)
        return 0
    print(f"ragtune: http://{server.host}:{server.port}{server.root_path}", file=sys.stderr, flush=True)
    uvicorn.run(create_app(runtime), host=server.host, port=server.port, log_level="warning",
                root_path=server.root_path, proxy_headers=False)
    return 0
