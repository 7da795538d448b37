"""Hugging Face Spaces entry point (README front matter: app_file: app.py).

A Space runs ``python app.py`` and expects a server on 0.0.0.0:7860. This is ``python -m
chatbot`` with those settings: the first start indexes data/demo onto the Space's disk, and
the committed demo adapter makes hybrid mode work on CPU basic, with no GPU and no secret.
Anonymous uploads stay off here whatever settings.yaml says: every visitor of a Space is
anonymous, and an upload would otherwise reach other visitors' answers.
"""

import sys
from pathlib import Path

from chatbot.cli import main

DEMO_ADAPTER = Path(__file__).parent / "data" / "adapters" / "demo" / "adapter_config.json"

if __name__ == "__main__":
    # A public Space: visitors are anonymous, so none may add documents (docs/security.md).
    arguments = ["--host", "0.0.0.0", "--port", "7860", "--set", "chat.anonymous_uploads=false"]
    if DEMO_ADAPTER.is_file():
        arguments += ["--set", "llm.adapter=demo"]
    sys.exit(main(arguments))
