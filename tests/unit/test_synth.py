"""synth's pure parts: the facts an answer must share with its chunk, and the teacher's JSON."""

from __future__ import annotations

import pytest

from finetune.synth import Chunk, TeacherFailure, TeacherReply, answer_names, missing_facts, parse_reply, reply_schema

CHUNK = Chunk(id="c1", source="data/demo/monographs/cardivexin.md", title="Cardivexin", section="Dosing", page=None,
              text="Start Cardivexin at 10 mg once daily. When eGFR is below 45, cap the dose at 20 mg; "
                   "avoid in T2DM with HbA1c above 9%.")


def test_names_are_capitals_past_a_sentence_start_abbreviations_and_words_with_digits() -> None:
    assert answer_names("Give Cardivexin when eGFR allows. The T2DM cap is 20 mg. Use it in HTN.") == [
        "Cardivexin", "eGFR", "T2DM", "HTN"]  # "Give", "The", "Use" open sentences; "I" is no name
    assert answer_names("I think so.") == []


def test_an_answer_may_only_state_numbers_and_names_its_chunk_states() -> None:
    assert missing_facts("Cardivexin starts at 10 mg; with eGFR below 45 the cap is 20 mg.", CHUNK) == ([], [])
    assert missing_facts("The cap is 40 mg, or 1,000 mg in Glucarnil trials.", CHUNK) == (["40", "1000"], ["Glucarnil"])
    assert missing_facts("Cardivexin is dosed as in the Dosing section.", CHUNK) == ([], [])  # title and section count


def test_the_teachers_json_is_parsed_or_the_failure_is_named() -> None:
    parsed = parse_reply("factual", TeacherReply('```json\n{"question": "Dose?", "answer": "10 mg."}\n```', 9))
    assert (parsed.question, parsed.answer) == ("Dose?", "10 mg.")
    for text, reason in (("", "teacher_empty"), ("Sure, the dose is 10 mg.", "teacher_non_json"),
                         ('"just a string"', "teacher_non_json"), ('{"question": "Dose?", "answer": " "}', "teacher_empty"),
                         ('{"question": "Dose?"}', "teacher_empty")):
        with pytest.raises(TeacherFailure) as failure:
            parse_reply("factual", TeacherReply(text, 1))
        assert failure.value.reason == reason, text
    schema = reply_schema("followup")
    assert schema["required"] == ["question", "answer", "followup", "followup_answer"]
