"""What can be checked of the deployment files without a Docker engine (none runs here)."""

from __future__ import annotations

import re
from importlib.metadata import version

import yaml

from core.settings import ENV_PREFIX, Settings
from tests.conftest import REPO


def _setting_exists(variable: str) -> bool:
    """RAGTUNE_LLM__OPENAI__BASE_URL -> Settings.llm.openai.base_url exists."""
    model = Settings
    for part in variable[len(ENV_PREFIX):].lower().split("__"):
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return False
        model = fields[part].annotation
    return True


def test_compose_services_and_settings() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+", services["qdrant"]["image"])  # pinned
    chatbot = services["chatbot"]
    assert chatbot["depends_on"]["qdrant"]["condition"] == "service_healthy"
    assert "healthz" in " ".join(chatbot["healthcheck"]["test"])
    assert chatbot["user"] != "root" and chatbot["environment"]["RAGTUNE_QDRANT__URL"] == "http://qdrant:6333"
    assert services["vllm"]["profiles"] == ["gpu"]
    variables = [v for v in chatbot["environment"] if v.startswith(ENV_PREFIX)]
    assert variables and all(_setting_exists(v) for v in variables), [v for v in variables if not _setting_exists(v)]


def test_env_example_names_real_settings() -> None:
    lines = (REPO / ".env.example").read_text().splitlines()
    names = [re.sub(r"^#\s*", "", line).split("=", 1)[0] for line in lines if "=" in line]
    ragtune = [n for n in names if n.startswith(ENV_PREFIX)]
    assert len(ragtune) >= 8
    assert all(_setting_exists(n) for n in ragtune), [n for n in ragtune if not _setting_exists(n)]
    assert "QDRANT_API_KEY" in names


def test_dockerfile_runs_the_readme_commands() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    readme = (REPO / "README.md").read_text()
    assert "pip install --no-cache-dir -r requirements.txt" in dockerfile and "pip install -r requirements.txt" in readme
    assert 'CMD ["python", "-m", "chatbot"]' in dockerfile and "python -m chatbot" in readme
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert "torch==2.13.0" in dockerfile and "torch==2.13.0" in (REPO / "requirements.txt").read_text()


def test_spaces_front_matter() -> None:
    readme = (REPO / "README.md").read_text()
    assert readme.startswith("---\n")
    front = yaml.safe_load(readme.split("---\n")[1])
    assert front["sdk"] == "gradio"
    assert front["sdk_version"] == version("gradio")  # the version the tests ran with
    assert front["python_version"] == "3.11"
    assert (REPO / front["app_file"]).is_file()
    assert {"title", "emoji", "colorFrom", "colorTo", "pinned"} <= set(front)
    assert front["colorFrom"] in {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
