"""The settings tree: layering, validation, and errors that name the field."""

from pathlib import Path

import pytest

from core.settings import SettingsError, load_settings, parse_overrides


def test_layers_yaml_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yaml_file = tmp_path / "settings.yaml"
    yaml_file.write_text("qdrant:\n  collection: from_yaml\n  timeout_s: 7\nllm:\n  max_new_tokens: 99\n")
    monkeypatch.setenv("RAGTUNE_QDRANT__COLLECTION", "from_env")
    monkeypatch.setenv("RAGTUNE_QDRANT__URL", "http://qdrant:6333")

    settings = load_settings(yaml_file, parse_overrides(["llm.max_new_tokens=12"]))

    assert settings.qdrant.collection == "from_env"  # env beats the file
    assert settings.qdrant.timeout_s == 7  # the file beats defaults, siblings survive env merging
    assert settings.llm.max_new_tokens == 12  # --set beats everything
    assert settings.qdrant_location == "http://qdrant:6333"


def test_defaults_are_offline_and_local(tmp_path: Path) -> None:
    yaml_file = tmp_path / "settings.yaml"
    yaml_file.write_text("data_dir: " + str(tmp_path / "d") + "\n")
    settings = load_settings(yaml_file)
    assert settings.embedding.model == "packaged" and settings.llm.model == "packaged"
    assert settings.qdrant_location == str(tmp_path / "d" / "qdrant")


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("qdrant:\n  colection: x\n", "qdrant.colection"),  # a typo is an error, not ignored
        ("ingest:\n  chunk_tokens: 50\n  chunk_overlap: 60\n", "ingest"),
        ("qdrant:\n  url: qdrant:6333\n", "qdrant.url"),
        ("llm:\n  temperature: hot\n", "llm.temperature"),
    ],
)
def test_invalid_settings_name_the_field(tmp_path: Path, content: str, named: str) -> None:
    yaml_file = tmp_path / "settings.yaml"
    yaml_file.write_text(content)
    with pytest.raises(SettingsError) as error:
        load_settings(yaml_file)
    assert named in str(error.value) and str(yaml_file) in str(error.value)


def test_bad_yaml_and_missing_file_are_reported(tmp_path: Path) -> None:
    broken = tmp_path / "settings.yaml"
    broken.write_text("qdrant: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(broken)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    with pytest.raises(SettingsError, match="key.sub=value"):
        parse_overrides(["no_equals_sign"])


def test_env_var_with_bad_value_names_variable_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s.yaml").write_text("")
    monkeypatch.setenv("RAGTUNE_LLM__MAX_NEW_TOKENS", "-5")
    with pytest.raises(SettingsError, match="llm.max_new_tokens"):
        load_settings(tmp_path / "s.yaml")


def test_the_page_opens_in_the_configured_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatbot.app import opening_mode

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)  # the committed settings.yaml, relative paths and all
    committed = load_settings(repo / "settings.yaml")
    # The evals put rag ahead of hybrid with the 135M demo adapter (README), so the page opens in rag.
    assert opening_mode(committed.chat.default_mode, has_adapter=True) == "rag"
    assert opening_mode("auto", has_adapter=True) == "hybrid" and opening_mode("auto", has_adapter=False) == "rag"
    with pytest.raises(SettingsError, match="chat.default_mode"):
        load_settings(repo / "settings.yaml", {"chat": {"default_mode": "best"}})


def test_the_generation_backend_is_one_setting_and_a_missing_package_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from core.generation import build_backend

    (tmp_path / "s.yaml").write_text("")
    settings = load_settings(tmp_path / "s.yaml", {"data_dir": str(tmp_path)})
    assert settings.llm.backend == "llamacpp"  # the default: docs/benchmarks.md says why
    # llama-cpp-python is installed here; None in sys.modules makes its import fail as if it were not.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ImportError, match=r"llm.backend=llamacpp needs llama_cpp_python: pip install llama_cpp_python"):
        build_backend(settings)
    with pytest.raises(SettingsError, match="llm.backend"):
        load_settings(tmp_path / "s.yaml", {"llm": {"backend": "vllm"}})
    with pytest.raises(SettingsError, match="llm.backend=openai needs llm.openai.base_url"):
        load_settings(tmp_path / "s.yaml", {"llm": {"backend": "openai"}})


def test_the_store_backend_follows_the_url_and_refuses_a_contradiction(tmp_path) -> None:
    from core.settings import SettingsError, load_settings
    from core.store import store_backend

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert store_backend(load_settings(empty, {})) == "edge"
    assert store_backend(load_settings(empty, {"qdrant": {"url": "http://qdrant:6333"}})) == "server"
    for broken, field in (({"backend": "server"}, "qdrant.url"), ({"backend": "edge", "url": "http://q:6333"}, "unset qdrant.url")):
        try:
            load_settings(empty, {"qdrant": broken})
        except SettingsError as exc:
            assert field in str(exc)
        else:
            raise AssertionError(f"{broken} was accepted")
