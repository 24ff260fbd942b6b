"""The catalog of processed shards for one curation spec, and the leases that hand shards to batches.

Everything lives beside the spec's outputs, on local disk or S3, as small JSON objects; there is no
database. Under the spec's output root:

- ``catalog/<key>.json``: one record per shard that reached an end, ``done`` or ``failed``. A ``done``
  record is written only after the shard's output (``shards/<key>.parquet``) is durably written, so a
  record's presence proves the output is there. ``<key>`` is :func:`core.reader.shard_key` of the
  shard's URI.
- ``leases/<key>/<generation>.json``: claims. A batch claims a shard by *creating* the next generation's
  object with an exclusive create (:func:`core.storage.write_bytes_exclusive`: ``os.link`` locally,
  ``If-None-Match: *`` on S3), which exactly one of several racing batches wins. A lease names its owner
  and an expiry; its holder renews it while it works. A shard whose newest lease has expired (its batch
  crashed) is claimed again by creating the next generation, so two batches that both see the expiry
  still race for one name.

Guarantees, stated honestly:

- Two live batches never hold the same shard, as long as the store's exclusive create is atomic (local
  POSIX filesystems and AWS S3 are; moto's server checks then writes), listings are read-after-write
  consistent (AWS S3 since 2020), and the holders' clocks agree to well within ``lease_seconds``.
- A holder that stalls past its expiry (a long GC pause, a partition) can overlap with the batch that
  takes over. That costs duplicate work, never a duplicate row: a shard's output and record are written
  to names keyed by the shard, each write replaces the whole object, and dataset rows are keyed by
  content (``id``), so the second writer overwrites the first with an equivalent result. Before
  committing, a holder checks that its lease is still the newest and drops its result if not.
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


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Lease:
    """A claim on one shard: the generation object this batch created."""

    key: str
    uri: str
    generation: int
    owner: str


def needs_work(record: dict[str, Any] | None, info: FileInfo, max_attempts: int) -> bool:
    """Whether a shard is due: never finished, or failed fewer than `max_attempts` times.

    A failed shard whose file changed since (size or mtime: a fixed upload) is due again whatever its
    count, and its count restarts.
    """
    if record is None:
        return True
    if record.get("status") == DONE:
        return False
    return _changed(record, info) or int(record.get("attempts", 0)) < max_attempts


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
        """Record a failed attempt with its error, then drop the leases; returns the attempt count."""
        previous = self.record(lease.key)
        attempts = 1
        if previous is not None and previous.get("status") == FAILED and not _changed(previous, info):
            attempts = int(previous.get("attempts", 0)) + 1
        record = {
            "shard": info.uri,
            "key": lease.key,
            "status": FAILED,
            "size": info.size,
            "mtime": info.mtime,
            "attempts": attempts,
            "error": error,
            "batch": self.owner,
            "finished_at": utc_now(),
            **(details or {}),
        }
        storage.write_json_atomic(self.record_uri(lease.key), record, self.options)
        self.release(lease)
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

    def live_lease(self, key: str, now: float | None = None) -> dict[str, Any] | None:
        """The newest lease on `key` if it has not expired, else None."""
        generations = self._generations(key)
        if not generations:
            return None
        lease = self._read_lease(key, generations[-1])
        if lease is None or lease.get("expires_at", 0.0) <= (now or time.time()):
            return None
        return lease

    def _lease_body(self, generation: int, uri: str) -> bytes:
        now = time.time()
        body = {
            "owner": self.owner,
            "shard": uri,
            "generation": generation,
            "host": platform.node(),
            "pid": os.getpid(),
            "claimed_at": now,
            "expires_at": now + self.lease_seconds,
        }
        return json.dumps(body, sort_keys=True).encode()

    def try_claim(self, info: FileInfo, max_attempts: int) -> Lease | None:
        """Claim a due shard for this batch; None if it is done, out of attempts, or held by a live lease."""
        key = shard_key(info.uri)
        if not needs_work(self.record(key), info, max_attempts):
            return None
        generations = self._generations(key)
        if generations:
            newest = self._read_lease(key, generations[-1])
            if newest is None or newest.get("expires_at", 0.0) > time.time():
                return None  # held, or released this instant by a batch that just finished it
            logger.info("lease %d on %s expired (owner %s): taking over", generations[-1], info.uri, newest["owner"])
        generation = generations[-1] + 1 if generations else 0
        if not storage.write_bytes_exclusive(
            self._lease_uri(key, generation), self._lease_body(generation, info.uri), self.options
        ):
            return None  # another batch won the race for this generation
        lease = Lease(key, info.uri, generation, self.owner)
        # A batch may have committed the shard and dropped its leases between our check and our claim.
        if not needs_work(self.record(key), info, max_attempts):
            self.release(lease)
            return None
        return lease

    def renew(self, lease: Lease) -> bool:
        """Push the expiry of our own lease forward; False if a newer generation has taken the shard."""
        if not self.holds(lease):
            return False
        storage.write_bytes_atomic(
            self._lease_uri(lease.key, lease.generation), self._lease_body(lease.generation, lease.uri), self.options
        )
        return True

    def holds(self, lease: Lease) -> bool:
        """Whether `lease` is still the newest generation on its shard."""
        generations = self._generations(lease.key)
        return bool(generations) and generations[-1] == lease.generation

    def release(self, lease: Lease) -> None:
        """Drop every lease object of the shard (after its record is written, or to give it back)."""
        storage.remove(self._lease_dir(lease.key), self.options)

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
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def add(self, leases: list[Lease]) -> None:
        with self._lock:
            self.leases.update({lease.key: lease for lease in leases})

    def remove(self, lease: Lease) -> None:
        with self._lock:
            self.leases.pop(lease.key, None)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            # The lock is held for the whole pass, so once `remove` returns no renewal of that lease is in
            # flight and a committed shard never gets its lease written back.
            with self._lock:
                for lease in list(self.leases.values()):
                    try:
                        if not self.catalog.renew(lease):
                            logger.warning("lost the lease on %s to another batch", lease.uri)
                            self.lost.add(lease.key)
                    except Exception:  # a failed renewal is retried next tick; expiry is the backstop
                        logger.exception("renewing the lease on %s failed", lease.uri)
