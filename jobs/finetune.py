r"""Fine-tune a pruned model on a distilled set with Ray Train and DeepSpeed (ZeRO 1, 2 or 3).

    python -m jobs.finetune --model runs/pruned --data runs/distilled/distilled --out runs/finetuned
    python -m jobs.finetune ... --zero-stage 3 --kd-weight 0.5 --teacher smollm2-135m --lora-r 16
    python -m jobs.finetune --config jobs/configs/demo-finetune.yaml --model ... --data ... --out ...
    ray job submit --working-dir . -- python -m jobs.finetune --model s3://bucket/pruned \
        --data s3://bucket/distilled --out s3://bucket/finetuned --actors 8 --gpus 1 --zero-stage 3

Trains on response tokens only (prompt masked), optionally with a KD term against the unpruned teacher
and with LoRA adapters (merged at export). Checkpoints every --checkpoint-every steps to
OUT/checkpoints (or --checkpoints, local or s3://); a worker failure restarts from the latest one
without repeating or skipping data. Writes OUT/model (Hugging Face directory), OUT/metrics.jsonl and,
last, OUT/manifest.json.
"""

from __future__ import annotations

from core import cli
from training.finetuning.finetune import FinetuneConfig, run_finetune


def main(argv: list[str] | None = None) -> None:
    cli.run_job(
        FinetuneConfig, run_finetune, argv, __doc__, prog="python -m jobs.finetune", required=("model", "data", "out")
    )


if __name__ == "__main__":
    main()
