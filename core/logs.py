"""Logging for the CLIs: our messages at the configured level, libraries' chatter kept down."""

from __future__ import annotations

import logging
import warnings


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "sentence_transformers", "transformers", "huggingface_hub", "gradio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass
    # Local-mode Qdrant warns once per collection above 20,000 points; we say it in the docs.
    warnings.filterwarnings("ignore", message=".*Local mode is not recommended.*")
