r"""Train a Top-K SAE on a model's layer-L activations over a corpus.

    python -m jobs.train_sae --corpus 'data/corpus/*.jsonl.gz' --model smollm2-135m --layer 15 \
        --seeds jobs/seeds/demo.jsonl --out runs/sae
    ray job submit --working-dir . -- python -m jobs.train_sae --corpus 's3://bucket/rp/**/*.jsonl.zst' \
        --layer 15 --out s3://bucket/sae --gpus 1 --actors 4

Without a cluster it starts a local Ray; under `ray job submit` it joins the cluster. Writes
cfg.json, sae.safetensors and, last, manifest.json (FVU, dead fraction, tokens/s).
"""

from __future__ import annotations

from core import cli
from curation.sae.train import TrainSAEConfig, run_train_sae


def main(argv: list[str] | None = None) -> None:
    cli.run_job(
        TrainSAEConfig, run_train_sae, argv, __doc__, prog="python -m jobs.train_sae", required=("corpus", "out")
    )


if __name__ == "__main__":
    main()
