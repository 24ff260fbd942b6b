"""The catalog of processed shards for one curation spec, and the leases that hand shards to batches.

Everything lives beside the spec's outputs, on local disk or S3, as small JSON objects; there is no
database. Under the spec's output root:

- ``catalog/<key>.json``: one record per shard that reached an end: ``done``, ``failed`` (its own fault,
  counted in ``attempts``), ``storage_error`` (the store failed while it was read: not counted, retried
  after a backoff) or ``pending`` (an operator put a failed shard back). A ``done`` record is written
  only after the shard's output (``shards/<key>.parquet``) is durably written, so a record's presence
  proves the output is there. ``<key>`` is :func:`core.reader.shard_key` of the shard's URI.
- ``leases/<key>/<generation>.json``: claims. A batch claims a shard by *creating* the next generation's
  object with an exclusive create (:func:`core.storage.write_bytes_exclusive`: ``os.link`` locally,
  ``If-None-Match: *`` on S3), which exactly one of several racing batches wins. A lease names its owner
  and an expiry; its holder renews it while it works. A shard whose newest lease has expired (its batch
  crashed or stalled) is claimed again by creating the next generation, so two batches that both see the
  expiry still race for one name. Giving a shard back (after its record is written, or unprocessed)
  creates the next generation as a *release* object instead of deleting anything: lease objects are never
  deleted or rewritten by anyone but their creator, so a generation number names one claim forever and a
  stalled holder can never mistake a later claim for its own.

Guarantees, stated honestly:

- Two live batches never hold the same shard, as long as the store's exclusive create is atomic (local
  POSIX filesystems and AWS S3 are; moto's server checks then writes), listings are read-after-write
  consistent (AWS S3 since 2020), and the holders' clocks agree to well within ``lease_seconds``.
- A holder commits only while its generation is still the newest, and stops renewing and never commits
  once its own clock says its lease has been expired for half of ``lease_seconds``. Renewing rewrites only
  the holder's own generation object.
- A holder that stalls between that last check and its record write (a pause of the whole process
  there) can overlap with the batch that took over. That costs duplicate work, never a duplicate row: a
  shard's output and record are written to names keyed by the shard, each write replaces the whole
  object, and dataset rows are keyed by content (``id``), so the second writer overwrites the first with
  an equivalent result.
- A batch that stops on an exception or a signal it can handle (SIGINT, SIGTERM) gives its shards back.
  A lease that expired instead (its holder was SIGKILLed, lost its host, or stalled) counts as an attempt:
  the batch that takes it over records the lost attempt as a failure first, since a worker-killing shard
  can kill its driver too, so a shard that keeps killing its batches runs out of ``max_attempts`` like any
  other failing shard. The taker cannot tell such a shard from an operator's ``kill -9``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import posixpath
import threading
import time
from dataclasses import dataclass
from typing import Any

from core import storage
from core.errors import check_range
from core.reader import shard_key
from core.storage import FileInfo, StorageOptions

logger = logging.getLogger(__name__)

DONE = "done"
FAILED = "failed"
# The store failed while the shard was read (an outage): not the shard's fault, so not an attempt.
STORAGE_ERROR = "storage_error"
# A failed shard an operator put back (`jobs.schedule --retry-failed`): due, with its attempts reset.
PENDING = "pending"
# Statuses whose record carries a count of attempts that a later failure adds to.
_RETRIED = (FAILED, STORAGE_ERROR)
# A shard's storage-error backoff doubles per consecutive error up to this many times its first delay.
MAX_BACKOFF_FACTOR = 64


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def utc_time(epoch: float) -> str:
    """`epoch` (seconds) as the UTC timestamps records carry."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass
class Lease:
    """A claim on one shard: the generation object this batch created, and its expiry as last written."""

    key: str
    uri: str
    generation: int
    owner: str
    expires_at: float = 0.0


def needs_work(record: dict[str, Any] | None, info: FileInfo, max_attempts: int, now: float | None = None) -> bool:
    """Whether a shard is due: never finished, or failed fewer than `max_attempts` times and, after a
    storage error, past its backoff (`retry_after`).

    A failed shard whose file changed since (size or mtime: a fixed upload) is due again whatever its
    count, and its count restarts.
    """
    if record is None:
        return True
    if record.get("status") == DONE:
        return False
    if _changed(record, info):
        return True
    if int(record.get("attempts", 0)) >= max_attempts:
        return False
    return record.get("status") != STORAGE_ERROR or float(record.get("retry_after") or 0.0) <= (now or time.time())


