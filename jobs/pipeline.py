r"""The whole method as one job: train the SAE (or reuse one), curate, prune, distill, fine-tune, evaluate.

    python -m jobs.pipeline --spec jobs/configs/demo-pipeline.yaml
    python -m jobs.pipeline --spec my-pipeline.yaml --only curate          # a stage and what it needs
    python -m jobs.pipeline --spec my-pipeline.yaml --force                # redo every step
    ray job submit --working-dir . -- python -m jobs.pipeline --spec jobs/configs/pipeline-s3.yaml

The spec (YAML) names the base model, corpus, seeds, domains (with their MMLU subjects), pruning ratios,
teacher and backend, and the storage root; each stage's own settings go under its name (`sae:`,
`curate:`, `prune:`, `distill:`, `finetune:`, `evaluate:`), with the keys of that stage's job flags.
Each step is cached by a hash of its config and of the steps it reads: a rerun skips what is up to date,
and changing one stage's setting reruns that stage and its dependents only. Writes every stage's output
under the root, ROOT/pipeline.json (each step's key, status and time) and ROOT/report.md (the comparison
table per domain and a link to every stage's report), and prints the comparison tables.
"""

from __future__ import annotations

from typing import Any

from core import cli
from pipeline import PipelineJobConfig, run_pipeline_job


def _run(config: PipelineJobConfig) -> dict[str, Any]:
    result = run_pipeline_job(config)
    print(result["report"].split("## Steps")[0].rstrip() + "\n", flush=True)  # the comparison tables
    print(f"Pipeline report: {result['report_uri']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    cli.run_job(PipelineJobConfig, _run, argv, __doc__, prog="python -m jobs.pipeline", required=("spec",),
                config_file=False)  # fmt: skip


if __name__ == "__main__":
    main()
