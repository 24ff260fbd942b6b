"""A spec's dataset as snapshots: each publish merges every done shard's candidates into a new
`snapshots/vNNNNNN/`, then points `CURRENT` at it. Also the sweep of what crashed batches left behind
(round work directories, claimed but unpublished versions)."""

from __future__ import annotations

import calendar
import json
import logging
import posixpath
import time
from typing import Any

import numpy as np
import pyarrow as pa

from core import storage
from core.storage import StorageOptions
from curation.schedule.catalog import DONE, Catalog, utc_now
from curation.schedule.shards import shard_of, value_counts
from curation.schedule.spec import ScheduleSpec
from curation.selection.curate import label_rows
from curation.selection.rules import SelectionSettings, block_candidates, merge_candidates

logger = logging.getLogger(__name__)

# The file in a round's work directory that names the round's leases.
ROUND_FILE = "_ROUND.json"


def current_snapshot(out: str, options: StorageOptions | None = None) -> dict[str, Any] | None:
    """The `CURRENT` pointer: {"version", "path", "rows", ...}, or None before the first snapshot."""
    uri = storage.join(out, "CURRENT")
    if not storage.exists(uri, options):
        return None
    return storage.read_json(uri, options)


def read_current(out: str, options: StorageOptions | None = None) -> pa.Table:
    """The curated dataset as of the current snapshot."""
    pointer = current_snapshot(out, options)
    if pointer is None:
        raise FileNotFoundError(f"{out} has no snapshot yet: run a batch first")
    return storage.read_parquet(storage.join(out, pointer["path"], "curated.parquet"), options)


# Names under `snapshots/` that are not a version (`v` and six or more digits), already logged once.
_STRAY_SNAPSHOT_NAMES: set[str] = set()


def _version_of(name: str) -> int | None:
    """The version a `snapshots/` entry names, or None: only the names this module writes count, so a
    directory made by hand (`vX`, `v12`, `old`) is never parsed, pruned or swept."""
    digits = name[1:]
    if name.startswith("v") and digits.isascii() and digits.isdigit() and name == f"v{int(digits):06d}":
        return int(digits)
    return None


