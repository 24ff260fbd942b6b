r"""Split one domain's curated rows into train and held-out, and draw the random control of the same size.

    python -m jobs.split --curated runs/curate --domain mathematics --out runs/mathematics/split
    ray job submit --working-dir . -- python -m jobs.split --curated s3://bucket/curate \
        --domain mathematics --out s3://bucket/mathematics/split

The pipeline's `split/<domain>` step, run by hand. Rows go to the held-out side by a hash of their id, so a
row never changes side as the corpus grows; the random control holds as many distinct corpus documents as
the train side, none of them curated for the domain. Writes train/, heldout/, random/ and, last,
manifest.json. Prune on the output (its train/ is read), distil train/ and random/ apart, and evaluate on
its heldout/ (docs/pipeline.md, "One domain by hand").
"""

from __future__ import annotations

from core import cli
from curation.split import SplitConfig, run_split


def main(argv: list[str] | None = None) -> None:
    cli.run_job(
        SplitConfig, run_split, argv, __doc__, prog="python -m jobs.split", required=("curated", "domain", "out")
    )


if __name__ == "__main__":
    main()
