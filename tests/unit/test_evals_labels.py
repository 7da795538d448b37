"""The label prior (evals/labels.py): its file, its fit, and how the scores and summary apply it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.labels import (
    LABEL_PRIOR_FILE, LabelPriorError, adapter_label_prior, apply_prior, fit_label_prior, main, read_label_prior,
)
from evals.metrics import score_record, summarize

# A model that always prefers "yes" by 1 nat, but whose "no" and "maybe" carry the signal.
GOLD = ["yes", "yes", "no", "no", "maybe", "yes"]
LOGPROBS = [
    {"yes": -0.5, "no": -2.5, "maybe": -3.5},
    {"yes": -0.6, "no": -2.0, "maybe": -3.6},
    {"yes": -0.7, "no": -1.2, "maybe": -3.0},   # no: +0.5 over yes after a shift of 1.0
    {"yes": -0.6, "no": -1.3, "maybe": -3.2},
    {"yes": -0.8, "no": -2.5, "maybe": -1.5},   # maybe: needs a shift above 0.7
    {"yes": -0.4, "no": -3.0, "maybe": -3.0},
]


def _record(**fields):
    return {"mode": "hybrid", "id": "q", "question": "Q?", "answer": "", "retrieved": None, "sources": [],
            "cited": [], **fields}


def test_fit_moves_the_minority_labels_up_until_they_are_predicted() -> None:
    prior = fit_label_prior(GOLD, LOGPROBS)
    assert prior["yes"] == 0.0 and prior["no"] > 0.7 and prior["maybe"] > 0.7
    predicted = [max(lp, key=lambda label: apply_prior(lp, prior)[label]) for lp in LOGPROBS]
    assert predicted == GOLD
    # Without the prior every question is "yes": the majority, which the prior is there to undo.
    assert {max(lp, key=lp.get) for lp in LOGPROBS} == {"yes"}


def test_fit_prefers_the_smallest_correction_among_equally_good_ones() -> None:
    prior = fit_label_prior(["yes", "no"], [{"yes": -0.1, "no": -3.0}, {"yes": -3.0, "no": -0.1}])
    assert prior == {"yes": 0.0, "no": 0.0}  # already right: nothing to correct


def test_the_summary_reports_the_label_before_and_after_the_prior() -> None:
    prior = fit_label_prior(GOLD, LOGPROBS)
    records = [_record(id=str(i), label=g, label_logprobs=lp, label_prior=prior)
               for i, (g, lp) in enumerate(zip(GOLD, LOGPROBS))]
    for r in records:
        r["scores"] = score_record(r)
    assert records[2]["scores"]["label_likelihood_raw"] == "yes" and records[2]["scores"]["label_likelihood"] == "no"
    s = summarize(records)
    assert s["accuracy_likelihood"] == 1.0 and s["macro_f1_likelihood"] == 1.0
    assert s["accuracy_likelihood_raw"] == pytest.approx(3 / 6) and s["n_label_prior"] == 6
    assert s["macro_f1_likelihood_raw"] == pytest.approx((2 * 3 / 9) / 3)  # yes F1 2/3, no and maybe 0
    plain = summarize([{**r, "label_prior": None, "scores": score_record({**r, "label_prior": None})}
                       for r in records])
    assert plain["accuracy_likelihood"] == pytest.approx(3 / 6) and plain["accuracy_likelihood_raw"] is None


def test_the_prior_file_beside_an_adapter(tmp_path: Path) -> None:
    assert adapter_label_prior(tmp_path) is None and adapter_label_prior(None) is None
    path = tmp_path / LABEL_PRIOR_FILE
    path.write_text(json.dumps({"offsets": {"yes": 0, "no": 1.5, "maybe": 2}}))
    assert adapter_label_prior(tmp_path) == {"mode": "hybrid", "offsets": {"yes": 0.0, "no": 1.5, "maybe": 2.0},
                                             "path": str(path)}  # fitted in hybrid unless it says otherwise
    path.write_text(json.dumps({"offsets": {"no": 1.0}, "mode": "finetuned"}))
    assert adapter_label_prior(tmp_path)["mode"] == "finetuned"


@pytest.mark.parametrize("content, field", [
    ("{not json", "cannot read"),
    (json.dumps({"offset": {"yes": 0}}), "'offsets'"),
    (json.dumps({"offsets": {"yes": 0, "perhaps": 1}}), "'offsets.perhaps'"),
    (json.dumps({"offsets": {"no": "high"}}), "'offsets.no'"),
    (json.dumps({"offsets": {"no": 1.0}, "mode": "rag"}), "'mode'"),
])
def test_a_bad_prior_file_is_named_with_its_field(tmp_path: Path, content: str, field: str) -> None:
    path = tmp_path / LABEL_PRIOR_FILE
    path.write_text(content)
    with pytest.raises(LabelPriorError, match=field) as caught:
        read_label_prior(path)
    assert str(path) in str(caught.value)


def test_the_cli_fits_on_an_evals_run_and_writes_the_file(tmp_path: Path, capsys) -> None:
    records = tmp_path / "records.jsonl"
    rows = [_record(id=str(i), label=g, label_logprobs=lp) for i, (g, lp) in enumerate(zip(GOLD, LOGPROBS))]
    rows.append(_record(mode="rag", id="x", label="yes", label_logprobs={"yes": -9.0, "no": 0.0, "maybe": 0.0}))
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "adapter" / LABEL_PRIOR_FILE
    assert main(["--records", str(records), "--mode", "hybrid", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["mode"] == "hybrid"
    assert written["fitted_on"]["questions"] == 6  # the rag record is not the adapter's
    assert written["before"]["macro_f1"] < written["after"]["macro_f1"] == 1.0
    assert read_label_prior(out) == written["offsets"]
    assert "macro-F1 100.0%" in capsys.readouterr().out
    assert main(["--records", str(records), "--mode", "finetuned", "--out", str(out)]) == 2  # no such records
    assert main(["--records", str(records), "--mode", "rag", "--out", str(out)]) == 2  # not the adapter's
    assert read_label_prior(out) == written["offsets"]  # a refused fit leaves the file as it was
