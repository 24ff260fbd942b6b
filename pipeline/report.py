"""`ROOT/report.md`: each domain's comparison table and a link to every stage's report."""

from __future__ import annotations

from typing import Any

from core import storage
from core.storage import StorageOptions
from pipeline.graph import Step, ratio_tag
from pipeline.spec import PipelineSpec
from training.evaluation.report import summary_lines

_STAGE_REPORTS = {
    "sae": ["manifest.json"],
    "curate": ["report.md"],
    "split": ["manifest.json"],
    "prune": ["prune_report.json"],
    "distill": ["manifest.json"],
    "finetune": ["metrics.jsonl", "train_summary.json"],
    "evaluate": ["report.md", "results.json"],
}


def _link(root: str, uri: str) -> str:
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri


def pipeline_report(spec: PipelineSpec, steps: list[Step], records: dict[str, Any], options: StorageOptions) -> str:
    lines = [
        "# FineScope pipeline report",
        "",
        f"Base model `{spec.model}`, teacher `{spec.teacher or spec.model}` ({spec.backend}), pruning ratios "
        f"{', '.join(ratio_tag(r) for r in spec.ratios)}, domains: {', '.join(spec.domains)}.",
        "",
        *_precision_lines(spec.root, steps, options),
    ]
    for domain in spec.domains:
        results_uri = storage.join(spec.root, domain, "eval", "results.json")
        lines += [f"## {domain}", ""]
        if storage.exists(results_uri, options):
            lines += summary_lines(storage.read_json(results_uri, options))
            lines += [f"Full evaluation: [{domain}/eval/report.md]({domain}/eval/report.md).", ""]
        else:
            lines += ["Not evaluated yet.", ""]
    return "\n".join(lines + steps_table(spec.root, steps, records, options)) + "\n"


def _precision_lines(root: str, steps: list[Step], options: StorageOptions) -> list[str]:
    """What the curation's encode ran in: `dtype: auto` selects other documents where it becomes bfloat16."""
    from core.placement import describe_dtype

    curate = next((step for step in steps if step.stage == "curate"), None)
    uri = storage.join(curate.out, "manifest.json") if curate else None
    if uri is None or not storage.exists(uri, options):
        return []
    return [f"Curation encoded in {describe_dtype(storage.read_json(uri, options).get('dtype'))}.", ""]


def steps_table(root: str, steps: list[Step], records: dict[str, Any], options: StorageOptions) -> list[str]:
    """The `## Steps` section: each step's status, time, output and links to its stage's reports."""
    lines = ["## Steps", "", "| step | status | seconds | output | reports |", "|---|---|---:|---|---|"]
    for step in steps:
        record = records.get(step.name)
        if record is None:
            lines.append(f"| {step.name} | not run | | `{_link(root, step.out)}` | |")
            continue
        links = []
        for name in _STAGE_REPORTS.get(step.stage, ["manifest.json"]):
            uri = storage.join(step.out, name)
            if storage.exists(uri, options):
                links.append(f"[{name}]({_link(root, uri)})")
        lines.append(
            f"| {step.name} | {record['status']} | {record['seconds']} | `{_link(root, step.out)}` |"
            f" {', '.join(links)} |"
        )
    return lines
