"""The chain with the real packaged SmolLM2 (the default llamacpp backend), the real embedder and a
local Qdrant of the demo. tests/integration/test_generation.py runs the chain over every backend."""

from __future__ import annotations


import pytest

from chatbot.chain import InvalidQuestion
from chatbot.runtime import build_runtime
from core.modes import NO_ADAPTER
from core.prompts import NOT_COVERED
from core.settings import load_settings
from tests.conftest import DEMO


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, session_data_dir, embedder, generation):
    folder = tmp_path_factory.mktemp("chat")
    (folder / "settings.yaml").write_text("")
    settings = load_settings(folder / "settings.yaml", {
        "data_dir": str(session_data_dir),
        "qdrant": {"path": str(folder / "qdrant")},
        "chat": {"history_db": str(folder / "chat.sqlite3")},
        "llm": {"max_new_tokens": 96},
    })
    built = build_runtime(settings, embedder=embedder, generation=generation)
    assert built.indexer.run([DEMO], progress=False).ok
    yield built
    built.close()


def test_rag_answer_streams_stops_and_cites_the_right_document(runtime) -> None:
    events = list(runtime.chain.stream(
        "What is the effect of Cardivexin on a patient with HTN and T2DM?", owner="t1", mode="rag"))
    tokens = [e.text for e in events if e.kind == "token"]
    answer = events[-1].answer
    assert answer is not None and len(tokens) > 3  # streamed piece by piece
    assert answer.timings["tokens"] <= 96 + 2 and answer.timings["ttft_s"] > 0
    assert answer.sources[0].source.endswith("monographs/cardivexin.md")
    assert answer.cited, answer.text  # the model's own [n], or attributed ones
    assert all(1 <= n <= len(answer.sources) for n in answer.cited)  # nothing cited that was not retrieved
    assert any(s.cited and s.source.endswith("cardivexin.md") for s in answer.sources)
    assert answer.sources[0].title and answer.sources[0].score > 0.5


def test_generation_stops_at_eos_before_the_limit(runtime) -> None:
    answer = runtime.chain.ask("Reply with the single word: yes.", owner="t2", mode="base")
    assert 0 < answer.timings["tokens"] < 96, answer.text  # EOS, not the token limit, ended it
    assert "<|im_end|>" not in answer.text


def test_follow_up_is_made_standalone_before_retrieval(runtime) -> None:
    first = runtime.chain.ask("What is the starting dose of Glucarnil?", owner="t3", mode="rag")
    follow = runtime.chain.ask("And when eGFR is below 30?", owner="t3", conversation_id=first.conversation_id, mode="rag")
    assert "Glucarnil" in follow.query
    assert follow.sources and follow.sources[0].source.endswith("monographs/glucarnil.md")

    bp = runtime.chain.ask("How much does Cardivexin lower blood pressure?", owner="t3", mode="rag")
    diabetes = runtime.chain.ask("and in patients with diabetes?", owner="t3", conversation_id=bp.conversation_id, mode="rag")
    assert any(s.source.endswith("cardivexin.md") for s in diabetes.sources)
    alone = runtime.chain.ask("and in patients with diabetes?", owner="t3", mode="rag")
    assert not any(s.source.endswith("cardivexin.md") for s in alone.sources[:1])  # history made the difference


def test_a_third_turn_keeps_its_topic_and_a_new_subject_drops_it(runtime) -> None:
    """chat.condense=concat: with only the previous question in front, "And for an 80-year-old?"
    searched for 'When can it be increased?' and lost Cardivexin; a new subject must not drag the
    old one along."""
    first = runtime.chain.ask("What is the starting dose of Cardivexin?", owner="t3b", mode="rag")
    conversation = first.conversation_id
    runtime.chain.ask("When can it be increased?", owner="t3b", conversation_id=conversation, mode="rag")
    third = runtime.chain.ask("And for an 80-year-old?", owner="t3b", conversation_id=conversation, mode="rag")
    assert "Cardivexin" in third.query
    assert third.sources[0].source.endswith("monographs/cardivexin.md")

    question = "What is the door-to-balloon target for a STEMI?"
    new_subject = runtime.chain.ask(question, owner="t3b", conversation_id=conversation, mode="rag")
    assert new_subject.query == question
    assert new_subject.sources[0].source.endswith("protocols/chest-pain-acs.md")


