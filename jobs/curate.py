r"""Curate a domain dataset: the corpus documents nearest (cosine, in SAE space) to a few seeds.

    python -m jobs.curate --corpus 'data/corpus/*.jsonl.gz' --seeds jobs/seeds/demo.jsonl \
        --sae runs/sae --out runs/curated --top-n 50
    python -m jobs.curate ... --threshold 0.6          # every document at or above a cosine
    ray job submit --working-dir . -- python -m jobs.curate --corpus 's3://bucket/rp/**/*.jsonl.zst' \
        --seeds seeds.jsonl --sae s3://bucket/sae --out s3://bucket/curated --gpus 1

The seeds file may hold several domains (`domain` field); all are scored in one pass. Writes
curated/ (Parquet: id, text, domain, score, nearest_seed, source, meta), scored/, rejects/,
report.md with scores.png, and, last, manifest.json.
"""

from __future__ import annotations

from core import cli
from curation.selection.curate import CurateConfig, run_curation


def main(argv: list[str] | None = None) -> None:
    cli.run_job(
        CurateConfig,
        run_curation,
        argv,
        __doc__,
        prog="python -m jobs.curate",
        required=("corpus", "seeds", "sae", "out"),
    )


if __name__ == "__main__":
    main()