def _versions(out: str, options: StorageOptions) -> list[int]:
    """The snapshot versions under `out`, ascending; other entries are ignored, each logged once."""
    fs, path = storage.filesystem(storage.join(out, "snapshots"), options)
    try:
        names = [posixpath.basename(name.rstrip("/")) for name in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    versions = []
    for name in names:
        version = _version_of(name)
        if version is not None:
            versions.append(version)
        elif (where := storage.join(out, "snapshots", name)) not in _STRAY_SNAPSHOT_NAMES:
            _STRAY_SNAPSHOT_NAMES.add(where)
            logger.warning("%s is not a snapshot version (v and six digits): ignored, never removed", where)
    return sorted(versions)


def _claim_version(out: str, options: StorageOptions) -> int:
    """A fresh snapshot version number, claimed with an exclusive create so two batches never share one."""
    pointer = current_snapshot(out, options)
    version = max([*(_versions(out, options) or [0]), int(pointer["version"]) if pointer else 0]) + 1
    while not storage.write_bytes_exclusive(
        storage.join(out, "snapshots", f"v{version:06d}", "_CLAIM"), utc_now().encode(), options
    ):
        version += 1
    return version


def publish_snapshot(spec: ScheduleSpec, selection: SelectionSettings, catalog: Catalog) -> dict[str, Any]:
    """Merge every done shard's candidates into a new snapshot, then point `CURRENT` at it.

    The version is claimed before the catalog is read, so a higher version always reflects at least
    as many committed shards as a lower one.
    """
    options = spec.storage_options()
    version = _claim_version(spec.out, options)
    done = {key: record for key, record in catalog.records().items() if record.get("status") == DONE}
    with_candidates = sorted(key for key, record in done.items() if record.get("candidates", 0) > 0)
    candidate_tables = []
    for key in with_candidates:
        table = storage.read_parquet(
            storage.join(spec.out, "shards", f"{key}.parquet"), options, columns=["id", "source", "seed_sims"]
        )
        sims = np.stack(table.column("seed_sims").to_numpy(zero_copy_only=False))
        ids = table.column("id").to_numpy(zero_copy_only=False)
        sources = table.column("source").to_numpy(zero_copy_only=False)
        candidate_tables.append(block_candidates(ids, sources, sims, selection))
    selected = merge_candidates(pa.concat_tables(candidate_tables), selection) if candidate_tables else {}
    wanted_sources = {source for source, _ in selected.values()}
    curated_parts = []
    for key in with_candidates:
        shard_uri = done[key]["shard"]
        if not any(shard_of(source) == shard_uri for source in wanted_sources):
            continue
        table = storage.read_parquet(storage.join(spec.out, "shards", f"{key}.parquet"), options)
        curated_parts.append(label_rows(table, selection, selected))
    curated = (
        pa.concat_tables(curated_parts, promote_options="default")
        if curated_parts
        else pa.table({name: pa.array([], pa.string()) for name in ("id", "text", "domain", "source")})
    )
    if curated.num_rows:
        curated = curated.sort_by([("domain", "ascending"), ("score", "descending"), ("id", "ascending")])
    directory = storage.join(spec.out, "snapshots", f"v{version:06d}")
    storage.write_parquet_atomic(curated, storage.join(directory, "curated.parquet"), options)
    by_domain = dict(sorted(value_counts(curated.column("domain")).items()))
    snapshot = {
        "version": version,
        "path": f"snapshots/v{version:06d}",
        "rows": curated.num_rows,
        "by_domain": by_domain,
        "shards": sorted(done[key]["shard"] for key in done),
        "published_at": utc_now(),
        "batch": catalog.owner,
    }
    storage.write_json_atomic(storage.join(directory, "manifest.json"), snapshot, options)
    pointer = current_snapshot(spec.out, options)
    if pointer is None or int(pointer["version"]) < version:
        storage.write_json_atomic(storage.join(spec.out, "CURRENT"), snapshot, options)
    _prune_snapshots(spec.out, options, spec.keep_snapshots)
    logger.info("snapshot v%d: %d rows %s from %d shards", version, curated.num_rows, by_domain, len(done))
    return snapshot


def _prune_snapshots(out: str, options: StorageOptions, keep: int) -> None:
    pointer = current_snapshot(out, options)
    current = int(pointer["version"]) if pointer else None
    versions = _versions(out, options)
    for version in versions[:-keep]:
        if version != current:
            storage.remove(storage.join(out, "snapshots", f"v{version:06d}"), options)


def _held(catalog: Catalog, key: str, generation: int, now: float) -> bool:
    """Whether lease `generation` on `key` is still the newest claim and unexpired at `now`."""
    newest = catalog.newest(key)
    return (
        newest is not None
        and int(newest.get("generation", -1)) == generation
        and not newest.get("released")
        and float(newest.get("expires_at", 0.0)) > now
    )


def _killed_while_starting(directory: str, options: StorageOptions, before: float) -> bool:
    """Whether `directory` holds nothing but temp files of its `_ROUND.json`, all older than `before`: its
    batch was killed while it wrote that file (locally a write is a temp file, then a rename)."""
    fs, path = storage.filesystem(directory, options)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return False
    prefix = f".{ROUND_FILE}."
    return bool(found) and all(
        posixpath.basename(name).startswith(prefix) and (storage.file_mtime(info) or before) < before
        for name, info in found.items()
    )


def _sweep_work(spec: ScheduleSpec, catalog: Catalog) -> None:
    """Remove round directories whose leases are all released, taken over, or expired.

    Expiry is judged a further `lease_seconds` late, so a holder whose clock runs behind ours has stopped
    using its directory (it never commits past its own expiry) before we delete it.
    """
    options = catalog.options
    fs, path = storage.filesystem(storage.join(spec.out, "work"), options)
    try:
        names = [posixpath.basename(name.rstrip("/")) for name in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return
    margin = time.time() - spec.lease_seconds
    for name in names:
        directory = storage.join(spec.out, "work", name)
        try:
            round_info = storage.read_json(storage.join(directory, ROUND_FILE), options)
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            if _killed_while_starting(directory, options, margin):
                storage.remove(directory, options)
            continue  # otherwise not a round directory (or one being set up): not ours to judge
        if round_info.get("owner") == catalog.owner:
            continue
        if not any(_held(catalog, key, int(gen), margin) for key, gen in round_info.get("leases", [])):
            logger.info("removing %s, left by batch %s", directory, round_info.get("owner"))
            storage.remove(directory, options)


def _sweep_snapshots(spec: ScheduleSpec, options: StorageOptions) -> None:
    """Remove snapshot directories that were claimed but never published, below CURRENT's version.

    Such a version can never become CURRENT (a publisher only moves CURRENT forward); one claimed less than
    `lease_seconds` ago is left alone in case its publisher is still writing it.
    """
    pointer = current_snapshot(spec.out, options)
    if pointer is None:
        return
    for version in _versions(spec.out, options):
        directory = storage.join(spec.out, "snapshots", f"v{version:06d}")
        if version >= int(pointer["version"]) or storage.exists(storage.join(directory, "manifest.json"), options):
            continue
        try:
            with storage.open_read(storage.join(directory, "_CLAIM"), options) as handle:
                claimed = calendar.timegm(time.strptime(handle.read().decode().strip(), "%Y-%m-%dT%H:%M:%SZ"))
        except (FileNotFoundError, ValueError):
            claimed = 0.0
        if claimed < time.time() - spec.lease_seconds:
            logger.info("removing unpublished snapshot v%d", version)
            storage.remove(directory, options)


def sweep(spec: ScheduleSpec, catalog: Catalog) -> None:
    """Remove what crashed batches left behind: round work directories and unpublished snapshot versions."""
    _sweep_work(spec, catalog)
    _sweep_snapshots(spec, catalog.options)
