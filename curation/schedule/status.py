"""What `jobs.schedule --status` reports and what `--retry-failed` does, from storage alone."""

from __future__ import annotations

import logging
from typing import Any

from core import storage
from core.errors import ConfigError
from core.storage import StorageOptions
from curation.schedule.batch import new_batch_id
from curation.schedule.catalog import DONE, FAILED, STORAGE_ERROR, Catalog, utc_time
from curation.schedule.snapshots import current_snapshot
from curation.schedule.spec import ScheduleSpec

logger = logging.getLogger(__name__)


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
        row["retry_after"] = utc_time(row["retry_after"] or 0.0)
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
