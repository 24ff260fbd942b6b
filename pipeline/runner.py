"""Running the graph: each step not up to date, in order, with its record in `ROOT/pipeline.json`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from core import manifest, storage
from core.errors import ConfigError
from core.stage import run_stage
from core.storage import StorageOptions
from pipeline.graph import Step, step_key
from pipeline.report import pipeline_report
from pipeline.spec import PipelineSpec, load_spec
from pipeline.steps import build_steps

logger = logging.getLogger(__name__)

STATE = "pipeline.json"
REPORT = "report.md"


def _read_state(root: str, options: StorageOptions) -> dict[str, Any]:
    uri = storage.join(root, STATE)
    return storage.read_json(uri, options) if storage.exists(uri, options) else {"steps": {}}


def run_pipeline(spec: PipelineSpec, only: list[str] | None = None) -> dict[str, Any]:
    """Run every step that is not up to date, in order; returns the pipeline state (also in pipeline.json)
    with the report's text (`report`, also in report.md) and where it was written (`report_uri`).

    `only`: stop after these steps and what they need (step names or stage names)."""
    steps = build_steps(spec)
    options = spec.storage_options()
    state = run_steps(steps, spec.root, options, force=spec.force, only=only, spec_dict=spec_dict(spec))
    report = pipeline_report(spec, steps, state["steps"], options)
    storage.write_bytes_atomic(storage.join(spec.root, REPORT), report.encode(), options)
    return {**state, "report": report, "report_uri": storage.join(spec.root, REPORT)}


def run_steps(
    steps: list[Step],
    root: str,
    options: StorageOptions,
    force: bool = False,
    only: list[str] | None = None,
    spec_dict: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run each step of a graph that is not up to date, in order, recording it in `ROOT/pipeline.json`
    (the spec that built the graph goes there too); returns that state. Shared by every graph-shaped job."""
    wanted = _needed(steps, only) if only else {s.name for s in steps}
    with root_lock(root, options):
        return _run_wanted(steps, wanted, root, options, force, spec_dict)


def _run_wanted(
    steps: list[Step], wanted: set[str], root: str, options: StorageOptions, force: bool, spec_dict: dict | None
) -> dict[str, Any]:
    state = _read_state(root, options)
    state["spec"] = spec_dict or {}
    records: dict[str, dict[str, Any]] = state["steps"]
    started = time.perf_counter()
    logger.info("%d steps under %s", len(wanted), root)
    for step in steps:
        if step.name not in wanted:
            continue
        upstream = [records[name]["stage_hash"] for name in step.after]
        key = step_key(step, upstream)
        record = records.get(step.name, {})
        current = manifest.read_manifest(step.out, options)
        if not force and _up_to_date(step, key, record, current):
            logger.info("step %-32s skipped: up to date (key %s)", step.name, key)
            record["status"] = "skipped"
            continue
        records[step.name] = _run_step(step, key, current, force, options)
        storage.write_json_atomic(storage.join(root, STATE), state, options)
    state["seconds"] = round(time.perf_counter() - started, 1)
    storage.write_json_atomic(storage.join(root, STATE), state, options)
    return state


LOCK = ".pipeline.lock"
"""Held by the run working under a root: two runs on one root would clear and write each other's steps."""


@contextlib.contextmanager
def root_lock(root: str, options: StorageOptions) -> Iterator[None]:
    """Hold `ROOT/.pipeline.lock` for the run; refuse the root while another live run holds it.

    A lock left by a run that died on this host (its process is gone) is taken over; one from another host
    cannot be judged from here, and the refusal says how to release it by hand."""
    uri = storage.join(root, LOCK)
    note = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    storage.makedirs(root, options)
    while not storage.write_bytes_exclusive(uri, json.dumps(note).encode(), options):
        holder = _lock_holder(uri, options)
        if holder is None:
            continue  # released between the create and the read: try again
        if holder.get("host") == note["host"] and not _alive(int(holder.get("pid", 0))):
            logger.warning("%s: taking over the lock of pid %s, which is no longer running", root, holder.get("pid"))
            storage.remove(uri, options)
            continue
        raise ConfigError("root", root, f"another pipeline run holds it (host {holder.get('host')}, pid "
                          f"{holder.get('pid')}, since {holder.get('started_at')}); wait for it to end, or, if it "
                          f"is no longer running, delete {uri}")  # fmt: skip
    try:
        yield
    finally:
        storage.remove(uri, options)


