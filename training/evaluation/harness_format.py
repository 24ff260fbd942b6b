"""results.json in lm-evaluation-harness's layout, so that dashboards and scripts that read lm-eval output
read FineScope's: one file per model and shot setting, `lm_eval/<label>/results-<k>shot.json`.

    {"results": {"mmlu_high_school_biology": {"alias": ..., "acc,none": 0.35, "acc_stderr,none": 0.02,
                                              "acc_norm,none": ..., "acc_norm_stderr,none": ...}, ...},
     "groups": {"mmlu": {...}, "mmlu_stem": {...}, ...}, "group_subtasks": {...},
     "n-shot": {task: k}, "n-samples": {task: {"original": n, "effective": n}}, "config": {...}}

`acc` is the choice with the highest summed log-likelihood (FineScope's `sum` rule) and `acc_norm` the
highest log-likelihood per character of the continuation (`char`), as lm-eval defines them. Standard
errors are lm-eval's: the sample standard deviation of the per-question hits over sqrt(n), which is
sqrt(p(1-p)/(n-1)). A group's accuracy is over all its questions (lm-eval's size-weighted mean) and its
standard error that of the pooled questions. Held-out perplexity, which lm-eval has no MMLU-style task for,
is written as `finescope_ppl_<name>` with `token_perplexity,none`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from core import storage
from core.storage import StorageOptions

METRICS = {"acc": "sum", "acc_norm": "char"}
"""lm-eval's metric -> FineScope's scoring rule that computes it."""
GROUP_TASKS = {"stem": "mmlu_stem", "humanities": "mmlu_humanities", "social_sciences": "mmlu_social_sciences",
               "other": "mmlu_other"}  # fmt: skip


def _stderr(entry: dict[str, Any]) -> float:
    """lm-eval's standard error of a mean of 0/1 hits: sample standard deviation over sqrt(n)."""
    n, p = entry["total"], entry["accuracy"]
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def _task_entry(alias: str, by_rule: dict[str, dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"alias": alias}
    for metric, rule in METRICS.items():
        if rule in by_rule:
            entry[f"{metric},none"] = by_rule[rule]["accuracy"]
            entry[f"{metric}_stderr,none"] = _stderr(by_rule[rule])
    return entry


def _scope(summaries: dict[str, Any], kind: str, key: str | None = None) -> dict[str, dict[str, Any]]:
    """{rule: accuracy entry} of one subject or group (`kind` subjects or groups, `key` its name) or of the
    overall (`kind` overall), across the scoring rules."""
    picked = {rule: summary[kind] if key is None else summary[kind].get(key) for rule, summary in summaries.items()}
    return {rule: entry for rule, entry in picked.items() if entry is not None}


def _mmlu_tasks(summaries: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """(subject tasks, groups, questions per subject task) from one model's `K-shot` summaries."""
    first = next(iter(summaries.values()), {"subjects": {}, "groups": {}})
    tasks = {f"mmlu_{subject}": _task_entry(f" - {subject}", _scope(summaries, "subjects", subject))
             for subject in first["subjects"]}  # fmt: skip
    groups = {task: _task_entry(f" - {group}", _scope(summaries, "groups", group))
              for group, task in GROUP_TASKS.items() if group in first["groups"]}  # fmt: skip
    if summaries:
        groups["mmlu"] = _task_entry("mmlu", _scope(summaries, "overall"))
    totals = {f"mmlu_{subject}": entry["total"] for subject, entry in first["subjects"].items()}
    return tasks, groups, totals


def _ppl_tasks(results: dict[str, Any], label: str) -> dict[str, Any]:
    tasks = {}
    for name, entry in (results.get("perplexity") or {}).items():
        if found := entry["results"].get(label):
            task = "finescope_ppl_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            tasks[task] = {"alias": name, "token_perplexity,none": found["perplexity"]}
    return tasks


def harness_results(results: dict[str, Any], label: str, shots: int) -> dict[str, Any]:
    """One model's MMLU accuracies (and perplexities) at one shot setting, in lm-eval's layout."""
    summaries = results["mmlu"]["results"][label][f"{shots}-shot"] if results.get("mmlu") else {}
    tasks, groups, totals = _mmlu_tasks(summaries)
    tasks.update(_ppl_tasks(results, label))
    return {
        "results": {**groups, **tasks},
        "groups": groups,
        "group_subtasks": {"mmlu": sorted(groups.keys() - {"mmlu"})} if "mmlu" in groups else {},
        "n-shot": {task: shots for task in {**tasks, **groups}},
        "n-samples": {task: {"original": n, "effective": n} for task, n in totals.items()},
        "config": {"model": label, "model_source": _model_source(results, label), "num_fewshot": shots},
        "model_name": label,
    }


def _model_source(results: dict[str, Any], label: str) -> str | None:
    return next((entry["model"] for entry in results.get("models", []) if entry["label"] == label), None)


def write_harness_results(out: str, results: dict[str, Any], shots: list[int], options: StorageOptions | None) -> None:
    """`lm_eval/<label>/results-<k>shot.json` for every model and shot setting."""
    for entry in results.get("models", []):
        for k in shots:
            uri = storage.join(out, "lm_eval", entry["label"], f"results-{k}shot.json")
            storage.write_json_atomic(uri, harness_results(results, entry["label"], k), options)
