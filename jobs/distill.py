r"""Self-data distillation: the teacher rewrites the curated data; the rewrites train the pruned student.

    python -m jobs.distill --data runs/demo/curate/curated --teacher smollm2-135m --backend transformers \
        --out runs/demo/distilled --max-new-tokens 128
    python -m jobs.distill --data 'data/instructions/*.parquet' --recipe rewrite --teacher smollm2-135m \
        --backend transformers --out runs/sdft
    ray job submit --working-dir . -- python -m jobs.distill --data s3://bucket/curated \
        --teacher /models/teacher --backend vllm --actors 4 --batch-size 64 \
        --engine-kwargs '{"dtype": "bfloat16", "max_model_len": 4096}' --out s3://bucket/distilled

Recipes: `rewrite` (instruction + reference response -> the teacher's own response, SDFT) and
`continuation` (raw text: the teacher rewrites a document's continuation given its prefix); `auto` picks
from the input columns. Writes distilled/ (Parquet: id, prompt, original, teacher, accepted, reason,
response, ...), rejects/ (bad input rows with their reason), parts/ (resume state) and, last,
manifest.json. A rerun after a crash generates only the rows that are missing.
"""

from __future__ import annotations

from core import cli
from training.distillation.distill import DistillConfig, run_distill


def main(argv: list[str] | None = None) -> None:
    cli.run_job(DistillConfig, run_distill, argv, __doc__, prog="python -m jobs.distill", required=("data", "out"))


if __name__ == "__main__":
    main()
