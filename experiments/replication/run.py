"""Running the replication: its steps through the pipeline's runner, then its report; the job's config."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from core import storage
from experiments.replication.data import SELECTION
from experiments.replication.graph import build_replication, calibration_read
from experiments.replication.spec import ReplicationSpec, load_replication_spec
from pipeline.graph import Step
from pipeline.runner import GraphJobConfig

logger = logging.getLogger(__name__)
SCOPES = ("domain", "general")


def budget_rows(steps: list[Step], options: storage.StorageOptions, root: str = "", ship: str | None = None
                ) -> list[dict[str, Any]]:  # fmt: skip
    """Per fine-tune: documents, training tokens and optimizer steps, from its manifest (under `root`, else its
    copy under `ship`)."""
    rows = []
    for step in steps:
        if step.stage != "finetune":
            continue
        uri = shipped(storage.join(step.out, MANIFEST), root, ship, options)
        if storage.exists(uri, options):
            counts = storage.read_json(uri, options)["counts"]
            rows.append({"arm": step.name.removeprefix("finetune/"), "documents": counts["rows"],
                         "tokens": counts["tokens"], "steps": counts["steps"]})  # fmt: skip
    return rows


LAYOUT = "layout.json"
MANIFEST = "manifest.json"
RESULTS = "results.json"


def layout_record(spec: ReplicationSpec, layout: dict[str, Any]) -> dict[str, Any]:
    """What the report needs beside the evaluations, written to ROOT/layout.json: the arm kinds and labels in
    the report's order, each domain's evaluations (its references' and each trial's, on the domain's and the
    general held-out set), each domain arm's selection.json, the pilot's evaluations (ratio -> domain ->
    results.json) and where the parts are shipped."""
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
        "evaluations": {
            d: {
                "reference": dict(zip(SCOPES, found["reference"], strict=True)),
                "trials": {str(t): dict(zip(SCOPES, uris, strict=True)) for t, uris in found["trials"].items()},
            }
            for d, found in layout["domains"].items()
        },  # fmt: skip
        "selections": {
            d: {label: storage.join(spec.root, "arms", d, label, SELECTION) for label in per_trial}
            for d in spec.domains
        },  # fmt: skip
        "pilot": {f"{ratio:.2f}": uris for ratio, uris in layout["pilot"].items()},
        "ratio": spec.ratio,
        "calibration": spec.calibration,
        "ship": spec.ship,
    }


def now() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def shipped(uri: str, root: str, ship: str | None, options: storage.StorageOptions) -> str:
    """`uri`, a file under `root`, where it exists; else its copy under `ship` where that exists; else `uri`."""
    if not ship or storage.exists(uri, options):
        return uri
    copy = _ship_path(uri, root, ship)
    return copy if copy and storage.exists(copy, options) else uri


def _ship_path(uri: str, root: str, ship: str) -> str | None:
    """The place under `ship` of a file under `root` (None for a file outside it)."""
    prefix = root.rstrip("/") + "/"
    return storage.join(ship, uri[len(prefix) :]) if uri.startswith(prefix) else None


SHIP_SPEC = "spec.json"
"""Beside the shipped parts: the spec they were made by, so that parts of two specs never mix in one report."""
UNBOUND = frozenset({"root", "ship", "trials"})
"""Spec fields a shipped part does not depend on: where it ran, where it is shipped, and which other trials
exist (each trial's seeds are its own)."""


def ship_identity(spec: ReplicationSpec) -> dict[str, Any]:
    """What a shipped part's figures depend on: the spec's content but `UNBOUND`, as plain JSON values."""
    content = {name: value for name, value in spec.content().items() if name not in UNBOUND}
    return json.loads(json.dumps(content, sort_keys=True, default=str))


def check_ship(spec: ReplicationSpec) -> None:
    """Refuse a `ship` directory whose parts were made by another spec: its figures would not compare."""
    from core.errors import ConfigError

    if not spec.ship:
        return
    options, uri = spec.storage_options(), storage.join(spec.ship, SHIP_SPEC)
    if not storage.exists(uri, options):
        return
    bound, identity = storage.read_json(uri, options), ship_identity(spec)
    changed = sorted(name for name in {*bound, *identity} if bound.get(name) != identity.get(name))
    if changed:
        fix = "give this spec a new ship directory, or delete that one to start the parts again"
        raise ConfigError("ship", spec.ship, f"holds parts of another spec (it differs in {', '.join(changed)}): {fix}")


def ship_parts(spec: ReplicationSpec, steps: list[Step]) -> list[str]:
    """Copy what the report reads of every finished step to the same path under `spec.ship`: each
    evaluation's results.json, each arm's selection.json and each fine-tune's manifest.json, never a model.
    A copy whose bytes are already there is skipped. Returns the URIs written."""
    from core import manifest

    options, written = spec.storage_options(), []
    bound = storage.join(spec.ship or "", SHIP_SPEC)
    if not storage.exists(bound, options):
        storage.write_json_atomic(bound, ship_identity(spec), options)
    files = {"evaluate": RESULTS, "arm": SELECTION, "finetune": MANIFEST}
    for step in steps:
        name = files.get(step.stage)
        if name is None or manifest.read_manifest(step.out, options) is None:
            continue  # not finished: its stage writes the manifest last
        source = storage.join(step.out, name)
        target = _ship_path(source, spec.root, spec.ship or "")
        if target is None or not storage.exists(source, options):
            continue  # an arm without a domain writes no selection.json
        with storage.open_read(source, options) as handle:
            payload = handle.read()
        if storage.exists(target, options):
            with storage.open_read(target, options) as handle:
                if handle.read() == payload:
                    continue
        storage.write_bytes_atomic(target, payload, options)
        written.append(target)
    logger.info("shipped %d files to %s", len(written), spec.ship)
    return written


def run_replication(spec: ReplicationSpec, only: list[str] | None = None, command: str = "") -> dict[str, Any]:
    """Run every step not up to date (or only `only` and what it needs), ship what the report reads of every
    finished step (with `spec.ship`; also when a step fails, so that the finished ones outlast the machine),
    then write the report from the evaluations that exist under ROOT or were shipped. Returns the state, with
    the report's text and URI."""
    from pipeline.runner import run_steps, spec_dict

    spec.check_seeds()
    check_ship(spec)
    steps, layout = build_replication(spec)
    options = spec.storage_options()
    try:
        state = run_steps(steps, spec.root, options, force=spec.force, only=only, spec_dict=spec_dict(spec))
    finally:
        if spec.ship:
            ship_parts(spec, steps)
    return {**state, **write_replication_report(spec, steps, layout, state["steps"], command)}


def write_replication_report(spec: ReplicationSpec, steps: list[Step], layout: dict[str, Any],
                             records: dict[str, Any], command: str = "") -> dict[str, Any]:  # fmt: skip
    """Write ROOT/layout.json and the report (ROOT/replication.md, replication.json, the plots) from every
    evaluation and selection.json found under ROOT or, failing that, under `spec.ship`. A domain is reported
    once its references and at least one trial are found. `records`: the steps' records in pipeline.json, for
    the report's table of steps. Returns {"report", "report_uri", "figures"}."""
    from experiments.replication.report import DomainParts, ReplicationLayout, write_report
    from pipeline.report import steps_table

    check_ship(spec)
    options = spec.storage_options()

    def found(uri: str) -> str | None:
        located = shipped(uri, spec.root, spec.ship, options)
        return located if storage.exists(located, options) else None

    def pair(uris: tuple[str, str]) -> tuple[str, str] | None:
        domain, general = found(uris[0]), found(uris[1])
        return (domain, general) if domain and general else None

    hours = sum(record.get("seconds", 0.0) for record in records.values()) / 3600
    header = [
        "# Replication: FineScope data against random data, on held-out labelled documents",
        "",
        f"Command: `{command or 'python -m jobs.replicate --spec SPEC'}`; report written {now()}; steps' run time "
        f"{hours:.2f} h on {os.cpu_count()} CPUs (each step's last run under this root; parts shipped from other"
        " machines not counted).",
        f"Base model `{spec.model}`, ratio {spec.ratio} (one pruned model, {_calibration_note(spec, steps)}), "
        f"{spec.budget} documents per arm, {len(spec.trials)} trials "
        f"({', '.join(map(str, spec.trials))}), held-out {spec.heldout} per domain and {spec.general_heldout} general.",
        "",
    ]
    record = layout_record(spec, layout)
    storage.write_json_atomic(storage.join(spec.root, LAYOUT), record, options)
    domains = {}
    for d, evaluations in layout["domains"].items():
        reference = pair(evaluations["reference"])
        trials = {t: located for t, uris in evaluations["trials"].items() if (located := pair(uris))}
        if reference and trials:
            domains[d] = DomainParts(reference=reference, trials=trials)
    report_layout = ReplicationLayout(
        domains=domains,
        trials=list(spec.trials),
        ratio_ablation=_if_done(layout["ratio"], found),
        coords_ablation=_if_done(layout["coords"], found),
        budget=budget_rows(steps, options, spec.root, spec.ship),
        selections=[
            located for per_arm in record["selections"].values() for uri in per_arm.values() if (located := found(uri))
        ],  # fmt: skip
        pilot={
            float(ratio): {d: located for d, uri in uris.items() if (located := found(uri))}
            for ratio, uris in layout["pilot"].items()
        },
    )
    report = write_report(spec.root, report_layout, options, header=header)
    text = report["markdown"] + "\n" + "\n".join(steps_table(spec.root, steps, records, options)) + "\n"
    uri = storage.join(spec.root, "replication.md")
    storage.write_bytes_atomic(uri, text.encode(), options)
    return {"report": text, "report_uri": uri, "figures": report.get("figures", {})}


def _calibration_note(spec: ReplicationSpec, steps: list[Step]) -> str:
    """What the one pruning at `spec.ratio` read of the calibration draw, for the report's header."""
    config = next(s.config for s in steps if s.stage == "prune" and s.config.ratio == spec.ratio)
    read = calibration_read(spec, config)
    if not read:
        return f"{config.method} pruning, no calibration documents"
    if read < spec.calibration:
        return f"calibrated on the first {read} of {spec.calibration} random pool documents"
    return f"calibrated on {read} random pool documents"


def _if_done(entry: tuple | None, found: Any) -> tuple | None:
    """An ablation's (domain, results.json, values) with the results.json where it was found; None if nowhere."""
    located = found(entry[1]) if entry else None
    return (entry[0], located, entry[2]) if entry and located else None


@dataclass
class ReplicationJobConfig(GraphJobConfig):
    """What `python -m jobs.replicate` does: the replication spec names the domains and their topics, the
    pool, held-out sizes, budget, trials and ablations."""


def run_replication_job(config: ReplicationJobConfig) -> dict[str, Any]:
    spec = load_replication_spec(config.spec, config.overrides())
    command = f"python -m jobs.replicate --spec {config.spec}"
    return run_replication(spec, config.only or None, command=command)
