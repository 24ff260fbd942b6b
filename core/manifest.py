"""Stage manifests: the last file a stage writes, and the proof that its output is complete.

A manifest holds the config, a hash of the config and inputs, the inputs (uri, size, mtime), row
counts and timings. An output directory without a manifest is incomplete and is redone; one whose
manifest hash equals the current run's hash is skipped.

A stage that reads another stage's output goes through :func:`resolve_input` / :func:`input_files`: given
an output root, the manifest says which stage wrote it and so which subdirectory holds the dataset; the
rest of an output (resume parts, rejects, every scored document) is never read as data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

from core import storage
from core.errors import ConfigError
from core.storage import FileInfo, StorageOptions

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"

STAGE_DATASETS: dict[str, tuple[str, ...]] = {
    "curate": ("curated",),
    "reselect": ("curated",),  # jobs.select: a curate output's layout, selected again from its stored codes
    "split": ("train", "heldout", "random"),
    "distill": ("distilled",),
    # The replication's data steps (experiments/replication/data.py).
    "holdout": ("heldout", "pool"),
    "arm": ("rows",),
    "union": ("rows",),
    "select": ("rows",),
}
"""For each stage whose output another stage reads, the subdirectories of its output that hold datasets."""
NOT_DATASETS = ("parts", "rejects", "scored", "shards")
"""Subdirectories of stage outputs that no stage reads as data: distill's resume parts (the rows of
`distilled/` again, before deduplication), rejected rows, every scored corpus document (curate), and
a scheduled curation's per-shard candidates. The one exception is a reader that names one of them in its
`reads` (jobs.select reads a curate output's `scored/`, whose stored codes it selects from): that reader,
and no other, may read it."""
SCHEDULE_MARKERS = ("CURRENT", "spec.json")
"""Files at the root of a scheduled curation's output, whose dataset is the current snapshot."""


def config_hash(config: dict[str, Any], inputs: Sequence[FileInfo] = ()) -> str:
    """A stable hash of a stage's config and the identity (uri, size, mtime) of its inputs."""
    payload = {
        "config": config,
        "inputs": [[info.uri, info.size, info.mtime] for info in inputs],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(out: str, options: StorageOptions | None = None) -> dict[str, Any] | None:
    uri = storage.join(out, MANIFEST)
    if not storage.exists(uri, options):
        return None
    return storage.read_json(uri, options)


def finished(
    out: str, digest: str, options: StorageOptions | None = None, force: bool = False
) -> dict[str, Any] | None:
    """The manifest of a finished run of exactly this config and these inputs in `out`; None when there is
    none, or when `force` asks for the stage to be redone. A stage returns early on a manifest."""
    if force:
        return None
    manifest = read_manifest(out, options)
    if manifest is None or manifest.get("hash") != digest:
        return None
    logger.info("%s is complete for this config (hash %s): skipping (--force redoes it)", out, digest)
    return manifest


def write_manifest(
    out: str,
    *,
    stage: str,
    config: dict[str, Any],
    digest: str,
    inputs: Sequence[FileInfo],
    counts: dict[str, Any],
    timings: dict[str, float],
    options: StorageOptions | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    manifest = {
        "stage": stage,
        "hash": digest,
        "config": config,
        "inputs": [{"uri": info.uri, "size": info.size, "mtime": info.mtime} for info in inputs],
        "counts": counts,
        "timings_s": {name: round(seconds, 3) for name, seconds in timings.items()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        **(extra or {}),
    }
    storage.write_json_atomic(storage.join(out, MANIFEST), manifest, options)
    return manifest


class Timer:
    """Named wall-clock timings, for manifests and progress lines."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, name: str) -> _Span:
        return _Span(self, name)


class _Span:
    def __init__(self, timer: Timer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> _Span:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.timings[self.name] = self.timer.timings.get(self.name, 0.0) + time.perf_counter() - self.started


# Stage outputs as inputs ---------------------------------------------------------------------------

IN_PROGRESS = ".finescope-stage.json"
"""The marker a stage writes into its output before anything else (core.stage): its output is unfinished."""


def _children(uri: str, options: StorageOptions | None) -> set[str]:
    """Names directly under `uri` when it is a directory; empty for a file, a glob or nothing."""
    if any(char in uri for char in "*?["):
        return set()
    fs, path = storage.filesystem(uri, options)
    if not fs.isdir(path):
        return set()
    return {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)}


def _choices(stage: str, root: str, reads: Mapping[str, str]) -> str:
    """What to pass instead, for a refusal: the output roots this input accepts, or the datasets of `root`."""
    accepted = " or ".join(f"the output of `{name}` (or its {sub}/)" for name, sub in reads.items())
    datasets = ", ".join(storage.join(root, sub) for sub in STAGE_DATASETS.get(stage, ()))
    first = f"pass {accepted}" if accepted else "pass data files, a directory of them or a glob"
    return first + (f"; this output's datasets are {datasets}" if datasets else "")


def _unfinished(what: str) -> str:
    """The refusal of an unfinished stage output: its datasets may be partial, so none of it is read."""
    return (
        f"{what} but no {MANIFEST}: a stage output that is not finished (interrupted, or still running), whose "
        "datasets may be partial; run that stage again until it finishes, then pass its output root"
    )


def resolve_input(data: str, *, field: str, reads: Mapping[str, str], options: StorageOptions | None = None) -> str:
    """The path to read for `data`, the value of a stage's --`field`: `data` itself, or a dataset inside it.

    `reads` maps each stage whose output root is accepted to the subdirectory read from it (e.g.
    ``{"distill": "distilled"}``). A root whose manifest names such a stage resolves to that subdirectory;
    any other stage output, an unfinished one, or a scheduled curation's root is refused at once, with
    what to pass instead. A directory with no manifest and none of a stage's own subdirectories is data.
    """
    children = _children(data, options)
    if not children:
        return data
    if MANIFEST in children and (found := read_manifest(data, options) or {}).get("stage"):
        stage = str(found["stage"])
        if stage in reads:
            if reads[stage] == "curated":  # its scored/ is whole: jobs.select may read it again
                _refuse_empty_selection(found, data, field)
            resolved = storage.join(data, reads[stage])
            logger.info("%s is a `%s` output: reading its %s/", data, stage, reads[stage])
            return resolved
        raise ConfigError(field, data, f"is the output of `{stage}`, which this stage does not read; "
                          + _choices(stage, data, reads))  # fmt: skip
    if IN_PROGRESS in children:
        raise ConfigError(field, data, _unfinished("holds an in-progress marker"))
    if children & set(SCHEDULE_MARKERS):
        raise ConfigError(field, data, _scheduled_refusal(data, children, options))
    internals = sorted(children & set(NOT_DATASETS))
    if internals:
        raise ConfigError(field, data, _unfinished("holds " + ", ".join(f"{name}/" for name in internals)))
    wanted = [sub for sub in reads.values() if sub in children]
    if wanted:  # a hand-made output root: only the dataset directory, no manifest
        logger.info("%s has a %s/ directory: reading it", data, wanted[0])
        return storage.join(data, wanted[0])
    return data


SELECTING_STAGES = ("curate", "reselect")
"""Stages whose dataset is a selection, which may choose no document (`counts.curated_rows` 0)."""


def check_selection(root: str, *, field: str, options: StorageOptions | None = None) -> None:
    """Refuse, naming `field`, a curate or jobs.select output that selected no document: its curated/ set is
    empty, and every stage that reads it would fail later with less to go on."""
    _refuse_empty_selection(read_manifest(root, options) or {}, root, field)


def _refuse_empty_selection(found: Mapping[str, Any], root: str, field: str) -> None:
    if found.get("stage") in SELECTING_STAGES and (found.get("counts") or {}).get("curated_rows") == 0:
        raise ConfigError(field, root, f"is a `{found['stage']}` output that selected no document (its report.md "
                          "has the scores); select again with a larger --top-n, a lower --threshold or other "
                          "seeds: python -m jobs.select reads its stored codes")  # fmt: skip


def _stage_of(root: str, options: StorageOptions | None) -> str | None:
    """The stage a FineScope manifest in `root` names; None for a manifest.json that is not one of ours."""
    stage = (read_manifest(root, options) or {}).get("stage")
    return str(stage) if stage else None


def _scheduled_refusal(root: str, children: set[str], options: StorageOptions | None) -> str:
    current = storage.read_json(storage.join(root, "CURRENT"), options) if "CURRENT" in children else None
    snapshot = storage.join(root, current["path"], "curated.parquet") if current else "a snapshot (none yet)"
    return f"is a scheduled curation's output root; pass its current snapshot, {snapshot}"


def _what_is(root: str, options: StorageOptions | None, cache: dict) -> tuple[set[str], str | None]:
    """(names under `root`, the stage its FineScope manifest names or None), listed once per root."""
    if root not in cache:
        children = _children(root, options)
        cache[root] = (children, _stage_of(root, options) if MANIFEST in children else None)
    return cache[root]


def _readable_in(
    root: str, rest: list[str], options: StorageOptions | None, cache: dict, reads: Mapping[str, str]
) -> str | None:
    """Why a file at `root/<rest...>` may not be read as data, judged by what `root` is; None when `root`
    says nothing against it (it is no stage output, or the file lies in one of its datasets, or in the
    directory `reads` names for its stage)."""
    children, stage = _what_is(root, options, cache)
    head = rest[0]
    if stage is not None:
        if head in STAGE_DATASETS.get(stage, ()) or reads.get(stage) == head:
            return None
        return f"lies in {head} of a `{stage}` output ({root}), which holds no dataset to read"
    if IN_PROGRESS in children:
        return _unfinished(f"lies in {root}, which holds an in-progress marker")
    if children & set(SCHEDULE_MARKERS):
        if head == "snapshots" and rest[-1] == "curated.parquet":
            return None
        return f"lies in a scheduled curation's output root ({root}), outside its snapshots"
    datasets = {sub for subs in STAGE_DATASETS.values() for sub in subs}
    if children & set(NOT_DATASETS) and (head in NOT_DATASETS or head in datasets):
        return _unfinished(f"lies in {root}, which holds {', '.join(sorted(children & set(NOT_DATASETS)))}")
    return None


def refusal_for_file(
    uri: str, options: StorageOptions | None, cache: dict, reads: Mapping[str, str] | None = None
) -> tuple[str, str] | None:
    """(the stage output root, why) when the file `uri` lies somewhere this reader may not read data from:
    outside the datasets of a finished stage output (and outside the directory `reads` names for its stage),
    or anywhere in an unfinished one or a scheduled curation's root (its snapshots aside). The nearest
    enclosing output decides."""
    parts = uri.split("/")
    floor = 3 if "://" in uri else 1  # never above the bucket (s3://bucket) or the filesystem's root
    for index in range(len(parts) - 1, floor - 1, -1):
        root = "/".join(parts[:index]) or "/"
        why = _readable_in(root, parts[index:], options, cache, reads or {})
        if why is not None:
            return root, why
        if _what_is(root, options, cache)[1] is not None:
            return None  # inside a finished output's dataset: nothing above it decides otherwise
    return None


def input_files(
    data: str | Sequence[str],
    *,
    field: str,
    reads: Mapping[str, str],
    options: StorageOptions | None = None,
    suffixes: tuple[str, ...] = (),
) -> list[FileInfo]:
    """The files a stage reads for --`field`: each path through :func:`resolve_input`, expanded, keeping
    names that end in one of `suffixes` (all when empty). A file that lies in a stage output but outside its
    datasets (parts/, rejects/, scored/, reports), in an unfinished output, or in a scheduled curation's root
    outside its snapshots is refused, however it was named (a glob, a file, a directory)."""
    paths = [data] if isinstance(data, str) else list(data)
    resolved = [resolve_input(path, field=field, reads=reads, options=options) for path in paths]
    files = storage.expand(resolved, options, config_field=field)
    cache: dict[str, tuple[set[str], str | None]] = {}
    for info in files:
        if (found := refusal_for_file(info.uri, options, cache, reads)) is not None:
            root, why = found
            stage = cache[root][1] or "scheduled curation"
            raise ConfigError(field, data, f"names {info.uri}, which {why}; " + _choices(stage, root, reads))
    if suffixes:
        files = [info for info in files if info.uri.endswith(suffixes)]
    return files


def corpus_files(corpus: str | Sequence[str], options: StorageOptions | None = None) -> list[FileInfo]:
    """The corpus shards --corpus names, read like any stage input: a stage output's internals, an unfinished
    output or a scheduled curation's root are refused, never read as documents."""
    return input_files(corpus, field="corpus", reads={}, options=options)
