r"""The replication: does a pruned model recover more on FineScope-curated data than on random data?

    python -m jobs.replicate --spec jobs/configs/replication.yaml
    python -m jobs.replicate --spec jobs/configs/replication.yaml --only curate     # in parts: a stage first
    python -m jobs.replicate --spec jobs/configs/replication.yaml --only evaluate/pilot    # the pilot first
    python -m jobs.replicate --spec jobs/configs/replication.yaml --only finetune/mathematics
    ray job submit --working-dir . -- python -m jobs.replicate --spec jobs/configs/replication.yaml

Held-out documents (general ones of every topic, then per domain, labelled with its topic) are set aside from
the packaged corpus before anything is curated. One model pruned on random pool documents is fine-tuned, for
the same steps and over several trials, on arms of equal budget: FineScope-curated, BM25, MiniLM and dense
rankings from the same seeds, random, the topic-labelled oracle and doses between them; references, a pilot
over pruning ratios and optional ablations come with them. Every step is cached and resumable, so the job may
be run in parts; each run rewrites ROOT/replication.md (tables, paired tests, plots) from the evaluations that
exist. See docs/replication.md.
"""

from __future__ import annotations

from typing import Any

from core import cli
from experiments.replication import ReplicationJobConfig, run_replication_job


def _run(config: ReplicationJobConfig) -> dict[str, Any]:
    result = run_replication_job(config)
    print(result["report"].split("## Steps")[0].rstrip() + "\n", flush=True)
    print(f"Replication report: {result['report_uri']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    cli.run_job(ReplicationJobConfig, _run, argv, __doc__, prog="python -m jobs.replicate", required=("spec",),
                config_file=False)  # fmt: skip


if __name__ == "__main__":
    main()
