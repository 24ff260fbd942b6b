r"""Scheduled curation: each batch curates the shards that are new for a spec, crash-safe and incremental.

    python -m jobs.schedule --spec jobs/configs/schedule-demo.yaml --once     # one batch, then exit (cron)
    python -m jobs.schedule --spec jobs/configs/schedule-demo.yaml            # a batch every interval_s
    python -m jobs.schedule --spec jobs/configs/schedule-demo.yaml --status   # what each spec has done
    python -m jobs.schedule --spec jobs/configs/schedule-demo.yaml --retry-failed   # put failed shards back
    ray job submit --working-dir . -- python -m jobs.schedule --spec jobs/configs/schedule-demo.yaml --once

A spec YAML holds the fields of `curation.schedule.spec.ScheduleSpec` (those of `jobs.curate` plus scheduling):
corpus globs, seeds, sae, model, rule/top_n/threshold, out (the output root), shards_per_round,
lease_seconds, max_attempts, storage_backoff_s, interval_s, keep_snapshots. Readers take the dataset from
`<out>/CURRENT` -> `<out>/snapshots/vNNNNNN/curated.parquet`.
"""

from __future__ import annotations

from typing import Any

from core import cli
from curation.schedule.service import ScheduleJobConfig, run_schedule
from curation.schedule.status import format_retry, format_status


def _run(config: ScheduleJobConfig) -> list[dict[str, Any]]:
    results = run_schedule(config)
    if config.status:
        print("\n".join(format_status(status) for status in results), flush=True)
    if config.retry_failed:
        print("\n".join(format_retry(result) for result in results), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    cli.run_job(ScheduleJobConfig, _run, argv, __doc__, prog="python -m jobs.schedule", required=("spec",))


if __name__ == "__main__":
    main()
