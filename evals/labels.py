"""python -m evals.labels: fit an adapter's label prior (yes / no / maybe) on its own training questions.

A small model's likelihood of "Yes" / "No" / "Maybe" as the start of its answer carries the
training split's label frequencies (PubMedQA's dev set: 55% yes, 11% maybe), so the most likely
label is nearly always the majority one. The prior is one additive log-offset per label, the same
correction as the "prior" or "calibrate before use" adjustments of few-shot classification
(Zhao et al. 2021), chosen here by a grid search that maximises macro-F1 on questions of the
adapter's *training* split (never on the questions it is evaluated on):

    label = argmax over labels of  log P(label | prompt) + offset[label]

The offsets live beside the adapter (``ADAPTER/label_prior.json``, with the mode they were fitted
in), so the adapter is evaluated with the correction it was fitted with wherever it goes;
``python -m evals`` applies them to that mode only (hybrid's likelihoods, read with the abstract
in the prompt, are not finetuned's) and reports the uncorrected likelihood label beside them.

Examples:
  # the adapter's likelihoods on (some of) its training questions, in the mode it will be evaluated in
  python -m evals --qa ../shared/data/pubmedqa/dev.jsonl --collection pubmedqa --modes hybrid \\
      --adapter /tmp/pubmedqa-run/adapters/pubmedqa --ids /tmp/pubmedqa-run/finetune/pubmedqa/sft/train.jsonl \\
      --limit 150 --set llm.max_new_tokens=1 --set retrieval.evidence.enabled=false --out /tmp/pubmedqa-calib
  python -m evals.labels --records /tmp/pubmedqa-calib/records.jsonl --mode hybrid \\
      --out /tmp/pubmedqa-run/adapters/pubmedqa/label_prior.json

Exit status: 0 written, 2 unusable input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.modes import ADAPTED_MODES
from core.qa import CLOSED_LABELS

LABEL_PRIOR_FILE = "label_prior.json"
DEFAULT_MODE = "hybrid"
# Offsets tried for each label but the first (the first stays at 0: only differences matter).
GRID = tuple(round(-4.0 + 0.1 * i, 1) for i in range(81))


class LabelPriorError(ValueError):
    """A label prior file that cannot be used; the message names the file and the field."""


def apply_prior(logprobs: Mapping[str, float], prior: Mapping[str, float] | None) -> dict[str, float]:
    """Log-probabilities plus the prior's offset for each label (a label it does not name: 0)."""
    prior = prior or {}
    return {label: value + float(prior.get(label, 0.0)) for label, value in logprobs.items()}


def read_label_prior(path: Path) -> dict[str, float]:
    """``{"offsets": {"yes": 0.0, "no": 1.2, "maybe": 2.3}, "mode": "hybrid", ...}`` -> the offsets."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelPriorError(f"{path}: cannot read the label prior: {exc}") from exc
    offsets = data.get("offsets") if isinstance(data, dict) else None
    if not isinstance(offsets, dict) or not offsets:
        raise LabelPriorError(f"{path}: field 'offsets' must be an object such as "
                              '{"yes": 0.0, "no": 1.0, "maybe": 2.0}')
    problems = [f"'offsets.{k}'" for k, v in offsets.items()
                if k not in CLOSED_LABELS or isinstance(v, bool) or not isinstance(v, (int, float))]
    if problems:
        raise LabelPriorError(f"{path}: {', '.join(problems)}: the labels are {', '.join(CLOSED_LABELS)} "
                              "and each offset a number")
    mode = data.get("mode", DEFAULT_MODE)
    if mode not in ADAPTED_MODES:
        raise LabelPriorError(f"{path}: field 'mode' must be one of {', '.join(ADAPTED_MODES)}, not {mode!r}")
    return {label: float(value) for label, value in offsets.items()}


def prior_mode(path: Path) -> str:
    """The mode a prior was fitted in (its likelihoods), the only one it is applied to."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return data.get("mode", DEFAULT_MODE) if isinstance(data, dict) else DEFAULT_MODE


