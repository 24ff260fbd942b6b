r"""Select again from a finished curation: another rule, size, weighting or set of seeds, without encoding the corpus.

    python -m jobs.select --scored runs/curated --seeds jobs/seeds/demo.jsonl --out runs/curated-top20 --top-n 20
    python -m jobs.select --scored runs/curated --seeds new-domain.jsonl --out runs/law --rule global_topn
    python -m jobs.select ... --threshold 0.6          # every document at or above a cosine

Reads the stored codes in the curate output's scored/ and encodes only the seeds (one Ray task holding the
model). Writes what jobs.curate writes: curated/ (Parquet: id, text, domain, score, nearest_seed, source,
meta, ...), scored/, report.md with scores.png, and, last, manifest.json; every stage that reads a curate
output reads it.
"""

from __future__ import annotations

from core import cli
from curation.selection.reselect import ReselectConfig, run_reselect


def main(argv: list[str] | None = None) -> None:
    cli.run_job(
        ReselectConfig,
        run_reselect,
        argv,
        __doc__,
        prog="python -m jobs.select",
        required=("scored", "seeds", "out"),
    )


if __name__ == "__main__":
    main()
