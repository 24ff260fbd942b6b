"""The evaluation's files: results.json, questions.jsonl, continuation.jsonl, report.md and its PNG bar charts."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from core import storage
from core.figures import png_bytes
from core.storage import StorageOptions
from training.evaluation import stats
from training.evaluation.harness_format import write_harness_results
from training.evaluation.mmlu import GROUPS

GROUP_TITLES = {"stem": "STEM", "humanities": "Humanities", "social_sciences": "Social sciences", "other": "Other"}
NORM_TITLES = {"char": "length-normalised (per character)", "sum": "summed", "token": "per token"}


def _pct(entry: dict[str, float]) -> str:
    return f"{100 * entry['accuracy']:.1f} [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"


def _comparison(results: dict[str, Any], label: str, shots: int, norm: str, scope: str) -> dict[str, Any] | None:
    for row in results["mmlu"]["comparisons"]:
        if (row["model"], row["shots"], row["norm"], row["scope"]) == (label, shots, norm, scope):
            return row
    return None


def _mmlu_lines(results: dict[str, Any]) -> list[str]:
    section = results["mmlu"]
    sample = section["sample"]
    labels = [model["label"] for model in results["models"]]
    reference = labels[0]
    lines = [
        "## MMLU",
        "",
        f"- {sample['questions']:,} questions ({sample['method']}, limit {sample['limit']}, seed {sample['seed']})"
        f" from {', '.join(section['selection'])}; {sample['few_shot_pool']} held out as the few-shot pool",
        f"- rows rejected while parsing: {sum(section['rejects'].values())} {section['rejects'] or ''}",
        f"- prompt: {section['format']}",
        "- accuracy in % with its 95% Wilson interval; the chance level is 25%",
        f"- the last column is McNemar's exact test against `{reference}` on the same questions (overall)",
        "",
    ]
    shot_keys = list(section["results"][reference])
    for shot_key in shot_keys:
        shots = int(shot_key.split("-")[0])
        for norm in ("char", "sum"):
            lines += [f"### {shot_key}, {NORM_TITLES[norm]}", ""]
            header = ["model", "overall", *(GROUP_TITLES[g] for g in GROUPS), f"vs {reference}"]
            lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
            for label in labels:
                entry = section["results"][label][shot_key][norm]
                groups = [_pct(entry["groups"][g]) if g in entry["groups"] else "" for g in GROUPS]
                test = _comparison(results, label, shots, norm, "overall")
                verdict = (
                    f"{100 * test['difference']:+.1f} pts, {stats.significance_word(test['p_value'])}" if test else ""
                )
                lines.append(f"| {label} | {_pct(entry['overall'])} | " + " | ".join(groups) + f" | {verdict} |")
            lines.append("")
            not_significant = [
                f"{row['model']} {row['scope']}"
                for row in section["comparisons"]
                if row["shots"] == shots and row["norm"] == norm and not row["significant"]
            ]
            if len(labels) > 1:
                lines += [
                    "Differences from the reference that are not significant (p >= 0.05): "
                    + (", ".join(not_significant) or "none")
                    + ".",
                    "",
                ]
            lines += [f"![MMLU {shot_key} {norm}](mmlu_{shots}shot_{norm}.png)", ""]
    lines += _subject_lines(section, labels, shot_keys[0])
    return lines


def _subject_lines(section: dict[str, Any], labels: list[str], shot_key: str) -> list[str]:
    """Accuracy per subject, length-normalised, for the first shot setting (every setting: results.json)."""
    subjects = section["results"][labels[0]][shot_key]["char"]["subjects"]
    lines = [f"### By subject ({shot_key}, {NORM_TITLES['char']})", ""]
    lines += ["| subject | questions | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    for subject, entry in subjects.items():
        cells = [_pct(section["results"][label][shot_key]["char"]["subjects"][subject]) for label in labels]
        lines.append(f"| {subject} | {entry['total']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _ppl_lines(results: dict[str, Any]) -> list[str]:
    lines = ["## Perplexity", ""]
    for name, entry in results["perplexity"].items():
        labels = list(entry["results"])
        lines += [
            f"### {name}: {entry['documents']} documents",
            "",
            f"Documents skipped while reading, by reason: {entry['skipped'] or 'none'}.",
            "",
            "Token-weighted perplexity with a 95% bootstrap interval over documents; the last column is a paired"
            f" bootstrap over documents against `{labels[0]}`.",
            "",
            f"| model | perplexity | tokens | vs {labels[0]} |",
            "|---|---:|---:|---|",
        ]
        by_model = {row["model"]: row for row in entry["comparisons"]}
        for label in labels:
            value = entry["results"][label]
            test = by_model.get(label)
            verdict = f"x{np.exp(test['log_ratio']):.3f}, {stats.significance_word(test['p_value'])}" if test else ""
            lines.append(
                f"| {label} | {value['perplexity']:.2f} [{value['ci_low']:.2f}, {value['ci_high']:.2f}] |"
                f" {value['tokens']:,} | {verdict} |"
            )
        lines += ["", f"![perplexity {name}](ppl_{_slug(name)}.png)", ""]
    return lines


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower())


def _bar_chart(categories: list[str], series: dict[str, list[tuple[float, float, float]]], title: str, ylabel: str,
               chance: float | None = None, log: bool = False) -> bytes:  # fmt: skip
    """Grouped bars with asymmetric error bars: series maps a model to (value, low, high) per category.

    `log` puts the y axis on a log scale, for perplexities: a base model at 17 stays visible beside a
    pruned one in the thousands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(max(5.0, 1.6 * len(categories) + 2), 3.6))
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(categories))
    for number, (label, values) in enumerate(series.items()):
        value = np.array([v[0] for v in values])
        errors = np.clip(np.array([[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]]), 0, None)
        axis.bar(positions + number * width - 0.4 + width / 2, value, width, yerr=errors, capsize=3, label=label)
    if chance is not None:
        axis.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    if log:
        axis.set_yscale("log")
    axis.set_xticks(positions, categories)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def charts(results: dict[str, Any]) -> dict[str, bytes]:
    """File name -> PNG: MMLU accuracy per group per model (one chart per shot setting and norm), and
    perplexity per model per dataset, each bar with its 95% interval."""
    images: dict[str, bytes] = {}
    if results["mmlu"]:
        section = results["mmlu"]["results"]
        for shot_key in next(iter(section.values())):
            for norm in ("char", "sum"):
                scopes = [
                    "overall",
                    *(g for g in GROUPS if g in next(iter(section.values()))[shot_key][norm]["groups"]),
                ]
                series = {}
                for label, by_shot in section.items():
                    entry = by_shot[shot_key][norm]
                    cells = [entry["overall"] if s == "overall" else entry["groups"][s] for s in scopes]
                    series[label] = [(c["accuracy"], c["ci_low"], c["ci_high"]) for c in cells]
                names = [GROUP_TITLES.get(s, "Overall") for s in scopes]
                title = f"MMLU {shot_key}, {NORM_TITLES[norm]}"
                images[f"mmlu_{shot_key.split('-')[0]}shot_{norm}.png"] = _bar_chart(
                    names, series, title, "accuracy", 0.25
                )
    for name, entry in results["perplexity"].items():
        series = {label: [(v["perplexity"], v["ci_low"], v["ci_high"])] for label, v in entry["results"].items()}
        images[f"ppl_{_slug(name)}.png"] = _bar_chart([name], series, f"Perplexity: {name}", "perplexity", log=True)
    return images


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One comparison table, a row per model: parameters, MMLU (first shot setting, length-normalised)
    and perplexity, each with its interval and its test against the first model."""
    labels = [model["label"] for model in results["models"]]
    reference = labels[0]
    header, notes = ["model", "parameters"], []
    shot_key = None
    if results["mmlu"]:
        section = results["mmlu"]
        shot_key = next(iter(section["results"][reference]))
        header += [f"MMLU {shot_key} %", f"vs {reference}"]
        notes.append(
            f"MMLU: {section['sample']['questions']} questions from {', '.join(section['selection'])},"
            f" {NORM_TITLES['char']}, with 95% Wilson intervals; chance is 25%."
        )
    ppl_names = list(results["perplexity"])
    for name in ppl_names:
        header += [f"perplexity: {name}", f"vs {reference}"]
        notes.append(
            f"Perplexity: {results['perplexity'][name]['documents']} documents ({name}), token-weighted,"
            " with 95% bootstrap intervals and a paired bootstrap test."
        )
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|---|" * ((len(header) - 2) // 2)]
    for model in results["models"]:
        label = model["label"]
        cells = [label, f"{model['parameters']:,}"]
        if shot_key is not None:
            entry = results["mmlu"]["results"][label][shot_key]["char"]["overall"]
            test = _comparison(results, label, int(shot_key.split("-")[0]), "char", "overall")
            verdict = f"{100 * test['difference']:+.1f} pts, {stats.significance_word(test['p_value'])}" if test else ""
            cells += [_pct(entry), verdict]
        for name in ppl_names:
            entry = results["perplexity"][name]
            value = entry["results"][label]
            test = {row["model"]: row for row in entry["comparisons"]}.get(label)
            verdict = f"x{np.exp(test['log_ratio']):.3f}, {stats.significance_word(test['p_value'])}" if test else ""
            cells += [f"{value['perplexity']:.2f} [{value['ci_low']:.2f}, {value['ci_high']:.2f}]", verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", *notes, ""]


def report_markdown(results: dict[str, Any]) -> str:
    lines = ["# Evaluation report", "", "| model | path | parameters |", "|---|---|---:|"]
    lines += [f"| {m['label']} | `{m['model']}` | {m['parameters']:,} |" for m in results["models"]]
    lines.append("")
    if results["mmlu"]:
        lines += _mmlu_lines(results)
    if results["perplexity"]:
        lines += _ppl_lines(results)
    if results.get("continuation"):
        lines += _continuation_lines(results)
    return "\n".join(lines) + "\n"


def _continuation_lines(results: dict[str, Any]) -> list[str]:
    """Per dataset: how many documents gave a question, and each model's accuracy against the first's."""
    lines = ["## Continuation task", ""]
    for name, entry in results["continuation"].items():
        settings, labels = entry["settings"], list(entry["results"])
        by_model = {row["model"]: row for row in entry["comparisons"]}
        lines += [
            f"### {name}: {entry['questions']} questions from {entry['documents']} documents",
            "",
            f"Documents that gave no question, by reason: {entry['skipped'] or 'none'}. Context: the first"
            f" {settings['context_words']} words; choices: the next {settings['choice_words']} words and"
            f" {settings['distractors']} same-topic spans; accuracy in % ({NORM_TITLES[settings['norm']]}) with its"
            f" 95% Wilson interval; the last column is McNemar's exact test against `{labels[0]}`.",
            "",
            f"| model | accuracy | vs {labels[0]} |",
            "|---|---:|---|",
        ]
        for label in labels:
            test = by_model.get(label)
            verdict = f"{100 * test['difference']:+.1f} pts, {stats.significance_word(test['p_value'])}" if test else ""
            lines.append(f"| {label} | {_pct(entry['results'][label]['accuracy'][settings['norm']])} | {verdict} |")
        lines.append("")
    return lines


def write_outputs(out: str, results: dict[str, Any], questions: list[dict[str, Any]],
                  options: StorageOptions | None = None,
                  continuation: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
    storage.write_json_atomic(storage.join(out, "results.json"), results, options)
    payload = "".join(json.dumps(row) + "\n" for row in questions).encode()
    storage.write_bytes_atomic(storage.join(out, "questions.jsonl"), payload, options)
    if continuation is not None:
        payload = "".join(json.dumps(row) + "\n" for row in continuation).encode()
        storage.write_bytes_atomic(storage.join(out, "continuation.jsonl"), payload, options)
    for name, png in charts(results).items():
        storage.write_bytes_atomic(storage.join(out, name), png, options)
    storage.write_bytes_atomic(storage.join(out, "report.md"), report_markdown(results).encode(), options)
    shots = [
        int(key.removesuffix("-shot")) for key in next(iter((results["mmlu"] or {}).get("results", {}).values()), {})
    ]
    write_harness_results(out, results, shots or [0], options)
