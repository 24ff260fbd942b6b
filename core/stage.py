"""The stage contract: a stage declares its config, what it reads and what it writes; one runner does the rest.

A stage is its own logic and nothing else: a `plan` that validates the config against the storage and the
model (reading no weights, starting no Ray) and a `run` that does the work. :func:`run_stage` owns
everything around them, the same way for every stage:

1. plan the run; the plan carries the inputs and the digest (the manifest hash);
2. refuse an output that is, holds or lies inside a path the stage reads;
3. skip when `out` holds a manifest of this exact run;
4. claim the output directory: clear it only when FineScope wrote it for this stage (its `manifest.json`, or
   the in-progress marker an interrupted run left), keep what an interrupted run of the same digest resumes
   from, and refuse anything else, naming the flag and the fix;
5. start Ray, time the run, log its start and end;
6. write `manifest.json` last, then drop the marker.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from core import manifest, storage
from core.errors import ConfigError
from core.storage import FileInfo, StorageOptions

logger = logging.getLogger(__name__)

MARKER = manifest.IN_PROGRESS
"""Written into `out` before a stage writes anything else, removed after its manifest: an output holding it
was left by an interrupted run of the stage it names, and that stage may clear it or resume from it."""
OWNERSHIP_FILES = (manifest.MANIFEST, MARKER, *manifest.SCHEDULE_MARKERS, "pipeline.json")
"""Files that say a directory is a FineScope output (a stage's, a scheduled curation's or a pipeline's root)."""


class Plan(Protocol):
    """What a stage's plan carries at least: the files it reads (for the manifest) and the run's digest."""

    inputs: Sequence[FileInfo]
    digest: str


@dataclass
class FilesPlan:
    """The plan of a stage that needs nothing beyond its input files and its digest."""

    inputs: list[FileInfo]
    digest: str


C = TypeVar("C")
P = TypeVar("P", bound=Plan)


@dataclass
class Outcome:
    """What a stage's work reports: counts for the manifest, and extra manifest fields."""

    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage(Generic[C, P]):
    """One stage: its name (the manifest's `stage`), its plan and its work, and what it reads and keeps.

    `reads(config)` lists the paths the stage reads (data, models, seeds, SAE): an output may not be, hold or
    lie inside any of them. `keep` names the entries of `out` that an interrupted run of the same digest
    resumes from (distillation's parts, fine-tuning's checkpoints); everything else is cleared."""

    name: str
    plan: Callable[[C], P]
    run: Callable[[C, P, manifest.Timer], Outcome]
    reads: Callable[[C], Iterable[str]] = lambda config: ()
    keep: tuple[str, ...] = ()
    uses_ray: bool = True


def run_stage(stage: Stage[C, P], config: C) -> dict[str, Any]:
    """Run `stage` on `config` under the contract (module docstring); returns the manifest."""
    plan = stage.plan(config)
    options: StorageOptions = config.storage_options()  # type: ignore[attr-defined]
    out: str = config.out  # type: ignore[attr-defined]
    force: bool = config.force  # type: ignore[attr-defined]
    check_output_path(out, stage.reads(config), options)
    if (done := manifest.finished(out, plan.digest, options, force)) is not None:
        return done
    claim_output(out, stage.name, plan.digest, options, keep=() if force else stage.keep)
    if stage.uses_ray:
        from core.runtime import init_ray

        init_ray(config.ray_address)  # type: ignore[attr-defined]
    logger.info("%s: running (hash %s) -> %s", stage.name, plan.digest, out)
    timer = manifest.Timer()
    started = time.perf_counter()
    outcome = stage.run(config, plan, timer)
    result = manifest.write_manifest(
        out, stage=stage.name, config=dataclasses.asdict(config), digest=plan.digest,  # type: ignore[call-overload]
        inputs=plan.inputs, counts=outcome.counts, timings=timer.timings, options=options, extra=outcome.extra,
    )  # fmt: skip
    storage.remove(storage.join(out, MARKER), options)
    logger.info("%s: finished in %.1f s -> %s", stage.name, time.perf_counter() - started, out)
    return result


# The output directory ---------------------------------------------------------------------------------


def _normalised(uri: str) -> str:
    """A path comparable with others: local paths absolute with symlinks resolved, remote ones as written."""
    if storage.is_remote(uri):
        return uri.rstrip("/")
    _, path = storage.filesystem(uri)
    return os.path.realpath(path)


def _read_paths(values: Iterable[str]) -> list[str]:
    """The paths among what a stage reads: a glob's static root, a URI, or a local path that exists (a
    model's embedded name or Hub id is not a path and is left out)."""
    paths = []
    for value in values:
        if not value:
            continue
        root = _static_prefix(value)
        if storage.is_remote(root) or os.path.exists(storage.filesystem(root)[1]):
            paths.append(root)
    return paths


def _static_prefix(pattern: str) -> str:
    """A glob's directory before its first wildcard; any other path as it is."""
    parts = pattern.split("/")
    wild = next((i for i, part in enumerate(parts) if any(char in part for char in "*?[")), len(parts))
    return "/".join(parts[:wild]) or "."


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_output_path(out: str, reads: Iterable[str], options: StorageOptions | None = None) -> None:
    """Refuse an output that is, holds or lies inside a path the stage reads: clearing it would delete the
    stage's own inputs, and writing into an input directory would add files to what it reads."""
    if not out:
        raise ConfigError("out", out, "is required: pass --out DIR (local or s3://)")
    target = _normalised(out)
    for path in _read_paths(reads):
        source = _normalised(path)
        if _within(source, target) or _within(target, source):
            relation = "is" if source == target else "holds" if _within(source, target) else "lies inside"
            raise ConfigError("out", out, f"{relation} {path}, which this stage reads; pass an output directory "
                              "of its own, outside every input (e.g. a new directory beside them)")  # fmt: skip


def _marker(out: str, options: StorageOptions | None) -> dict[str, Any] | None:
    uri = storage.join(out, MARKER)
    return storage.read_json(uri, options) if storage.exists(uri, options) else None


def _entries(out: str, options: StorageOptions | None) -> list[str]:
    """Names directly under `out`; empty when it does not exist."""
    fs, path = storage.filesystem(out, options)
    if not fs.isdir(path):
        return []
    return sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False))


