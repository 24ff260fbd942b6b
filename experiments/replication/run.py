"""Running the replication: its steps through the pipeline's runner, then its report; the job's config."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from core import storage
from experiments.replication.graph import build_replication
from experiments.replication.spec import ReplicationSpec, load_replication_spec
from pipeline.graph import Step
from pipeline.runner import GraphJobConfig


def budget_rows(steps: list[Step], options: storage.StorageOptions) -> list[dict[str, Any]]:
    """Per fine-tune: documents, training tokens and optimizer steps, from its manifest."""
    from core import manifest

    rows = []
    for step in steps:
        if step.stage != "finetune":
            continue
        found = manifest.read_manifest(step.out, options)
        if found:
            counts = found["counts"]
            rows.append({"arm": step.name.removeprefix("finetune/"), "documents": counts["rows"],
                         "tokens": counts["tokens"], "steps": counts["steps"]})  # fmt: skip
    return rows


LAYOUT = "layout.json"


def layout_record(spec: ReplicationSpec, layout: dict[str, Any]) -> dict[str, Any]:
    """What the report needs beside the evaluations, written to ROOT/layout.json: the arm kinds and labels in
    the report's order, each domain arm's selection.json, and the pilot's evaluations (ratio -> domain ->
    results.json)."""
    from experiments.replication.spec import arm_kinds, arm_labels

    labels = arm_labels(spec.trials, spec.dose, spec.alternatives)
    per_trial = [label for label in labels if "-t" in label]
    return {
        "trials": list(spec.trials),
        "kinds": arm_kinds(spec.dose, spec.alternatives),
        "dose": {
            kind: d
            for kind, d in zip(arm_kinds(spec.dose, spec.alternatives)[-len(spec.dose) :], spec.dose, strict=True)
        }
        if spec.dose
        else {},  # fmt: skip
        "labels": labels,
        "selections": {
            d: {label: storage.join(spec.root, "arms", d, label, "selection.json") for label in per_trial}
            for d in spec.domains
        },  # fmt: skip
        "pilot": {f"{ratio:.2f}": uris for ratio, uris in layout["pilot"].items()},
        "ratio": spec.ratio,
        "calibration": spec.calibration,
    }


def now() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def run_replication(spec: ReplicationSpec, only: list[str] | None = None, command: str = "") -> dict[str, Any]:
    """Run every step not up to date (or only `only` and what it needs), then write the report from the
    evaluations that exist. Returns the state, with the report's text and URI."""
    from experiments.replication.report import ReplicationLayout, write_report
    from pipeline.runner import run_steps, spec_dict

    spec.check_seeds()
    steps, layout = build_replication(spec)
    options = spec.storage_options()
    state = run_steps(steps, spec.root, options, force=spec.force, only=only, spec_dict=spec_dict(spec))
    records = state["steps"]
    hours = sum(record.get("seconds", 0.0) for record in records.values()) / 3600
    header = [
        "# Replication: FineScope data against random data, on held-out labelled documents",
        "",
        f"Command: `{command or 'python -m jobs.replicate --spec SPEC'}`; report written {now()}; steps' run time "
        f"{hours:.2f} h on {os.cpu_count()} CPUs (each step's last run, over every part).",
        f"Base model `{spec.model}`, ratio {spec.ratio} (one pruned model, calibrated on {spec.calibration} random "
        f"pool documents), {spec.budget} documents per arm, {len(spec.trials)} trials "
        f"({', '.join(map(str, spec.trials))}), held-out {spec.heldout} per domain and {spec.general_heldout} general.",
        "",
    ]
    record = layout_record(spec, layout)
    storage.write_json_atomic(storage.join(spec.root, LAYOUT), record, options)
    ready = {d: uris for d, uris in layout["domains"].items() if all(storage.exists(u, options) for u in uris)}
    report_layout = ReplicationLayout(
        domains=ready,
        trials=list(spec.trials),
        ratio_ablation=_if_done(layout["ratio"], options),
        coords_ablation=_if_done(layout["coords"], options),
        budget=budget_rows(steps, options),
        selections=[uri for per_arm in record["selections"].values() for uri in per_arm.values()],
        pilot={
            float(ratio): {d: uri for d, uri in uris.items() if storage.exists(uri, options)}
            for ratio, uris in layout["pilot"].items()
        },
    )
    report = write_report(spec.root, report_layout, options, header=header)
    from pipeline.report import steps_table

    text = report["markdown"] + "\n" + "\n".join(steps_table(spec.root, steps, records, options)) + "\n"
    uri = storage.join(spec.root, "replication.md")
    storage.write_bytes_atomic(uri, text.encode(), options)
    return {**state, "report": text, "report_uri": uri, "figures": report.get("figures", {})}


def _if_done(entry: tuple | None, options: storage.StorageOptions) -> tuple | None:
    return entry if entry and storage.exists(entry[1], options) else None


@dataclass
class ReplicationJobConfig(GraphJobConfig):
    """What `python -m jobs.replicate` does: the replication spec names the domains and their topics, the
    pool, held-out sizes, budget, trials and ablations."""


def run_replication_job(config: ReplicationJobConfig) -> dict[str, Any]:
    spec = load_replication_spec(config.spec, config.overrides())
    command = f"python -m jobs.replicate --spec {config.spec}"
    return run_replication(spec, config.only or None, command=command)
