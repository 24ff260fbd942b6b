"""Curation as a service: scheduled, incremental, crash-safe batches over a growing corpus.

A spec (YAML, :class:`curation.schedule.spec.ScheduleSpec`) names corpus globs, seeds, an SAE, the
model, the selection rule and an output root. Each batch lists the corpus, claims shards that are new
for the spec (or failed fewer than `max_attempts` times, or past a storage error's backoff) with leases
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

The package: :mod:`~curation.schedule.spec` (the spec and its identity), :mod:`~curation.schedule.catalog`
(records and leases), :mod:`~curation.schedule.batch` (one batch), :mod:`~curation.schedule.shards` (a
round's results per shard), :mod:`~curation.schedule.snapshots` (publishing, reading, sweeping),
:mod:`~curation.schedule.signals` (SIGINT and SIGTERM during a batch) and :mod:`~curation.schedule.status`
(`--status`, `--retry-failed`). This module holds what `jobs.schedule` runs: its config and its loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigError, check_range
from curation.schedule.batch import run_batch
from curation.schedule.spec import load_schedule_spec
from curation.schedule.status import retry_failed, spec_status

logger = logging.getLogger(__name__)


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


def run_schedule(config: ScheduleJobConfig) -> list[dict[str, Any]]:
    """`jobs.schedule`: status, putting failed shards back, one batch per spec (--once), or batches on each
    spec's interval."""
    specs = [load_schedule_spec(path) for path in config.spec]
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