def backoff_seconds(first_s: float, errors: int) -> float:
    """The wait after the `errors`-th storage error in a row: `first_s`, doubled per further error, capped."""
    return first_s * min(2 ** max(errors - 1, 0), MAX_BACKOFF_FACTOR)


def _changed(record: dict[str, Any], info: FileInfo) -> bool:
    return (record.get("size"), record.get("mtime")) != (info.size, info.mtime)


class Catalog:
    """Records and leases of one spec's output root."""

    def __init__(self, root: str, options: StorageOptions | None, owner: str, lease_seconds: float = 600.0):
        # A NaN expiry compares false with every clock, so no claimant would ever see the lease live.
        check_range("lease_seconds", lease_seconds, gt=0)
        self.root = root
        self.options = options
        self.owner = owner
        self.lease_seconds = lease_seconds

    # Records ---------------------------------------------------------------------------------------

    def record_uri(self, key: str) -> str:
        return storage.join(self.root, "catalog", f"{key}.json")

    def record(self, key: str) -> dict[str, Any] | None:
        uri = self.record_uri(key)
        try:
            return storage.read_json(uri, self.options)
        except FileNotFoundError:
            return None

    def records(self) -> dict[str, dict[str, Any]]:
        """Every record, by shard key."""
        fs, path = storage.filesystem(storage.join(self.root, "catalog"), self.options)
        if not fs.exists(path):
            return {}
        found: dict[str, dict[str, Any]] = {}
        for name in fs.find(path):
            base = posixpath.basename(name)
            if base.endswith(".json") and not base.startswith((".", "_")):
                with fs.open(name, "rb") as handle:
                    found[base[: -len(".json")]] = json.load(handle)
        return found

    def commit_done(self, lease: Lease, info: FileInfo, details: dict[str, Any]) -> None:
        """Record a shard as done (its output must already be written), then drop its leases."""
        record = {
            "shard": info.uri,
            "key": lease.key,
            "status": DONE,
            "size": info.size,
            "mtime": info.mtime,
            "attempts": int((self.record(lease.key) or {}).get("attempts", 0)) + 1,
            "error": None,
            "batch": self.owner,
            "finished_at": utc_now(),
            **details,
        }
        storage.write_json_atomic(self.record_uri(lease.key), record, self.options)
        self.release(lease)

    def commit_failed(self, lease: Lease, info: FileInfo, error: str, details: dict[str, Any] | None = None) -> int:
        """Record a failed attempt with its error, then give the shard back; returns the attempt count."""
        attempts = self._write_failed(lease.key, info, error, details)
        self.release(lease)
        return attempts

    def commit_storage_error(self, lease: Lease, info: FileInfo, error: str, backoff_s: float) -> dict[str, Any]:
        """Record that the store failed while the shard was read, then give the shard back; returns the record.

        Not an attempt: the count of earlier failed attempts is kept as it was. Batches leave the shard
        alone until `retry_after`, `backoff_s` after this error, doubled for each one before it in a row.
        """
        previous = self.record(lease.key) or {}
        status = previous.get("status") if previous and not _changed(previous, info) else None
        attempts = int(previous.get("attempts", 0)) if status in _RETRIED else 0
        errors = int(previous.get("storage_errors", 0)) + 1 if status == STORAGE_ERROR else 1
        record = {
            "shard": info.uri,
            "key": lease.key,
            "status": STORAGE_ERROR,
            "size": info.size,
            "mtime": info.mtime,
            "attempts": attempts,
            "storage_errors": errors,
            "retry_after": time.time() + backoff_seconds(backoff_s, errors),
            "error": error,
            "batch": self.owner,
            "finished_at": utc_now(),
        }
        storage.write_json_atomic(self.record_uri(lease.key), record, self.options)
        self.release(lease)
        return record

    def _write_failed(self, key: str, info: FileInfo, error: str, details: dict[str, Any] | None = None) -> int:
        previous = self.record(key)
        attempts = 1
        if previous is not None and previous.get("status") in _RETRIED and not _changed(previous, info):
            attempts = int(previous.get("attempts", 0)) + 1
        record = {
            "shard": info.uri,
            "key": key,
            "status": FAILED,
            "size": info.size,
            "mtime": info.mtime,
            "attempts": attempts,
            "error": error,
            "batch": self.owner,
            "finished_at": utc_now(),
            **(details or {}),
        }
        storage.write_json_atomic(self.record_uri(key), record, self.options)
        return attempts

    # Leases ----------------------------------------------------------------------------------------

    def _lease_dir(self, key: str) -> str:
        return storage.join(self.root, "leases", key)

    def _lease_uri(self, key: str, generation: int) -> str:
        return storage.join(self._lease_dir(key), f"{generation:06d}.json")

    def _generations(self, key: str) -> list[int]:
        fs, path = storage.filesystem(self._lease_dir(key), self.options)
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        generations = []
        for name in names:
            base = posixpath.basename(name)
            if base.endswith(".json") and base[:-5].isdigit():
                generations.append(int(base[:-5]))
        return sorted(generations)

    def _read_lease(self, key: str, generation: int) -> dict[str, Any] | None:
        try:
            return storage.read_json(self._lease_uri(key, generation), self.options)
        except FileNotFoundError:
            return None

    def newest(self, key: str) -> dict[str, Any] | None:
        """The newest lease object on `key` (a claim or a release), or None if it was never claimed."""
        generations = self._generations(key)
        return self._read_lease(key, generations[-1]) if generations else None

    def live_lease(self, key: str, now: float | None = None) -> dict[str, Any] | None:
        """The newest lease on `key` if it is a claim that has not expired, else None."""
        lease = self.newest(key)
        if lease is None or lease.get("released") or lease.get("expires_at", 0.0) <= (now or time.time()):
            return None
        return lease

    def _lease_body(self, generation: int, uri: str, released: bool = False) -> tuple[bytes, float]:
        now = time.time()
        expires_at = 0.0 if released else now + self.lease_seconds
        body = {
            "owner": self.owner,
            "shard": uri,
            "generation": generation,
            "host": platform.node(),
            "pid": os.getpid(),
            "claimed_at": now,
            "expires_at": expires_at,
            "released": released,
        }
        return json.dumps(body, sort_keys=True).encode(), expires_at

    def try_claim(self, info: FileInfo, max_attempts: int) -> Lease | None:
        """Claim a due shard for this batch; None if it is done, out of attempts, or held by a live lease."""
        key = shard_key(info.uri)
        if not needs_work(self.record(key), info, max_attempts):
            return None
        lease, lost = self._claim(key, info.uri)
        if lease is None:
            return None
        if lost is not None:  # an expired claim: its holder never gave it back
            self._record_lost_attempt(lease, info, lost)
        # A batch may have committed the shard between our check and our claim, or the lost attempt may
        # have been its last.
        if not needs_work(self.record(key), info, max_attempts):
            self.release(lease)
            return None
        return lease

    def _claim(self, key: str, uri: str) -> tuple[Lease | None, dict[str, Any] | None]:
        """Create the next generation on `key` unless a live claim holds it; returns the lease (None when
        held or when another claimant won the race) and the expired claim it took over, if any."""
        generations = self._generations(key)
        newest = self._read_lease(key, generations[-1]) if generations else None
        if generations and newest is None:
            return None, None  # listed but not readable: treat it as held, the next batch looks again
        claimed_before = newest is not None and not newest.get("released")
        if claimed_before and newest.get("expires_at", 0.0) > time.time():
            return None, None  # held
        generation = generations[-1] + 1 if generations else 0
        body, expires_at = self._lease_body(generation, uri)
        if not storage.write_bytes_exclusive(self._lease_uri(key, generation), body, self.options):
            return None, None  # another batch won the race for this generation
        return Lease(key, uri, generation, self.owner, expires_at), newest if claimed_before else None

    def reset_failed(self) -> tuple[list[str], list[str]]:
        """Put every failed shard back (`failed` or `storage_error`): its record becomes `pending` with no
        attempts and no backoff, so the next batch takes it. Returns the shards put back and those a live
        lease holds (left as they are: run it again once that batch is done).

        Each shard is claimed while its record is rewritten, so no batch commits it meanwhile.
        """
        reset: list[str] = []
        busy: list[str] = []
        for key, record in sorted(self.records().items()):
            if record.get("status") not in _RETRIED:
                continue
            lease, _ = self._claim(key, record["shard"])
            if lease is None:
                busy.append(record["shard"])
                continue
            try:
                current = self.record(key) or {}
                if current.get("status") in _RETRIED:
                    put_back = {**current, "status": PENDING, "attempts": 0, "storage_errors": 0, "retry_after": None}
                    put_back.update(reset_by=self.owner, reset_at=utc_now(), previous_status=current["status"])
                    storage.write_json_atomic(self.record_uri(key), put_back, self.options)
                    reset.append(record["shard"])
            finally:
                self.release(lease)
        return reset, busy

    def _record_lost_attempt(self, lease: Lease, info: FileInfo, lost: dict[str, Any]) -> None:
        """Count the attempt of a holder whose lease expired: it died (or stalled) without a result."""
        logger.info("lease %d on %s expired (owner %s): taking over", lost["generation"], info.uri, lost["owner"])
        if (self.record(lease.key) or {}).get("status") == DONE:
            return  # it finished after all, just before it died
        error = (
            f"lost: batch {lost['owner']} held the shard and stopped renewing its lease before a result "
            "(its driver died, was killed, or stalled past the lease)"
        )
        self._write_failed(lease.key, info, error)

    def renew(self, lease: Lease) -> bool:
        """Push the expiry of our own lease forward; False if it expired or a newer generation exists.

        Only this holder's own generation object is rewritten: nobody else writes that name.
        """
        if not self.holds(lease):
            return False
        body, expires_at = self._lease_body(lease.generation, lease.uri)
        storage.write_bytes_atomic(self._lease_uri(lease.key, lease.generation), body, self.options)
        lease.expires_at = expires_at
        return True

    def holds(self, lease: Lease) -> bool:
        """Whether `lease` is still the newest generation on its shard and, by this host's clock, has not
        been expired for more than half of `lease_seconds`.

        The half lease of grace lets a holder whose renewals were late (a loaded host) go on when nobody has
        taken the shard over; a batch that sweeps round directories waits a whole lease past expiry.
        """
        if lease.expires_at + self.lease_seconds / 2 <= time.time():
            return False
        generations = self._generations(lease.key)
        return bool(generations) and generations[-1] == lease.generation

    def release(self, lease: Lease) -> None:
        """Give the shard back by creating the next generation as a release object; nothing is deleted.

        If that generation exists already, another batch took the shard over and nothing is left to do.
        """
        body, _ = self._lease_body(lease.generation + 1, lease.uri, released=True)
        storage.write_bytes_exclusive(self._lease_uri(lease.key, lease.generation + 1), body, self.options)
        lease.expires_at = 0.0

    def in_progress(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """Live leases among `keys`, by key."""
        now = time.time()
        held = {}
        for key in keys:
            lease = self.live_lease(key, now)
            if lease is not None:
                held[key] = lease
        return held

    def leased_keys(self) -> list[str]:
        fs, path = storage.filesystem(storage.join(self.root, "leases"), self.options)
        try:
            return sorted(posixpath.basename(name.rstrip("/")) for name in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []


class LeaseKeeper:
    """Renews held leases from a background thread while the batch works on them."""

    def __init__(self, catalog: Catalog, every_s: float | None = None):
        check_range("every_s", every_s, gt=0, optional=True)
        self.catalog = catalog
        self.every_s = every_s or max(catalog.lease_seconds / 3.0, 0.5)
        self.leases: dict[str, Lease] = {}
        self.lost: set[str] = set()
        self.deadlines: dict[str, float | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def add(self, leases: list[Lease], deadline: float | None = None) -> None:
        """Renew `leases` until removed, or until `deadline` (epoch seconds): a round over its time
        budget stops holding its shards, so other batches can take them over once the leases expire."""
        with self._lock:
            self.leases.update({lease.key: lease for lease in leases})
            for lease in leases:
                self.deadlines[lease.key] = deadline

    def remove(self, lease: Lease) -> None:
        with self._lock:
            self.leases.pop(lease.key, None)
            self.deadlines.pop(lease.key, None)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            # The lock is held for the whole pass, so once `remove` returns no renewal of that lease is in
            # flight and a committed shard never gets its lease written back.
            with self._lock:
                for lease in list(self.leases.values()):
                    deadline = self.deadlines.get(lease.key)
                    if deadline is not None and time.time() > deadline:
                        if lease.key not in self.lost:
                            logger.warning("round holding %s is over its time budget: no longer renewing", lease.uri)
                            self.lost.add(lease.key)
                        continue
                    try:
                        if not self.catalog.renew(lease):
                            logger.warning("lost the lease on %s to another batch", lease.uri)
                            self.lost.add(lease.key)
                    except Exception:  # a failed renewal is retried next tick; expiry is the backstop
                        logger.exception("renewing the lease on %s failed", lease.uri)