def adapter_label_prior(adapter_dir: str | Path | None) -> dict[str, Any] | None:
    """``{"mode": ..., "offsets": {...}}`` beside an adapter folder, or None when it has none (or
    is a served name). Each mode's likelihoods have their own bias (finetuned reads no documents),
    so a prior applies to the mode it was fitted in only."""
    if not adapter_dir:
        return None
    path = Path(adapter_dir) / LABEL_PRIOR_FILE
    if not path.is_file():
        return None
    offsets = read_label_prior(path)
    return {"mode": prior_mode(path), "offsets": offsets, "path": str(path)}


def fit_label_prior(gold: Sequence[str], logprobs: Sequence[Mapping[str, float]],
                    grid: Sequence[float] = GRID) -> dict[str, float]:
    """The offsets (first label 0) with the highest macro-F1 on these questions; ties go to the
    higher accuracy, then to the smallest correction (sum of |offset|), then to the grid order."""
    from evals.metrics import accuracy, label_from_logprobs, macro_f1

    if not gold or len(gold) != len(logprobs):
        raise ValueError("fit_label_prior needs one set of log-probabilities per gold label, and at least one")
    labels = [label for label in CLOSED_LABELS if all(label in lp for lp in logprobs)]
    if len(labels) < 2:
        raise ValueError(f"the log-probabilities name fewer than two of {', '.join(CLOSED_LABELS)}")
    best: tuple[tuple[float, float, float], dict[str, float]] | None = None
    for shifts in itertools.product(grid, repeat=len(labels) - 1):
        prior = {labels[0]: 0.0, **dict(zip(labels[1:], shifts))}
        predicted = [label_from_logprobs(apply_prior(lp, prior)) for lp in logprobs]
        key = (macro_f1(gold, predicted) or 0.0, accuracy(gold, predicted) or 0.0, -sum(map(abs, shifts)))
        if best is None or key > best[0]:
            best = (key, prior)
    assert best is not None
    return best[1]


def prior_figures(gold: Sequence[str], logprobs: Sequence[Mapping[str, float]],
                  prior: Mapping[str, float] | None) -> dict[str, Any]:
    from evals.metrics import accuracy, label_from_logprobs, macro_f1

    predicted = [label_from_logprobs(apply_prior(lp, prior)) for lp in logprobs]
    return {"accuracy": round(accuracy(gold, predicted) or 0.0, 4), "macro_f1": round(macro_f1(gold, predicted) or 0.0, 4),
            "predicted": dict(Counter(predicted))}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evals.labels", description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--records", type=Path, required=True, help="records.jsonl of a python -m evals run")
    parser.add_argument("--mode", default="hybrid", help="whose likelihoods to fit on (default hybrid)")
    parser.add_argument("--out", type=Path, required=True, help=f"where to write it: ADAPTER/{LABEL_PRIOR_FILE}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from evals.records import RecordLog

    if not args.records.is_file():
        print(f"error: {args.records} does not exist", file=sys.stderr)
        return 2
    records = [r for r in RecordLog(args.records).load().records
               if r["mode"] == args.mode and r.get("label") and r.get("label_logprobs")]
    if not records:
        print(f"error: {args.records}: no {args.mode} records with a label and label_logprobs", file=sys.stderr)
        return 2
    gold = [r["label"] for r in records]
    logprobs = [r["label_logprobs"] for r in records]
    prior = fit_label_prior(gold, logprobs)
    if args.mode not in ADAPTED_MODES:
        print(f"error: --mode {args.mode}: a label prior is the adapter's: {', '.join(ADAPTED_MODES)}", file=sys.stderr)
        return 2
    result = {
        "offsets": prior,
        "mode": args.mode,
        "fitted_on": {"records": str(args.records), "mode": args.mode, "questions": len(records),
                      "labels": dict(Counter(gold)), "ids": sorted(r["id"] for r in records)},
        "before": prior_figures(gold, logprobs, None),
        "after": prior_figures(gold, logprobs, prior),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{len(records)} {args.mode} questions ({', '.join(f'{k} {v}' for k, v in result['fitted_on']['labels'].items())})")
    for when in ("before", "after"):
        f = result[when]
        print(f"{when:6}: accuracy {100 * f['accuracy']:.1f}%, macro-F1 {100 * f['macro_f1']:.1f}%, predicted {f['predicted']}")
    print(f"offsets {prior} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
