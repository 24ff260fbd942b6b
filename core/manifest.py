"""Stage manifests: the last file a stage writes, and the proof that its output is complete.

A manifest holds the config, a hash of the config and inputs, the inputs (uri, size, mtime), row
counts and timings. An output directory without a manifest is incomplete and is redone; one whose
manifest hash equals the current run's hash is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Sequence
from typing import Any

from core import storage
from core.storage import FileInfo, StorageOptions

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


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
