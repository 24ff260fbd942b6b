"""One batch of scheduled curation: claim due shards round by round, run each round's Ray Data pipeline,
commit each shard (done, failed or storage error), then publish a snapshot. SIGINT, SIGTERM and any
exception give the batch's shards back on the way out."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from core import storage
from core.errors import ConfigError
from core.reader import ShardReadError, rejects_uri, shard_key
from core.runtime import init_ray
from core.storage import FileInfo, StorageOptions
from curation.encode_pipeline import PreparedEncoder, encode_shards, prepare_encoder
from curation.schedule.catalog import (
    DONE,
    FAILED,
    STORAGE_ERROR,
    Catalog,
    Lease,
    LeaseKeeper,
    needs_work,
    utc_now,
    utc_time,
)
from curation.schedule.shards import shard_candidates, shard_failure, value_counts
from curation.schedule.signals import BatchSignals
from curation.schedule.snapshots import ROUND_FILE, current_snapshot, publish_snapshot, sweep
from curation.schedule.spec import ScheduleSpec, bind_dtype, bind_output, spec_identity
from curation.selection.curate import CurationPlan, plan, selection_settings
from curation.selection.rules import SelectionSettings

logger = logging.getLogger(__name__)

# A shard's status in a batch record when it changed while the batch processed it (not recorded).
CHANGED = "changed"
# A shard's status in a batch record when the batch gave it back unprocessed (not recorded).
GIVEN_BACK = "given_back"


def new_batch_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{platform.node()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Batch:
    """What one batch carries between rounds."""

    spec: ScheduleSpec
    checked: CurationPlan
    catalog: Catalog
    selection: SelectionSettings
    options: StorageOptions
    encoder: PreparedEncoder | None = None
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    settling: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    """Shards that hit a storage error and wait out its backoff (`retry_after`)."""
    signals: BatchSignals = field(default_factory=BatchSignals)
    held: dict[str, Lease] = field(default_factory=dict)
    """The leases this batch claimed and has not yet given back by a commit, by shard key."""


class RoundTimeout(Exception):
    """A round's Ray Data pipeline ran past the spec's `round_timeout_s`."""


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
    encoder_spec, seeds_matrix = batch.encoder.spec, batch.encoder.seeds_matrix
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
        bind_dtype(spec.out, batch.encoder.dtype, options)
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
            "rejects": dict(sorted(value_counts(rejects.column("reason")).items())),
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
        retry = utc_time(record["retry_after"])
        logger.warning("shard %s: storage error, not counted; retried after %s", info.uri, retry)
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
    spec_id = bind_output(spec, spec_identity(spec, checked.model), options)
    batch_id = new_batch_id()
    catalog = Catalog(spec.out, options, owner=batch_id, lease_seconds=spec.lease_seconds)
    batch = _Batch(spec, checked, catalog, selection_settings(spec, checked.seeds), options)
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