def test_questions_the_documents_do_not_cover(runtime) -> None:
    answer = runtime.chain.ask("What is the capital of Peru?", owner="t4", mode="rag")
    assert answer.text == NOT_COVERED and answer.sources == [] and answer.refused


def test_adapter_modes_say_plainly_that_no_adapter_is_configured(runtime) -> None:
    for mode in ("hybrid", "finetuned"):
        answer = runtime.chain.ask("What is HTN?", owner="t5", mode=mode)
        assert answer.text == NO_ADAPTER.format(mode=mode)


def test_bad_questions_are_refused_or_answered_safely(runtime) -> None:
    with pytest.raises(InvalidQuestion, match="type a question"):
        runtime.chain.ask("   ", owner="t6")
    with pytest.raises(InvalidQuestion, match="20,000 characters"):
        runtime.chain.ask("x" * 20_000, owner="t6")
    html = runtime.chain.ask("<script>alert(1)</script> What is the STEMI door-to-balloon target?", owner="t6", mode="rag")
    assert html.sources and html.text
    other_language = runtime.chain.ask("¿Cuál es la dosis inicial de Glucarnil?", owner="t6", mode="rag")
    assert other_language.text
    assert runtime.memory.list("t6")  # refused questions stored nothing, answered ones did


def test_conversations_are_isolated_between_owners(runtime) -> None:
    alice = runtime.chain.ask("What does AKI mean?", owner="alice", mode="base")
    intruder = runtime.chain.ask("What did I ask before?", owner="mallory", conversation_id=alice.conversation_id, mode="base")
    assert intruder.conversation_id != alice.conversation_id  # a foreign id starts a new conversation
    assert [m.content for m in runtime.memory.messages("alice", alice.conversation_id)][0] == "What does AKI mean?"
    assert len(runtime.memory.messages("alice", alice.conversation_id)) == 2


def test_history_is_trimmed_to_the_context_budget(runtime) -> None:
    chain = runtime.chain
    history = [(f"question {i} " + "about renal dosing " * 40, "answer " * 60) for i in range(30)]
    answer = type("A", (), {"sources": []})()
    messages = chain._fit("What is AKI?", None, history, answer)
    used = chain.models.count_prompt_tokens(messages)
    assert used <= chain.settings.llm.context_window - chain.settings.llm.max_new_tokens
    assert messages[-1]["content"] == "What is AKI?"
    assert "question 29" in messages[-3]["content"] and "question 0 " not in str(messages)  # newest kept


def test_quote_first_opens_with_the_best_evidence_and_the_model_goes_on(runtime) -> None:
    """retrieval.evidence.quote_first: the chain writes the best units as the answer's verified
    opening quotes and the model continues in one paragraph (here for rag, which the default
    leaves to the model: 'adapted' applies it to the adapter's modes only)."""
    from chatbot.chain import ConversationalRagChain

    s = runtime.settings
    evidence = s.retrieval.evidence.model_copy(update={"quote_first": "all", "quote_units": 2})
    settings = s.model_copy(update={"retrieval": s.retrieval.model_copy(update={"evidence": evidence})})
    chain = runtime.chain
    quoting = ConversationalRagChain(settings, chain.retriever, chain.models, chain.memory, chain.evidence)
    events = list(quoting.stream("What is the starting dose of Cardivexin?", owner="t9", mode="rag"))
    answer = events[-1].answer
    assert answer is not None and not answer.refused
    best = answer.evidence[:2]
    opening = "\n".join(f'"{u.text}" [{u.n}]' for u in best)
    assert events[0].text.startswith(opening)  # shown at once, before the model's first token
    assert [(q.n, q.text) for q in answer.quotes][:2] == [(u.n, u.text) for u in best]
    assert all(q.verified for q in answer.quotes)
    body = answer.text[len(opening):].strip()
    assert "\n" not in body  # one paragraph: the continuation stops at its first line break
    assert "10 mg" in answer.text
    # The default leaves rag's answer to the model: no opening is written for it.
    plain = list(chain.stream("What is the starting dose of Cardivexin?", owner="t9", mode="rag"))
    assert len(plain[0].text) < len(opening)  # the model's first token, not a written opening
