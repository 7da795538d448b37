"""Shared fixtures. Everything here is real: the packaged models and the embedded store (Qdrant Edge).

The packaged SmolLM2 is converted from GGUF once per test session (about 20 s) into a
session-wide data directory; each test gets its own store folder under its tmp_path.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "demo"
SHARED = REPO.parent / "shared"
PUBMEDQA = SHARED / "data" / "pubmedqa"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's RAGTUNE_* variables must not change what the tests see."""
    import os

    for name in list(os.environ):
        if name.startswith("RAGTUNE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ragtune-data")


@pytest.fixture
def settings_factory(tmp_path: Path, session_data_dir: Path) -> Callable[..., Settings]:
    """Settings from an empty YAML file plus overrides; Qdrant in this test's own folder."""
    yaml_file = tmp_path / "settings.yaml"
    yaml_file.write_text("")

    def make(**overrides: Any) -> Settings:
        merged: dict[str, Any] = {"data_dir": str(session_data_dir), "qdrant": {"path": str(tmp_path / "qdrant")}}
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return load_settings(yaml_file, merged)

    return make


@pytest.fixture(scope="session")
def generation(session_data_dir: Path):
    """The default backend (llamacpp on the packaged GGUF), no adapter, shared by the chat tests;
    its chat models take their answer length from each runtime's llm.max_new_tokens."""
    from core.generation import build_backend

    yaml_file = session_data_dir / "generation-settings.yaml"
    yaml_file.write_text("")
    backend = build_backend(load_settings(yaml_file, {"data_dir": str(session_data_dir)}))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def embedder():
    from core.embeddings import load_embedder
    from core.settings import EmbeddingSettings

    return load_embedder(EmbeddingSettings())


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    """A private copy of the demo knowledge base that a test may edit."""
    target = tmp_path / "demo"
    shutil.copytree(DEMO, target)
    return target
