"""Curation as a service: scheduled, incremental, crash-safe batches over a growing corpus.

A spec (YAML, :class:`ScheduleSpec`) names corpus globs, seeds, an SAE, the model, the selection rule
and an output root. Each batch lists the corpus, claims shards that are new for the spec (or failed
fewer than `max_attempts` times, or past a storage error's backoff) with leases
(:mod:`curation.schedule.catalog`), runs the stage 1 pipeline of :mod:`curation.selection.curate` on
them, a round of `shards_per_round` shards per Ray Data pipeline, and commits per shard. Then it
publishes a new snapshot of the dataset. Output root layout:

| path | what |
|---|---|
| `spec.json` | the spec's identity (every scoring setting, seeds and SAE file digests); written once |
| `shards/<key>.parquet` | a shard's candidates: its own top-N per seed/domain (all rows over the threshold), scored |
| `rejects/<key>.parquet` | a shard's rejected rows with their reasons |
| `catalog/<key>.json` | the shard's record: done, failed (error, attempts), storage_error (backoff) or pending |
| `leases/<key>/<gen>.json` | claims and releases, one object per generation, never deleted (a few per attempt) |
| `work/<batch>-<n>/` | a round's scored rows and `_ROUND.json` (its leases); removed after the round, or later |
| `batches/<id>.json` | one record per batch: shards, documents encoded, tokens, snapshot, timings |
| `snapshots/v000012/` | `curated.parquet` and `manifest.json`: the dataset as of one batch |
| `CURRENT` | `{"version": 12, ...}`: the snapshot readers use; written after the snapshot is complete |

Selection across batches: a shard's candidates are a superset of whatever it can contribute to the
dataset's top-N, so re-merging every done shard's candidates (ids and scores only, as
:func:`curation.selection.rules.merge_candidates` does for blocks) gives the dataset's top-N, and a later shard's
better documents displace earlier ones. Row ids are content hashes (`sha1(text)[:16]`,
:func:`core.reader.doc_id`): an exact-duplicate text in two shards is one row of the dataset, kept
with the lexically first source, whichever batch saw it first.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import json
import logging
import os
import platform
import posixpath
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import cli, storage
from core.errors import ConfigError, check_range, check_ranges
from core.reader import (
    REJECT_BAD_JSON,
    REJECT_MISSING_TEXT_COLUMN,
    REJECT_NON_UTF8,
    REJECT_TRUNCATED_STREAM,
    REJECT_UNREADABLE,
    ShardReadError,
    rejects_uri,
    shard_key,
)
from core.runtime import init_ray
from core.storage import FileInfo, StorageOptions
from curation.sae.model import CONFIG_FILE, WEIGHTS_FILE
from curation.schedule.catalog import (
    DONE,
    FAILED,
    STORAGE_ERROR,
    Catalog,
    Lease,
    LeaseKeeper,
    needs_work,
    utc_now,
)
from curation.schedule.signals import BatchSignals
from curation.scoring import STATS_FILE
from curation.selection.curate import (
    CurateConfig,
    CurationPlan,
    encode_shards,
    label_rows,
    plan,
    prepare_encoder,
    selection_spec,
)
from curation.selection.rules import SelectionSpec, block_candidates, merge_candidates

logger = logging.getLogger(__name__)

# A shard's status in a batch record when it changed while the batch processed it (not recorded).
CHANGED = "changed"
# A shard's status in a batch record when the batch gave it back unprocessed (not recorded).
GIVEN_BACK = "given_back"
# The file in a round's work directory that names the round's leases.
ROUND_FILE = "_ROUND.json"
# Reasons that condemn a whole file: it cannot be opened, has no text column, or breaks partway.
FILE_FAILURES = (REJECT_UNREADABLE, REJECT_MISSING_TEXT_COLUMN, REJECT_TRUNCATED_STREAM)
# Line reasons that, when they are most of a file, mean it is not JSONL at all.
NOT_JSONL = (REJECT_BAD_JSON, REJECT_NON_UTF8)


@dataclass
class ScheduleSpec(CurateConfig):
    """One domain spec for scheduled curation; `out` is its output root (catalog, shards, snapshots)."""

    name: str = ""
    """A name for status lines; defaults to the output root's last path component."""
    shards_per_round: int = 4
    """Shards claimed and run through one Ray Data pipeline at a time; each is committed when its round ends."""
    max_shards_per_batch: int = 0
    """Shards one batch processes at most (0: every due shard)."""
    lease_seconds: float = 900.0
    """How long a claim lasts without renewal; the holder renews it every third of that."""
    max_attempts: int = 3
    """Failed attempts after which a shard is left alone (until its file changes)."""
    max_bad_line_fraction: float = 0.5
    """A shard with more than this fraction of lines that are not JSON objects is failed as not JSONL."""
    interval_s: float = 600.0
    """Seconds between batches when `jobs.schedule` loops (without --once)."""
    keep_snapshots: int = 5
    """Snapshot versions kept; older ones are deleted after a new one is published."""
    settle_seconds: float = 0.0
    """A shard modified less than this many seconds before the batch lists it is left for a later batch: it
    may still be being written (a local copy in progress). 0: claim it at once. Either way, a shard whose
    size or mtime changed while it was processed is not recorded, and a later batch processes it again."""
    task_retries: int = 2
    """Times a round's tokenize or write task is retried, or an encode actor restarted, after its worker
    process dies (OOM, segfault); past that the round fails and its shards are run one at a time."""
    round_timeout_s: float = 3600.0
    """Time budget of one round's Ray Data pipeline. Past it the round is stopped and its shards are run
    one at a time, each with the same budget; a shard that alone runs past it is recorded failed. 0: none."""
    storage_backoff_s: float = 60.0
    """After a storage error on a shard (its reads kept failing: an outage, not its data), batches leave it
    alone this many seconds, doubled for each further storage error in a row (up to 64 times). Never
    counted as an attempt; the batch that met the error claims no further shards. 0: the next batch."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.name:
            self.name = posixpath.basename(self.out.rstrip("/")) or self.out
        check_ranges(self, ("shards_per_round", "max_attempts", "keep_snapshots"), ge=1)
        check_range("max_shards_per_batch", self.max_shards_per_batch, ge=0, hint="0: no limit")
        # A NaN or infinite lease never expires and compares false with every clock: claims would race.
        check_range("lease_seconds", self.lease_seconds, gt=0)
        check_range("interval_s", self.interval_s, ge=0)
        check_range("max_bad_line_fraction", self.max_bad_line_fraction, ge=0.0, le=1.0)
        check_range("settle_seconds", self.settle_seconds, ge=0)
        check_range("task_retries", self.task_retries, ge=0)
        check_range("round_timeout_s", self.round_timeout_s, ge=0, hint="0: no budget")
        check_range("storage_backoff_s", self.storage_backoff_s, ge=0, hint="0: the next batch retries")


@dataclass
class ScheduleJobConfig:
    """What `python -m jobs.schedule` does."""

    spec: list[str] = field(default_factory=list)
    """Spec YAML file(s), comma-separated: corpus globs, seeds, sae, model, rule, out, ..."""
    once: bool = False
    """Run one batch per spec and exit (for cron or a Kubernetes CronJob); otherwise loop every interval_s."""
    status: bool = False
    """Print each spec's status (shards seen, done, in progress, failed, storage errors, rows curated, last
    batch) and exit."""
    retry_failed: bool = False
    """Put each spec's failed shards back (attempts reset to 0, storage-error backoff cleared) and exit; the
    next batch retries them."""
    max_batches: int = 0
    """Without --once: stop after this many rounds of batches (0: run until stopped)."""
    ray_address: str | None = None
    """Ray cluster to join, overriding the specs; unset: $RAY_ADDRESS, else a local Ray."""

    def __post_init__(self) -> None:
        if isinstance(self.spec, str):
            self.spec = [self.spec]
        if not self.spec:
            raise ConfigError("spec", self.spec, "is required: pass --spec SPEC.yaml")
        check_range("max_batches", self.max_batches, ge=0, hint="0: run until stopped")
        if self.retry_failed and (self.status or self.once):
            raise ConfigError("retry_failed", True, "runs on its own and exits: drop --status and --once")


def load_spec(path: str) -> ScheduleSpec:
    """A spec from its YAML file; unknown keys and bad values fail naming the field."""
    return cli.from_mapping(ScheduleSpec, cli.load_yaml(path), origin=path)


# Identity ------------------------------------------------------------------------------------------


# Fields of a spec that change no score, so a spec's output root outlives changes to them. Every other field
# of `content()` is part of the identity: a new field is too, unless it is listed here (and the test that
# pins this list is changed with it).
NOT_SCORED = frozenset(
    {
        # Where the shards come from and where the output goes: the corpus prefix grows, `out` is the root
        # the identity is bound to, and the seeds and the SAE count by their content digests, not their paths.
        "corpus", "out", "seeds", "sae", "name",
        # How the encode runs. These move a score by rounding at most, as which shards share a round does.
        "gpus_per_actor", "batch_size", "max_batch_tokens", "max_batch_rows",
        # Scheduling: when, how many and how often shards are tried, and what a batch keeps.
        "shards_per_round", "max_shards_per_batch", "lease_seconds", "max_attempts", "max_bad_line_fraction",
        "interval_s", "keep_snapshots", "settle_seconds", "task_retries", "round_timeout_s", "storage_backoff_s",
    }
)  # fmt: skip


def _digest(uri: str, options: StorageOptions | None) -> str:
    hasher = hashlib.sha256()
    with storage.open_read(uri, options) as handle:
        while chunk := handle.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def spec_identity(spec: ScheduleSpec, model: str) -> dict[str, Any]:
    """What a spec's scores depend on: every setting of `content()` but `NOT_SCORED`, with `model` the model
    the batch encodes with (the SAE's base model when the spec leaves it unset), and the content digests of
    the seeds and of the SAE's files.

    `latent_stats.json` counts where `weighting: idf` reads it. `dtype: auto` stays `auto`: each encode
    worker resolves it on its own device, after the identity is bound.
    """
    options = spec.storage_options()
    settings = {name: value for name, value in spec.content().items() if name not in NOT_SCORED}
    settings["model"] = model
    sae_files = [CONFIG_FILE, WEIGHTS_FILE, *([STATS_FILE] if spec.weighting == "idf" else [])]
    return {
        "settings": json.loads(json.dumps(settings, default=str)),
        "seeds_sha256": _digest(spec.seeds, options),
        "sae_sha256": {name: _digest(storage.join(spec.sae, name), options) for name in sae_files},
    }


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _identity_changes(bound: dict[str, Any], identity: dict[str, Any]) -> str:
    """What differs between the identity an output root holds and this spec's, in words."""
    if "settings" not in bound:
        return (
            "its spec.json was written by an earlier FineScope, whose identity left out pooling, weighting, "
            "dtype and latent_stats.json"
        )
    names = [name for name in sorted({*bound["settings"], *identity["settings"]})
             if bound["settings"].get(name) != identity["settings"].get(name)]  # fmt: skip
    names += ["seeds"] if bound.get("seeds_sha256") != identity["seeds_sha256"] else []
    names += [f"sae {name}" for name in sorted({*bound.get("sae_sha256", {}), *identity["sae_sha256"]})
              if bound.get("sae_sha256", {}).get(name) != identity["sae_sha256"].get(name)]  # fmt: skip
    return f"changed: {', '.join(names)}"


def _bind_output(spec: ScheduleSpec, identity: dict[str, Any], options: StorageOptions) -> str:
    """Write `spec.json` once; refuse an output root that already belongs to a different spec."""
    digest = identity_hash(identity)
    uri = storage.join(spec.out, "spec.json")
    body = json.dumps({"id": digest, "name": spec.name, "identity": identity}, indent=2, sort_keys=True)
    for _ in range(5):
        if storage.write_bytes_exclusive(uri, body.encode(), options):
            return digest
        try:
            existing = storage.read_json(uri, options)
        except FileNotFoundError:
            continue  # lost a contested create whose winner then failed: nobody wrote it, try again
        if existing.get("id") != digest:
            changes = _identity_changes(existing.get("identity", {}), identity)
            raise ConfigError(
                "out",
                spec.out,
                f"holds spec {existing.get('id')}, this spec is {digest} ({changes}): its scores would not "
                "compare with the ones there, so give it a new output root",
            )
        return digest
    raise OSError(f"could not create or read {uri}: every exclusive create of it was contested")


# Per-shard results ---------------------------------------------------------------------------------


def shard_of(source: str) -> str:
    """A row's shard URI from its `source` (`uri#line` or the bare URI)."""
    return source.rsplit("#", 1)[0]


def shard_failure(rejects: pa.Table, documents: int, max_bad_line_fraction: float) -> str | None:
    """Why a read shard is unusable, or None. `rejects` has the reader's `reason` and `detail` columns.

    A whole-file reject (unreadable, no text column, a compressed stream that breaks) fails it; so does a
    file whose lines are mostly not JSON objects (not JSONL at all).
    """
    reasons = rejects.column("reason").to_pylist()
    details = rejects.column("detail").to_pylist()
    for reason, detail in zip(reasons, details, strict=True):
        if reason in FILE_FAILURES:
            return f"{reason}: {detail}"
    bad = [detail for reason, detail in zip(reasons, details, strict=True) if reason in NOT_JSONL]
    lines = documents + len(reasons)
    if bad and len(bad) / lines > max_bad_line_fraction:
        return f"not JSONL: {len(bad)} of {lines} lines are not JSON objects (first: {bad[0]})"
    return None


# How a ShardReadError raised in a Ray task reaches the driver: Ray Data wraps it (UserCodeException) and
# only the worker's traceback text, which ends with this line, still names it.
_SHARD_READ_ERROR = f"{ShardReadError.__module__}.{ShardReadError.__qualname__}: "


def storage_failure(error: BaseException) -> str | None:
    """The store's failure behind `error`, or None when the shard itself is to blame.

    A :class:`core.reader.ShardReadError` (storage kept failing while the shard was read, or the file
    changed between tries) is the store's: found as the error, in its chain, or in the text of a Ray task
    error that wraps it. A round over its time budget is never the store's: a hung read counts against
    the shard.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen or isinstance(current, RoundTimeout):
            continue
        seen.add(id(current))
        if isinstance(current, ShardReadError):
            return f"ShardReadError: {current}"
        for line in str(current).splitlines():
            if (line := line.strip()).startswith(_SHARD_READ_ERROR):
                return f"ShardReadError: {line[len(_SHARD_READ_ERROR) :]}"
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


def _keep_candidates(table: pa.Table, selection: SelectionSpec) -> pa.Table:
    """The rows of `table` (one shard's scored rows) that are candidates under the rule."""
    ids = table.column("id").to_numpy(zero_copy_only=False)
    sources = table.column("source").to_numpy(zero_copy_only=False)
    sims = np.stack(table.column("seed_sims").to_numpy(zero_copy_only=False)) if table.num_rows else None
    if sims is None:
        return table
    chosen = block_candidates(ids, sources, sims, selection)
    wanted = set(zip(chosen.column("id").to_pylist(), chosen.column("source").to_pylist(), strict=True))
    mask = [pair in wanted for pair in zip(ids.tolist(), sources.tolist(), strict=True)]
    return table.filter(pa.array(mask, type=pa.bool_()))


def shard_candidates(
    scored_dir: str, options: StorageOptions, selection: SelectionSpec
) -> tuple[dict[str, pa.Table], dict[str, int], dict[str, int]]:
    """Per shard: its candidate rows, documents scored, tokens; reduced file by file, never all at once."""
    candidates: dict[str, pa.Table] = {}
    documents: dict[str, int] = {}
    tokens: dict[str, int] = {}
    try:
        files = [info.uri for info in storage.expand(scored_dir, options, config_field="scored_dir")]
    except ConfigError:
        return candidates, documents, tokens  # nothing was scored: every shard was empty or rejected
    for uri in files:
        if not uri.endswith(".parquet"):
            continue
        table = storage.read_parquet(uri, options)
        shards = pa.array([shard_of(source) for source in table.column("source").to_pylist()], type=pa.string())
        for shard in pc.unique(shards).to_pylist():
            part = table.filter(pc.equal(shards, shard))
            documents[shard] = documents.get(shard, 0) + part.num_rows
            tokens[shard] = tokens.get(shard, 0) + int(pc.sum(part.column("n_tokens")).as_py() or 0)
            if shard in candidates:
                part = pa.concat_tables([candidates[shard], part], promote_options="default")
            candidates[shard] = _keep_candidates(part, selection)
    return candidates, documents, tokens


# Snapshots -----------------------------------------------------------------------------------------


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


def publish_snapshot(spec: ScheduleSpec, selection: SelectionSpec, catalog: Catalog) -> dict[str, Any]:
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
    by_domain = dict(sorted(_value_counts(curated.column("domain")).items()))
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


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    return {entry["values"]: entry["counts"] for entry in pc.value_counts(column).to_pylist()}


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


# Batches -------------------------------------------------------------------------------------------


def new_batch_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{platform.node()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Batch:
    """What one batch carries between rounds."""

    spec: ScheduleSpec
    checked: CurationPlan
    catalog: Catalog
    selection: SelectionSpec
    options: StorageOptions
    encoder: tuple[Any, np.ndarray] | None = None
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    settling: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    """Shards that hit a storage error and wait out its backoff (`retry_after`)."""
    signals: BatchSignals = field(default_factory=BatchSignals)
    held: dict[str, Lease] = field(default_factory=dict)
    """The leases this batch claimed and has not yet given back by a commit, by shard key."""


class RoundTimeout(Exception):
    """A round's Ray Data pipeline ran past the spec's `round_timeout_s`."""


def _executors() -> set[threading.Thread]:
    """Ray Data's streaming executors running in this process (each runs its execution on a thread)."""
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:  # a Ray Data without it: the budget still stops renewals and fails the round late
        return set()
    return {thread for thread in threading.enumerate() if isinstance(thread, StreamingExecutor)}


def _encode_within_budget(batch: _Batch, uris: list[str], scored_dir: str, rejects_dir: str) -> None:
    """The round's pipeline; past `round_timeout_s` its executors are shut down and RoundTimeout raised.

    Shutting an executor down cancels its tasks and kills its actors; what the pipeline wrote by then is
    discarded with the round's work directory, never committed.
    """
    spec = batch.spec
    encoder_spec, seeds_matrix = batch.encoder
    args = (spec, batch.checked, uris, encoder_spec, seeds_matrix, scored_dir, rejects_dir)
    before, fired = _executors(), threading.Event()
    message = f"round_timeout: the round ran past its budget of {spec.round_timeout_s:g} s (round_timeout_s)"

    def stop() -> None:
        fired.set()
        for executor in _executors() - before:
            with contextlib.suppress(Exception):
                executor.shutdown(force=True, exception=TimeoutError(message))

    timer = threading.Timer(spec.round_timeout_s, stop) if spec.round_timeout_s else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        encode_shards(*args, retries=spec.task_retries)
    except Exception as error:
        if fired.is_set():
            raise RoundTimeout(message) from error
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if fired.is_set():
        raise RoundTimeout(message)


def _run_round(batch: _Batch, infos: list[FileInfo], work_dir: str) -> dict[str, dict[str, Any]]:
    """One Ray Data pipeline over `infos`; per shard: {"candidates", "documents", "tokens", "rejects", "error"},
    plus "storage_error" when the store, not the shard, failed, or "given_back" when it was not run."""
    spec, options = batch.spec, batch.options
    if batch.encoder is None:
        batch.encoder = prepare_encoder(spec, batch.checked)
    scored_dir = storage.join(work_dir, "scored")
    rejects_dir = storage.join(spec.out, "rejects")
    uris = [info.uri for info in infos]
    try:
        _encode_within_budget(batch, uris, scored_dir, rejects_dir)
    except Exception as error:
        storage.remove(scored_dir, options)
        if len(infos) == 1:
            logger.exception("shard %s failed", uris[0])
            failure = storage_failure(error)
            return {uris[0]: {"error": failure or f"{type(error).__name__}: {error}", "storage_error": bool(failure)}}
        # One bad shard must not fail its round-mates: run each alone to find it.
        logger.warning("round of %d shards failed (%s): running them one at a time", len(infos), error)
        return _one_at_a_time(batch, infos, work_dir)
    candidates, documents, tokens = shard_candidates(scored_dir, options, batch.selection)
    storage.remove(scored_dir, options)
    results = {}
    for uri in uris:
        rejects_file = rejects_uri(rejects_dir, uri)
        rejects = storage.read_parquet(rejects_file, options, columns=["reason", "detail"])
        error = shard_failure(rejects, documents.get(uri, 0), spec.max_bad_line_fraction)
        results[uri] = {
            "candidates": candidates.get(uri),
            "documents": documents.get(uri, 0),
            "tokens": tokens.get(uri, 0),
            "rejects": dict(sorted(_value_counts(rejects.column("reason")).items())),
            "error": error,
        }
    return results


def _one_at_a_time(batch: _Batch, infos: list[FileInfo], work_dir: str) -> dict[str, dict[str, Any]]:
    """A failed round's shards, each in a pipeline of its own. After a storage error the rest are given
    back unprocessed: the store is likely down for them too, and a later batch tries them afresh."""
    results: dict[str, dict[str, Any]] = {}
    for index, info in enumerate(infos):
        if any(result.get("storage_error") for result in results.values()):
            results[info.uri] = {"given_back": True}
            continue
        results.update(_run_round(batch, [info], storage.join(work_dir, f"alone-{index}")))
    return results


def unchanged(info: FileInfo, options: StorageOptions) -> bool:
    """Whether the shard still has the size and mtime it was listed with.

    Mtimes are compared to within a second: S3 lists them in milliseconds but reports whole seconds on HEAD.
    """
    try:
        (now,) = storage.expand(info.uri, options)
    except (ConfigError, ValueError, FileNotFoundError):
        return False  # gone, or it became a directory
    if now.size != info.size:
        return False
    if now.mtime is None or info.mtime is None:
        return now.mtime is info.mtime
    return abs(now.mtime - info.mtime) < 1.0


def _commit(batch: _Batch, lease: Lease, info: FileInfo, result: dict[str, Any]) -> None:
    """Write a shard's output, then its record (done, failed or storage error), if the lease and the shard
    still stand; a shard given back unprocessed gets no record."""
    catalog, options = batch.catalog, batch.options
    if not catalog.holds(lease):
        logger.warning("%s: the lease expired or was taken over: dropping this batch's result", info.uri)
        return
    if result.get("given_back") or not unchanged(info, options):
        # Not run, or still being written when listed, or replaced since (a result of a prefix). Not
        # recorded, so a later batch processes the file as it is then (after `settle_seconds` without change).
        if not result.get("given_back"):
            logger.warning("%s changed while it was processed: left for a later batch", info.uri)
        catalog.release(lease)
        batch.shards[info.uri] = {"status": GIVEN_BACK if result.get("given_back") else CHANGED}
        return
    if result.get("storage_error"):
        record = catalog.commit_storage_error(lease, info, result["error"], batch.spec.storage_backoff_s)
        logger.warning("shard %s: storage error, not counted; retried after %s", info.uri, _utc(record["retry_after"]))
        fields = ("error", "attempts", "storage_errors", "retry_after")
        batch.shards[info.uri] = {"status": STORAGE_ERROR, **{name: record[name] for name in fields}}
        return
    details = {k: result.get(k) for k in ("documents", "tokens", "rejects")}
    if result.get("error"):
        attempts = catalog.commit_failed(lease, info, result["error"], details)
        logger.warning("shard %s failed (attempt %d): %s", info.uri, attempts, result["error"])
        batch.shards[info.uri] = {"status": FAILED, "error": result["error"], "attempts": attempts, **details}
        return
    table = result.get("candidates")
    if table is not None and table.num_rows:
        storage.write_parquet_atomic(table, storage.join(batch.spec.out, "shards", f"{lease.key}.parquet"), options)
    details["candidates"] = table.num_rows if table is not None else 0
    catalog.commit_done(lease, info, details)
    batch.shards[info.uri] = {"status": DONE, **details}


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _claim_round(batch: _Batch, due: list[FileInfo], limit: int, keeper: LeaseKeeper) -> list[tuple[Lease, FileInfo]]:
    """Claim up to `limit` due shards; each lease is renewed from its claim on, until the round's deadline."""
    claimed = []
    deadline = _round_deadline(batch.spec, limit)
    while due and len(claimed) < limit:
        info = due.pop(0)
        # A claim is held as soon as it exists: a signal must not land between its creation and its
        # entry in `held`, from where an interrupted batch gives it back.
        with batch.signals.shielded():
            lease = batch.catalog.try_claim(info, batch.spec.max_attempts)
            if lease is not None:
                batch.held[lease.key] = lease
                keeper.add([lease], deadline)
                claimed.append((lease, info))
    return claimed


def _round_deadline(spec: ScheduleSpec, shards: int) -> float | None:
    """When a round's leases stop being renewed: the round, then each shard alone, each within the budget."""
    if not spec.round_timeout_s:
        return None
    return time.time() + spec.round_timeout_s * (shards + 1) + spec.lease_seconds


def _process_due(batch: _Batch, due: list[FileInfo], batch_id: str, ray_address: str | None) -> None:
    """Claim, curate and commit due shards a round at a time, up to the spec's per-batch limit.

    Whatever stops the batch on the way (an exception, or SIGINT/SIGTERM through `batch.signals`), the
    shards it holds are given back, so the stop costs none of them an attempt.
    """
    with LeaseKeeper(batch.catalog) as keeper:
        try:
            _rounds(batch, due, batch_id, ray_address, keeper)
        except BaseException:
            _give_back(batch, keeper)
            raise


def _rounds(batch: _Batch, due: list[FileInfo], batch_id: str, ray_address: str | None, keeper: LeaseKeeper) -> None:
    spec = batch.spec
    budget = spec.max_shards_per_batch or len(due)
    processed = 0
    while due and processed < budget:
        claimed = _claim_round(batch, due, min(spec.shards_per_round, budget - processed), keeper)
        if not claimed:
            break
        # Ray starts only once there is work: a batch with nothing due stays cheap. Starting it sets a
        # SIGTERM handler of Ray's own, which the batch's handler goes back in front of.
        init_ray(ray_address or spec.ray_address)
        batch.signals.reclaim()
        work_dir = storage.join(spec.out, "work", f"{batch_id}-{processed}")
        # Names the round's leases, so a later batch can tell when this directory is left over.
        leases = [[lease.key, lease.generation] for lease, _ in claimed]
        round_info = {"owner": batch_id, "leases": leases}
        storage.write_json_atomic(storage.join(work_dir, ROUND_FILE), round_info, batch.options)
        logger.info("round of %d shards: %s", len(claimed), [info.uri for _, info in claimed])
        results = _run_round(batch, [info for _, info in claimed], work_dir)
        for lease, info in claimed:
            with batch.signals.shielded():
                keeper.remove(lease)
                _commit(batch, lease, info, results[info.uri])
                batch.held.pop(lease.key, None)
        storage.remove(work_dir, batch.options)
        processed += len(claimed)
        if any(result.get("storage_error") for result in results.values()):
            logger.warning("storage errors in this round: claiming no more shards until the next batch")
            break


def _give_back(batch: _Batch, keeper: LeaseKeeper) -> None:
    """Release every lease the batch still holds; one that cannot be released expires instead."""
    for lease in list(batch.held.values()):
        keeper.remove(lease)
        try:
            batch.catalog.release(lease)
        except Exception:
            logger.exception("could not give %s back: its lease expires in %g s", lease.uri, batch.spec.lease_seconds)
        else:
            logger.info("gave %s back unprocessed", lease.uri)
        batch.held.pop(lease.key, None)


def _batch_record(
    batch: _Batch, batch_id: str, spec_id: str, started: float, snapshot: dict[str, Any] | None
) -> dict[str, Any]:
    """What `batches/<id>.json` says about a finished batch."""
    shards = batch.shards
    return {
        "batch": batch_id,
        "spec": batch.spec.name,
        "spec_id": spec_id,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished_at": utc_now(),
        "seconds": round(time.time() - started, 3),
        "shards": shards,
        "documents_encoded": sum(shard.get("documents") or 0 for shard in shards.values()),
        "tokens_encoded": sum(shard.get("tokens") or 0 for shard in shards.values()),
        "done": sorted(uri for uri, shard in shards.items() if shard["status"] == DONE),
        "failed": sorted(uri for uri, shard in shards.items() if shard["status"] == FAILED),
        "changed": sorted(uri for uri, shard in shards.items() if shard["status"] == CHANGED),
        "storage_errors": sorted(uri for uri, shard in shards.items() if shard["status"] == STORAGE_ERROR),
        "given_back": sorted(uri for uri, shard in shards.items() if shard["status"] == GIVEN_BACK),
        "settling": batch.settling,
        "waiting_after_storage_error": batch.waiting,
        "snapshot": (snapshot or {}).get("version"),
        "rows_curated": (snapshot or {}).get("rows", 0),
    }


def run_batch(spec: ScheduleSpec, ray_address: str | None = None) -> dict[str, Any]:
    """One batch: claim due shards round by round, curate and commit each, publish a snapshot.

    Returns the batch record (also written to `batches/<id>.json`): the shards it processed with their
    outcome, `documents_encoded` (rows the encode stage saw), tokens, the snapshot and timings. SIGINT and
    SIGTERM during the batch give its shards back before the signal takes its usual effect.
    """
    started = time.time()
    options = spec.storage_options()
    checked = plan(spec)
    spec_id = _bind_output(spec, spec_identity(spec, checked.model), options)
    batch_id = new_batch_id()
    catalog = Catalog(spec.out, options, owner=batch_id, lease_seconds=spec.lease_seconds)
    batch = _Batch(spec, checked, catalog, selection_spec(spec, checked.seeds), options)
    with batch.signals:
        due = _due(batch, started)
        logger.info(
            "spec %s (%s): %d shards listed, %d due, %d still settling, %d waiting after a storage error",
            spec.name, spec_id, len(checked.inputs), len(due), len(batch.settling), len(batch.waiting),
        )  # fmt: skip
        _process_due(batch, due, batch_id, ray_address)
        snapshot = current_snapshot(spec.out, options)
        committed = sorted(r["shard"] for r in catalog.records().values() if r.get("status") == DONE)
        # Publish whenever CURRENT does not hold exactly the committed shards: on the first batch (so readers
        # always find a snapshot), after this batch committed some, and after a batch that died between its
        # last commit and its publish.
        if snapshot is None or sorted(snapshot.get("shards", [])) != committed:
            snapshot = publish_snapshot(spec, batch.selection, catalog)
        sweep(spec, catalog)
        record = _batch_record(batch, batch_id, spec_id, started, snapshot)
        storage.write_json_atomic(storage.join(spec.out, "batches", f"{batch_id}.json"), record, options)
    logger.info(
        "batch %s: %d done, %d failed, %d storage errors, %d documents encoded, snapshot v%s",
        batch_id,
        len(record["done"]),
        len(record["failed"]),
        len(record["storage_errors"]),
        record["documents_encoded"],
        record["snapshot"],
    )
    return record


def _due(batch: _Batch, started: float) -> list[FileInfo]:
    """The listed shards this batch may claim; notes those still settling and those waiting out a storage
    error's backoff on `batch`."""
    spec = batch.spec
    records = batch.catalog.records()
    due, batch.waiting = [], []
    for info in batch.checked.inputs:
        record = records.get(shard_key(info.uri))
        if needs_work(record, info, spec.max_attempts, started):
            due.append(info)
        elif record is not None and record.get("status") == STORAGE_ERROR:
            batch.waiting.append(info.uri)
    fresh_after = started - spec.settle_seconds
    batch.settling = [i.uri for i in due if spec.settle_seconds and i.mtime is not None and i.mtime > fresh_after]
    return [info for info in due if info.uri not in batch.settling]


# Status --------------------------------------------------------------------------------------------


def spec_status(spec: ScheduleSpec) -> dict[str, Any]:
    """Shards seen, done, in progress, failed (with errors), waiting after a storage error, rows curated and
    the last batch, from storage."""
    options = spec.storage_options()
    catalog = Catalog(spec.out, options, owner="status")
    try:
        listed = {info.uri for info in storage.expand(spec.corpus, options)}
    except ConfigError:
        listed = set()
    records = catalog.records()
    seen = listed | {record["shard"] for record in records.values()}
    done = sorted(record["shard"] for record in records.values() if record.get("status") == DONE)
    failed = _status_rows(records, FAILED, ("attempts", "error"))
    storage_errors = _status_rows(records, STORAGE_ERROR, ("attempts", "storage_errors", "retry_after", "error"))
    for row in storage_errors:
        row["retry_after"] = _utc(row["retry_after"] or 0.0)
    leased = catalog.in_progress([key for key in catalog.leased_keys() if records.get(key, {}).get("status") != DONE])
    in_progress = sorted(lease["shard"] for lease in leased.values())
    pointer = current_snapshot(spec.out, options)
    waiting = {row["shard"] for row in failed + storage_errors}
    return {
        "spec": spec.name,
        "out": spec.out,
        "seen": len(seen),
        "done": len(done),
        "in_progress": in_progress,
        "failed": failed,
        "storage_errors": storage_errors,
        "pending": len(seen - set(done) - set(in_progress) - waiting),
        "rows_curated": pointer["rows"] if pointer else 0,
        "snapshot": pointer["version"] if pointer else None,
        "last_batch": _last_batch(spec.out, options),
    }


def _status_rows(records: dict[str, dict[str, Any]], status: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """The records of one status, as {"shard", *fields}, by shard."""
    rows = [
        {"shard": r["shard"], **{name: r.get(name) for name in fields}}
        for r in records.values()
        if r.get("status") == status
    ]
    return sorted(rows, key=lambda row: row["shard"])


def _last_batch(out: str, options: StorageOptions) -> str | None:
    """When the newest batch record under `out` was finished, or None before the first batch."""
    batches_dir = storage.join(out, "batches")
    if not storage.exists(batches_dir, options):
        return None
    names = sorted(info.uri for info in storage.expand(batches_dir, options, config_field="out"))
    return storage.read_json(names[-1], options).get("finished_at") if names else None


def format_status(status: dict[str, Any]) -> str:
    """`spec_status` as the lines `jobs.schedule --status` prints."""
    lines = [
        f"spec {status['spec']} ({status['out']})",
        f"  shards seen {status['seen']}, done {status['done']}, in progress {len(status['in_progress'])}, "
        f"failed {len(status['failed'])}, storage errors {len(status['storage_errors'])}, pending {status['pending']}",
        f"  rows curated {status['rows_curated']} (snapshot v{status['snapshot']}), last batch {status['last_batch']}",
    ]
    lines += [f"  in progress: {shard}" for shard in status["in_progress"]]
    lines += [f"  failed ({f['attempts']} attempts): {f['shard']}: {f['error']}" for f in status["failed"]]
    lines += [
        f"  storage error ({e['storage_errors']} in a row, not counted; retried after {e['retry_after']}): "
        f"{e['shard']}: {e['error']}"
        for e in status["storage_errors"]
    ]
    return "\n".join(lines)


def retry_failed(spec: ScheduleSpec) -> dict[str, Any]:
    """Put the spec's failed shards back (`jobs.schedule --retry-failed`): attempts reset, storage-error
    backoff cleared, so the next batch takes them. Shards a running batch holds are left as they are."""
    catalog = Catalog(spec.out, spec.storage_options(), owner=f"retry-failed-{new_batch_id()}")
    reset, busy = catalog.reset_failed()
    for shard in reset:
        logger.info("put back %s", shard)
    return {"spec": spec.name, "out": spec.out, "reset": reset, "busy": busy}


def format_retry(result: dict[str, Any]) -> str:
    """`retry_failed`'s result as the lines `jobs.schedule --retry-failed` prints."""
    lines = [f"spec {result['spec']} ({result['out']}): put back {len(result['reset'])} failed shards"]
    lines += [f"  put back: {shard}" for shard in result["reset"]]
    lines += [f"  held by a running batch, left as it is (run again later): {shard}" for shard in result["busy"]]
    return "\n".join(lines)


def run_schedule(config: ScheduleJobConfig) -> list[dict[str, Any]]:
    """`jobs.schedule`: status, putting failed shards back, one batch per spec (--once), or batches on each
    spec's interval."""
    specs = [load_spec(path) for path in config.spec]
    if config.status:
        return [spec_status(spec) for spec in specs]
    if config.retry_failed:
        return [retry_failed(spec) for spec in specs]
    records: list[dict[str, Any]] = []
    rounds = 0
    while True:
        for spec in specs:
            try:
                records.append(run_batch(spec, config.ray_address))
            except ConfigError:
                raise
            except Exception:
                if config.once:
                    raise
                logger.exception("batch for spec %s failed; trying again next interval", spec.name)
        rounds += 1
        if config.once or (config.max_batches and rounds >= config.max_batches):
            return records
        time.sleep(min(spec.interval_s for spec in specs))
