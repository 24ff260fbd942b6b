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
    "split": ("train", "heldout", "random"),
    "distill": ("distilled",),
}
"""For each stage whose output another stage reads, the subdirectories of its output that hold datasets."""
NOT_DATASETS = ("parts", "rejects", "scored", "shards")
"""Subdirectories of stage outputs that no stage reads as data: distill's resume parts (the rows of
`distilled/` again, before deduplication), rejected rows, every scored corpus document (curate), and
a scheduled curation's per-shard candidates."""
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


def prepare_output(out: str, options: StorageOptions | None = None) -> None:
    """Clear an incomplete or outdated output so a rerun never mixes two runs' files."""
    if storage.exists(out, options):
        logger.info("clearing %s: no manifest for this config", out)
        storage.remove(out, options)
    storage.makedirs(out, options)


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
    return f"pass {accepted}" + (f"; this output's datasets are {datasets}" if datasets else "")


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
    if MANIFEST in children:
        stage = str((read_manifest(data, options) or {}).get("stage"))
        if stage in reads:
            resolved = storage.join(data, reads[stage])
            logger.info("%s is a `%s` output: reading its %s/", data, stage, reads[stage])
            return resolved
        raise ConfigError(field, data, f"is the output of `{stage}`, which this stage does not read; "
                          + _choices(stage, data, reads))  # fmt: skip
    if children & set(SCHEDULE_MARKERS):
        pointer = storage.join(data, "CURRENT")
        current = storage.read_json(pointer, options) if "CURRENT" in children else None
        snapshot = storage.join(data, current["path"], "curated.parquet") if current else "a snapshot (none yet)"
        raise ConfigError(field, data, f"is a scheduled curation's output root; pass its current snapshot, {snapshot}")
    internals = sorted(children & set(NOT_DATASETS))
    if internals:
        subdirs = ", ".join(f"{name}/" for name in internals)
        raise ConfigError(field, data, f"holds {subdirs} but no {MANIFEST}: a stage output that is not finished "
                          "(or not one at all); finish that stage and pass its output again, or pass the dataset "
                          "directory itself")  # fmt: skip
    wanted = [sub for sub in reads.values() if sub in children]
    if wanted:  # a hand-made output root: only the dataset directory, no manifest
        logger.info("%s has a %s/ directory: reading it", data, wanted[0])
        return storage.join(data, wanted[0])
    return data


def _stage_root_of(uri: str, options: StorageOptions | None, cache: dict[str, str | None]) -> tuple[str, str] | None:
    """(stage output root, directory name) when `uri` lies in a NOT_DATASETS directory of a stage output."""
    parts = uri.split("/")
    for index in range(len(parts) - 1, 0, -1):
        if parts[index] not in NOT_DATASETS:
            continue
        root = "/".join(parts[:index])
        if root not in cache:
            cache[root] = next(
                (name for name in (MANIFEST, *SCHEDULE_MARKERS) if storage.exists(storage.join(root, name), options)),
                None,
            )
        if cache[root] is not None:
            return root, parts[index]
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
    names that end in one of `suffixes` (all when empty). A file inside a stage output's parts/, rejects/,
    scored/ or shards/ is refused, however it was named (a glob, a file, the directory itself)."""
    paths = [data] if isinstance(data, str) else list(data)
    resolved = [resolve_input(path, field=field, reads=reads, options=options) for path in paths]
    files = storage.expand(resolved, options, config_field=field)
    cache: dict[str, str | None] = {}
    for info in files:
        if (found := _stage_root_of(info.uri, options, cache)) is not None:
            root, name = found
            stage = str((read_manifest(root, options) or {}).get("stage", "scheduled curation"))
            raise ConfigError(field, data, f"names {info.uri}, in the {name}/ of a `{stage}` output ({root}), "
                              "which holds no dataset to read; " + _choices(stage, root, reads))  # fmt: skip
    if suffixes:
        files = [info for info in files if info.uri.endswith(suffixes)]
    return files
