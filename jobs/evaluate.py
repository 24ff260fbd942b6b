r"""Evaluate models on MMLU-form multiple choice and on domain perplexity, with intervals and paired tests.

    python -m jobs.evaluate --models smollm2-135m --mmlu all --limit 500 --sample-seed 0 --out runs/eval
    python -m jobs.evaluate --models base=smollm2-135m pruned=runs/pruned ft-finescope=runs/ft \
        ft-random=runs/ft-random --mmlu stem high_school_biology --shots 0,5 \
        --ppl 'runs/demo/corpus/*.jsonl.gz' --ppl-topic Mathematics --out runs/eval
    ray job submit --working-dir . -- python -m jobs.evaluate --models base=s3://bucket/base \
        pruned=s3://bucket/pruned --mmlu all --out s3://bucket/eval --gpus 1

Each model runs in its own Ray task, in parallel where the CPUs allow. Writes results.json,
questions.jsonl (per question and model, the four summed log-likelihoods), report.md with the comparison
table (every model against the first, McNemar's exact test), PNG bar charts and, last, manifest.json.
"""

from __future__ import annotations

from core import cli
from training.evaluation.evaluate import EvaluateConfig, run_evaluation


def main(argv: list[str] | None = None) -> None:
    cli.run_job(
        EvaluateConfig, run_evaluation, argv, __doc__, prog="python -m jobs.evaluate", required=("models", "out")
    )


if __name__ == "__main__":
    main()
