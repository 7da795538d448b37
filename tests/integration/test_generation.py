"""One chain test body over every generation backend that runs here: llamacpp (in-process, the
default), transformers (torch + PEFT) and openai against a real OpenAI-compatible server,
llama-cpp-python's own, on loopback, serving the packaged SmolLM2 GGUF. All three serve the same
weights, so they must also count the same prompt tokens and (where they can) score labels alike."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from chatbot.runtime import build_runtime
from core.generation import GenerationBackend, LikelihoodUnavailable, build_backend
from core.modes import NO_ADAPTER
from core.prompts import ContextChunk, build_messages
from core.settings import load_settings
from tests.conftest import DEMO
from tests.integration.test_app import _free_port

BACKENDS = ["llamacpp", "transformers", "openai"]
MAX_NEW_TOKENS = 64


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory, generation):
    """llama-cpp-python's server on the GGUF the llamacpp backend serves (the packaged model at
    llm.packaged_precision)."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("llama") / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", generation.describe()["weights"], "--host", "127.0.0.1",
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


@pytest.fixture(scope="module")
def index(tmp_path_factory, session_data_dir, embedder, generation):
    """The demo monographs in one store folder that every backend's runtime reads."""
    from core.store import open_store

    folder = tmp_path_factory.mktemp("generation")
    (folder / "settings.yaml").write_text("")
    settings = load_settings(folder / "settings.yaml", {"data_dir": str(session_data_dir),
                                                        "qdrant": {"path": str(folder / "qdrant")}})
    client = open_store(settings)
    runtime = build_runtime(settings, store=client, embedder=embedder, generation=generation)
    assert runtime.indexer.run([DEMO / "monographs"], progress=False).ok
    yield folder, client
    runtime.close()
    client.close()


@pytest.fixture(scope="module", params=BACKENDS)
def runtime(request, index, session_data_dir, embedder, generation):
    folder, client = index
    llm: dict = {"backend": request.param, "max_new_tokens": MAX_NEW_TOKENS}
    if request.param == "openai":
        llm["openai"] = {"base_url": request.getfixturevalue("llama_server"), "model": "smollm2"}
    settings = load_settings(folder / "settings.yaml", {
        "data_dir": str(session_data_dir), "qdrant": {"path": str(folder / "qdrant")}, "llm": llm,
        "chat": {"history_db": str(folder / f"{request.param}.sqlite3")},
    })
    # llamacpp: the session's shared backend; the others are built (and closed) here.
    backend = generation if request.param == "llamacpp" else build_backend(settings)
    yield build_runtime(settings, store=client, embedder=embedder, generation=backend)
    if backend is not generation:
        backend.close()


def test_every_backend_streams_cites_and_stops(runtime) -> None:
    events = list(runtime.chain.stream("What is the effect of Cardivexin on a patient with HTN and T2DM?",
                                       owner="o", mode="rag"))
    answer = events[-1].answer
    assert answer is not None and sum(e.kind == "token" for e in events) > 3  # streamed piece by piece
    assert answer.text and 0 < answer.timings["tokens"] <= MAX_NEW_TOKENS + 2 and answer.timings["ttft_s"] > 0
    assert answer.timings["prompt_tokens"] > 300  # four chunks' worth, counted with the chat template
    assert answer.sources[0].source.endswith("cardivexin.md")
    assert answer.cited and all(1 <= n <= len(answer.sources) for n in answer.cited)

    short = runtime.chain.ask("Reply with the single word: yes.", owner="o", mode="base")
    assert 0 < short.timings["tokens"] < MAX_NEW_TOKENS, short.text  # EOS (<|im_end|>) ended it, not the limit
    assert "<|im_end|>" not in short.text and "<|im_start|>" not in short.text

    refused = runtime.chain.ask("What is HTN?", owner="o", mode="hybrid")
    assert refused.text == NO_ADAPTER.format(mode="hybrid")  # no llm.adapter / llm.openai.adapter_model
    assert runtime.generation.describe()["backend"] == runtime.settings.llm.backend


def test_backends_count_tokens_and_score_labels_alike(runtime, generation: GenerationBackend) -> None:
    chunk = ContextChunk("Cardivexin 10 mg once daily — review K+ ≥ 5.5 mmol/L.", "Cardivexin", "m.md", page=2)
    messages = build_messages("¿Dosis de Cardivexin?", [chunk], [("What is HTN?", "Hypertension. [1]")])
    backend = runtime.generation
    assert backend.count_prompt_tokens(messages) == generation.count_prompt_tokens(messages)
    assert backend.count_tokens("Cardivexin 10 mg — once daily.") == generation.count_tokens("Cardivexin 10 mg — once daily.")
    labels = {"yes": "Yes", "no": "No", "maybe": "Maybe, it depends"}  # the last one is several tokens
    if runtime.settings.llm.backend == "openai":
        with pytest.raises(LikelihoodUnavailable):
            backend.label_logprobs(messages, adapted=False, label_texts=labels)
        return
    scores = backend.label_logprobs(messages, adapted=False, label_texts=labels)
    reference = generation.label_logprobs(messages, adapted=False, label_texts=labels)
    # The same de-quantised weights, computed by llama.cpp (f32) or torch (fp32).
    assert scores == pytest.approx(reference, abs=0.05)
    assert scores["maybe"] < scores["yes"] < 0 and scores["no"] < 0


def test_backends_continue_a_begun_answer(runtime, generation: GenerationBackend) -> None:
    """The chain writes an answer's opening quotes itself and the model goes on from them
    (retrieval.evidence.quote_first): the continuation must read the opening, not restart."""
    messages = build_messages("Which city is the capital of France?", None)
    opening = "The capital of France is"
    text = "".join(runtime.generation.stream_continuation(messages, opening, adapted=False, max_new_tokens=8))
    assert text.strip()
    if runtime.settings.llm.backend == "openai":
        return  # the OpenAI chat API cannot continue a begun answer: it answers afresh (documented)
    assert "Paris" in text and not text.lstrip().lower().startswith("the capital")
    reference = "".join(generation.stream_continuation(messages, opening, adapted=False, max_new_tokens=8))
    assert text.split()[:2] == reference.split()[:2]  # the same weights, greedy: the same words
