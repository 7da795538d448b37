"""The run's outputs, made from the records alone: report.md, results.json and metrics.png.

``report.md`` holds one table (metrics as rows, modes as columns, the number of questions
behind each row) and the configuration; ``results.json`` holds the same configuration and
summary plus every per-question record (question, retrieved ids, answer, scores) for reading
the failures; ``metrics.png`` charts the headline metrics per mode.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.metrics import summarize

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
CHART_FILE = "metrics.png"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


@dataclass(frozen=True)
class Row:
    label: str
    key: str
    fmt: Callable[[float], str]
    n_key: str = "questions"


ROWS: tuple[Row, ...] = (
    Row("retrieval recall@1", "recall@1", _pct, "n_retrieval"),
    Row("retrieval recall@5", "recall@5", _pct, "n_retrieval"),
    Row("retrieval recall@10", "recall@10", _pct, "n_retrieval"),
    Row("retrieval MRR (top 10)", "mrr", lambda v: f"{v:.3f}", "n_retrieval"),
    Row("label accuracy, generated answer", "accuracy_generated", _pct, "n_closed"),
    Row("label macro-F1, generated answer", "macro_f1_generated", _pct, "n_closed"),
    Row("label accuracy, likelihood", "accuracy_likelihood", _pct, "n_likelihood"),
    Row("label macro-F1, likelihood", "macro_f1_likelihood", _pct, "n_likelihood"),
    Row("... of which with the adapter's label prior", "n_label_prior", lambda v: f"{v:.0f}", "n_likelihood"),
    Row("label accuracy, likelihood before the label prior", "accuracy_likelihood_raw", _pct, "n_likelihood"),
    Row("label macro-F1, likelihood before the label prior", "macro_f1_likelihood_raw", _pct, "n_likelihood"),
    Row("majority-class baseline accuracy", "majority_accuracy", _pct, "n_closed"),
    Row("majority-class baseline macro-F1", "majority_macro_f1", _pct, "n_closed"),
    Row("answer token F1", "token_f1", _pct, "n_free"),
    Row("answer ROUGE-L", "rouge_l", _pct, "n_free"),
    Row("key-number recall (reference numbers stated)", "key_number_recall", _pct, "n_key_numbers"),
    Row("key-number precision (stated numbers in the reference)", "key_number_precision", _pct,
        "n_key_number_precision"),
    Row("answers stating a number no chunk contains", "unsupported_number_share", _pct, "n_unsupported_checked"),
    Row("shown quotes verified in their source", "quotes_verified", _pct, "n_quoting"),
    Row("updates: answered from the newer document", "answered_from_newer", _pct, "n_updates"),
    Row("citations point at the gold document", "cites_gold", _pct, "n_cites_gold"),
    Row("... among answers that cite something", "cites_gold_when_citing", _pct, "n_citing"),
    Row("cites something not retrieved (must be 0)", "phantom_citation_share", _pct),
    Row("unanswerable: correctly declined", "declined_unanswerable", _pct, "n_unanswerable"),
    Row("answerable: declined anyway", "declined_answerable", _pct, "n_answerable"),
    Row("time to first token, s (mean)", "ttft_s", lambda v: f"{v:.2f}"),
    Row("tokens/s (all tokens / all decode time)", "tokens_per_s", lambda v: f"{v:.1f}"),
    Row("retrieval ms (mean)", "retrieval_ms", lambda v: f"{v:.0f}"),
    Row("total s per question (mean)", "total_s", lambda v: f"{v:.2f}"),
)

# Headline metrics charted per mode (shares, 0-100 %), when the question set has them.
CHART_METRICS: tuple[tuple[str, str], ...] = (
    ("recall@5", "recall@5"),
    ("MRR", "mrr"),
    ("accuracy (generated)", "accuracy_generated"),
    ("accuracy (likelihood)", "accuracy_likelihood"),
    ("token F1", "token_f1"),
    ("key-number recall", "key_number_recall"),
    ("ROUGE-L", "rouge_l"),
    ("cites gold", "cites_gold"),
    ("declines unanswerable", "declined_unanswerable"),
    ("declines answerable", "declined_answerable"),  # beside it: refusing everything is no skill
)


def summaries(records: Sequence[Mapping[str, Any]], modes: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {mode: summarize([r for r in records if r["mode"] == mode]) for mode in modes}


def markdown_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    modes = list(summary)
    lines = [f"| metric | n | {' | '.join(modes)} |", "|---|---:|" + "---:|" * len(modes)]
    for row in ROWS:
        values = [summary[m].get(row.key) for m in modes]
        if all(v is None for v in values):
            continue  # the question set has nothing this row measures
        if row.key.startswith("majority"):
            label = summary[modes[0]].get("majority_label")
            row_label = f"{row.label} (always '{label}')"
        else:
            row_label = row.label
        n = max(summary[m].get(row.n_key) or 0 for m in modes)
        cells = ["–" if v is None else row.fmt(v) for v in values]
        lines.append(f"| {row_label} | {n} | {' | '.join(cells)} |")
    return "\n".join(lines)


# What the per-question-type table shows: the rows where types differ most.
TYPE_ROWS: tuple[tuple[str, str], ...] = (
    ("recall@1", "recall@1"), ("key-number recall", "key_number_recall"), ("token F1", "token_f1"),
    ("declined", "declined"),
)


def type_table(records: Sequence[Mapping[str, Any]], modes: Sequence[str]) -> str:
    """Per question type x mode: retrieval recall@1, key-number recall, token F1, declined share."""
    types = sorted({r.get("type") or "untyped" for r in records})
    if len(types) < 2:
        return ""
    lines = ["| type | metric | " + " | ".join(modes) + " |", "|---|---|" + "---:|" * len(modes)]
    for qtype in types:
        for label, key in TYPE_ROWS:
            cells = []
            for mode in modes:
                values = [r["scores"].get(key) for r in records
                          if r["mode"] == mode and (r.get("type") or "untyped") == qtype]
                present = [float(v) for v in values if v is not None]
                cells.append(f"{100 * sum(present) / len(present):.1f}% ({len(present)})" if present else "–")
            if any(c != "–" for c in cells):
                lines.append(f"| {qtype} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(config: Mapping[str, Any], summary: Mapping[str, Mapping[str, Any]],
                  notes: Sequence[str] = (), by_type: str = "") -> str:
    qa = config["question_set"]
    llm = config["llm"]
    retrieval = config["retrieval"]
    adapter = config.get("adapter") or {}
    parts = [
        "# ragtune evaluation",
        "",
        f"Question set `{qa['path']}`: {config['questions']} questions evaluated "
        f"({', '.join(f'{n} {t}' for t, n in qa['types'].items())}); sha256 `{qa['sha256'][:12]}`.",
        "",
        markdown_table(summary),
        "",
        "Shares are over the n questions of each row (retrieval and citation rows: modes that retrieve). "
        "`extractive` is the baseline with no generation: the chat's retrieval, then the 2 sentences closest "
        "to the question by the embedder. Definitions: docs/evals.md.",
        "",
        *([("## Per question type (share, and questions behind it)"), "", by_type, ""] if by_type else []),
        "## Configuration",
        "",
        f"- command: `{config['command']}`",
        # Runs recorded before llm.backend existed were transformers runs with llm.setting.
        f"- chat model: {llm.get('weights') or llm['model']} through `llm.backend={llm.get('backend', 'transformers')}` "
        f"(`llm.model={llm.get('setting') or llm['model']}`), greedy decoding "
        f"(temperature {llm['temperature']}), max_new_tokens {llm['max_new_tokens']}, "
        f"repetition_penalty {llm['repetition_penalty']}, context_window {llm['context_window']}",
        f"- adapter: {adapter.get('path') or 'none'}"
        + (f" (fingerprint sha256 `{adapter['fingerprint']}`)" if adapter.get("fingerprint") else "")
        + (f"; label prior {config['label_prior']['offsets']} applied to {config['label_prior']['mode']} "
           f"({config['label_prior']['path']})" if config.get("label_prior") else ""),
        f"- embedder: {config['embedder']}; collection `{config['collection']['name']}` "
        f"({config['collection']['points']} chunks)"
        # Runs recorded before the tuned embedder have no mode_vectors: every mode searched dense.
        + "".join(f"; {mode} searches `{v['vector']}` ({v['embedder']})"
                  for mode, v in sorted((config.get("mode_vectors") or {}).items()) if v["vector"] != "dense"),
        f"- retrieval: k={retrieval['k']} for the answer, k={retrieval['recall_k']} for recall@k/MRR, "
        f"search={retrieval['search']}, score_threshold={retrieval['score_threshold']}; "
        f"follow-ups condensed by `{config['condense']}`"
        + (f" (up to {config['condense_turns']} earlier questions)"
           if config["condense"] == "concat" and config.get("condense_turns") else ""),
        f"- seed {config['seed']}; modes {', '.join(config['modes'])}; run {config['started']}"
        + (f" (resumed {', '.join(config['resumed'])})" if config.get("resumed") else "")
        + (f"; --limit {config['limit']}" if config.get("limit") else ""),
    ]
    if config.get("selection"):
        parts.append(f"- questions selected by {config['selection']}")
    if notes:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(parts) + "\n"


def write_chart(summary: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> Path | None:
    """Grouped bars of the headline metrics per mode, and seconds per question beside them."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    except ImportError:
        return None
    modes = list(summary)
    metrics = [(label, key) for label, key in CHART_METRICS if any(summary[m].get(key) is not None for m in modes)]
    figure = Figure(figsize=(max(7.0, 1.1 * len(metrics) + 3.5), 4.2), layout="constrained")
    quality, cost = figure.subplots(1, 2, width_ratios=[max(len(metrics), 1), 1.3])
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(metrics))]
        raw = [summary[mode].get(key) for _, key in metrics]
        # A metric the mode does not have (retrieval in base) gets "n/a", not a bar at zero.
        bars = quality.bar(xs, [100 * v if v is not None else 0.0 for v in raw], width, label=mode)
        quality.bar_label(bars, labels=["n/a" if v is None else f"{100 * v:.0f}" for v in raw], fontsize=7, padding=1)
    majority = summary[modes[0]].get("majority_accuracy") if modes else None
    accuracy_at = [j for j, (_, key) in enumerate(metrics) if key.startswith("accuracy")]
    if majority is not None and accuracy_at:  # the bar the accuracies have to clear
        quality.hlines(100 * majority, min(accuracy_at) - 0.45, max(accuracy_at) + 0.45, colors="grey",
                       linestyles="dashed", label=f"majority class ({100 * majority:.0f})")
    quality.set_xticks(range(len(metrics)), [label for label, _ in metrics], rotation=25, ha="right", fontsize=8)
    quality.set_ylim(0, 109)
    quality.set_ylabel("% (MRR × 100)")
    quality.set_title(f"{title}: quality per mode" if title else "quality per mode", fontsize=10)
    quality.legend(fontsize=8, ncols=max(len(quality.get_legend_handles_labels()[0]), 1), loc="upper right")
    seconds = [summary[m].get("total_s") or 0.0 for m in modes]
    cost.bar(modes, seconds, color=[f"C{i}" for i in range(len(modes))])
    cost.set_ylabel("seconds per question (mean)")
    cost.set_title("cost", fontsize=10)
    cost.tick_params(axis="x", labelsize=8, labelrotation=30)
    figure.savefig(path, dpi=110)
    return path


def write_outputs(out: Path, config: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                  modes: Sequence[str], notes: Sequence[str] = ()) -> dict[str, Path]:
    summary = summaries(records, modes)
    written = {"report": out / REPORT_FILE, "results": out / RESULTS_FILE}
    written["report"].write_text(render_report(config, summary, notes, type_table(records, modes)), encoding="utf-8")
    written["results"].write_text(json.dumps(
        {"config": config, "summary": summary, "notes": list(notes), "records": list(records)},
        indent=2, ensure_ascii=False,
    ) + "\n", encoding="utf-8")
    chart = write_chart(summary, out / CHART_FILE, title=Path(config["question_set"]["path"]).name)
    if chart is not None:
        written["chart"] = chart
    return written