def _owner(out: str, entries: list[str], options: StorageOptions | None) -> tuple[str | None, dict[str, Any] | None]:
    """(the stage that wrote `out`, its in-progress marker): from the manifest, else the marker."""
    marker = _marker(out, options) if MARKER in entries else None
    if manifest.MANIFEST in entries:
        return str((manifest.read_manifest(out, options) or {}).get("stage")), marker
    return (str(marker.get("stage")), marker) if marker else (None, None)


def _nested_outputs(out: str, options: StorageOptions | None) -> list[str]:
    """FineScope outputs nested under `out` (another stage's manifest, a pipeline root): clearing `out` would
    take them too."""
    fs, path = storage.filesystem(out, options)
    base = path.rstrip("/")
    return sorted(
        name for name in fs.find(path) if name.rsplit("/", 1)[-1] in OWNERSHIP_FILES and name.rsplit("/", 1)[0] != base
    )


def claim_output(out: str, stage: str, digest: str, options: StorageOptions | None, keep: tuple[str, ...] = ()) -> None:
    """Make `out` this run's: create it, or clear what this stage wrote there before, and mark it in progress.

    Cleared only when `out` holds this stage's manifest or marker. When the marker is this very run's (an
    interrupted run of the same digest), the `keep` entries stay for the stage to resume from. An output
    holding anything else, another stage's output included, is refused and nothing is touched."""
    entries = _entries(out, options)
    if entries:
        owner, marker = _owner(out, entries, options)
        if owner != stage:
            raise ConfigError("out", out, _refusal(stage, owner, entries))
        nested = _nested_outputs(out, options)
        if nested:
            raise ConfigError("out", out, f"holds other FineScope outputs ({', '.join(nested[:3])}); clearing this "
                              f"`{stage}` output would delete them: move them out, or pass another --out")  # fmt: skip
        resumes = marker is not None and marker.get("hash") == digest and manifest.MANIFEST not in entries
        kept = [name for name in entries if resumes and name in keep]
        logger.info("%s: clearing the earlier `%s` output%s", out, stage, f" (resuming from {kept})" if kept else "")
        for name in entries:
            if name not in kept and name != MARKER:
                storage.remove(storage.join(out, name), options)
    storage.makedirs(out, options)
    note = {"stage": stage, "hash": digest, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": platform.node(), "pid": os.getpid()}  # fmt: skip
    storage.write_json_atomic(storage.join(out, MARKER), note, options)


def _refusal(stage: str, owner: str | None, entries: list[str]) -> str:
    """Why an output directory is not this stage's to clear, and what to do instead."""
    if owner is not None:
        what = f"holds the output of `{owner}`, not of `{stage}`"
    elif set(entries) & set(OWNERSHIP_FILES):
        what = "is the root of a pipeline or of a scheduled curation"
    else:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        what = f"holds files FineScope did not write ({shown})"
    return (f"{what}; a stage clears only an output it wrote itself, so nothing was touched: pass a new or "
            "empty --out directory, or move those files away")  # fmt: skip
