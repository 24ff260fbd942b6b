r"""Prune a base model to a smaller standard checkpoint, with importance measured on a curated domain set.

    python -m jobs.prune --model smollm2-135m --data runs/curated/curated --ratio 0.3 --out runs/pruned
    python -m jobs.prune ... --method magnitude          # or random: the baselines
    ray job submit --working-dir . -- python -m jobs.prune --model smollm2-135m \
        --data s3://bucket/curated/curated --ratio 0.3 --out s3://bucket/pruned

Writes a Hugging Face directory (config.json, model.safetensors, tokenizer files) that
`AutoModelForCausalLM.from_pretrained(out)` loads with no custom code, prune_report.json and, last,
manifest.json. The ratio counts total parameters, embeddings included.
"""

from __future__ import annotations

from core import cli
from training.pruning.prune import PruneConfig, run_pruning


def main(argv: list[str] | None = None) -> None:
    cli.run_job(PruneConfig, run_pruning, argv, __doc__, prog="python -m jobs.prune", required=("out",))


if __name__ == "__main__":
    main()
