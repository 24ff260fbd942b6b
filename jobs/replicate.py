r"""The replication: does a pruned model recover more on FineScope-curated data than on random data?

    python -m jobs.replicate --spec jobs/configs/replication.yaml
    python -m jobs.replicate --spec jobs/configs/replication.yaml --only evaluate/pilot    # the pilot first
    python -m jobs.replicate --spec jobs/configs/replication.yaml \
        --only evaluate/mathematics/t0 evaluate/mathematics/reference      # a domain's first trial, references
    python -m jobs.replicate --spec jobs/configs/replication.yaml --only evaluate/mathematics/t1  # one trial
    ray job submit --working-dir . -- python -m jobs.replicate --spec jobs/configs/replication.yaml

Held-out documents (general ones of every topic, then per domain, labelled with its topic) are set aside from
the packaged corpus before anything is curated. One model pruned on random pool documents is fine-tuned, for
the same steps and over several trials, on arms of equal budget: FineScope-curated, BM25, MiniLM and dense
rankings from the same seeds, random, the topic-labelled oracle and doses between them; references, a pilot
over pruning ratios and optional ablations come with them. Every step is cached and resumable, and a trial of
a domain needs nothing of the other trials, so the job runs in parts of about an hour each (the pilot; each
domain's trials, the first with the references), each on a fresh machine if need be: with `ship` set, each
run copies the evaluations, selections and fine-tune manifests it finished into the repository
(docs/replication/parts), and rewrites ROOT/replication.md (tables, paired tests, plots) from every part
found under ROOT or shipped. See docs/replication.md, "How to run it", for each part's cost.
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