def _lock_holder(uri: str, options: StorageOptions) -> dict[str, Any] | None:
    try:
        return storage.read_json(uri, options)
    except FileNotFoundError:
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _up_to_date(step: Step, key: str, record: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """The step's config and upstream are those of its recorded run, its output is that run's, and its stage's
    plan finds the same digest: the files it reads from outside the graph (corpus, seeds, model, MMLU) are
    unchanged too. Planning validates and lists inputs; it loads no weights."""
    if current is None or record.get("key") != key or current.get("hash") != record.get("stage_hash"):
        return False
    digest = step.contract.plan(step.config).digest
    if digest != current["hash"]:
        logger.info("step %-32s its inputs changed since its last run (hash %s, now %s)", step.name,
                    current["hash"], digest)  # fmt: skip
        return False
    return True


def _run_step(
    step: Step, key: str, current: dict[str, Any] | None, force: bool, options: StorageOptions
) -> dict[str, Any]:
    """Hand one step to its stage, which skips, resumes or redoes it; returns the step's record."""
    before = current.get("finished_at") if current else None
    logger.info("step %-32s running (key %s) -> %s", step.name, key, step.out)
    if force:
        step.config.force = True
    began = time.perf_counter()
    run_stage(step.contract, step.config)
    finished = manifest.read_manifest(step.out, options)
    if finished is None:
        raise RuntimeError(f"step {step.name} finished without writing {step.out}/manifest.json")
    reran = finished.get("finished_at") != before or finished.get("hash") != (current or {}).get("hash")
    return {
        "key": key,
        "stage_hash": finished["hash"],
        "stage": step.stage,
        "out": step.out,
        "status": "ran" if reran else "stage up to date",
        "seconds": round(time.perf_counter() - began, 1),
        "finished_at": finished.get("finished_at"),
    }


def _needed(steps: list[Step], only: list[str]) -> set[str]:
    by_name = {s.name: s for s in steps}
    chosen = {s.name for s in steps if s.stage in only or any(s.name == o or s.name.startswith(o + "/") for o in only)}
    if not chosen:
        raise ConfigError("only", only, f"names no step; steps: {', '.join(by_name)}")
    todo, needed = list(chosen), set()
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += by_name[name].after
    return needed


def spec_dict(spec: Any) -> dict[str, Any]:
    """A spec dataclass as plain JSON values, for pipeline.json."""
    return json.loads(json.dumps(dataclasses.asdict(spec), default=str))


# The job ------------------------------------------------------------------------------------------


@dataclass
class GraphJobConfig:
    """What a graph-shaped job (`python -m jobs.pipeline`, `python -m jobs.replicate`) takes on its command
    line: the spec and what to override in it."""

    spec: str = ""
    """The spec (YAML): what the graph is built from."""
    root: str | None = None
    """Overrides the spec's storage root (local or s3://)."""
    only: list[str] = field(default_factory=list)
    """Run only these steps (or stages, or step prefixes such as `finetune/mathematics`) and what they need."""
    force: bool = False
    """Redo every step, even those that are up to date."""
    ray_address: str | None = None
    """Ray cluster to join; unset: $RAY_ADDRESS (set by `ray job submit`), else a local Ray."""

    def __post_init__(self) -> None:
        if not self.spec:
            raise ConfigError("spec", self.spec, "is required: pass --spec SPEC.yaml")

    def overrides(self) -> dict[str, Any]:
        """The spec fields these flags set."""
        chosen = {"force": self.force, "root": self.root, "ray_address": self.ray_address}
        return {name: value for name, value in chosen.items() if value}


@dataclass
class PipelineJobConfig(GraphJobConfig):
    """What `python -m jobs.pipeline` does: the pipeline spec names the model, corpus, seeds, domains,
    ratios, teacher, backend, root and each stage's settings."""

    corpus: list[str] = field(default_factory=list)
    """Overrides the spec's corpus shards (paths, directories or globs)."""

    def overrides(self) -> dict[str, Any]:
        return {**super().overrides(), **({"corpus": self.corpus} if self.corpus else {})}


def run_pipeline_job(config: PipelineJobConfig) -> dict[str, Any]:
    return run_pipeline(load_spec(config.spec, config.overrides()), config.only or None)
