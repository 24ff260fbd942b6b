"""Write the packaged Wikipedia summaries as RedPajama JSONL shards, topic kept in `meta.topic`.

python -m jobs.make_demo_corpus --out data/corpus [--shards 8] [--limit 4000] [--heldout-out data/heldout]
ray job submit --working-dir . -- python -m jobs.make_demo_corpus --out s3://bucket/corpus
"""

from __future__ import annotations

from dataclasses import dataclass

from core import cli
from core.errors import ConfigError, check_range, check_seed
from core.runtime import RunConfig
from curation.demo_corpus import write_demo_corpus, write_heldout


@dataclass
class DemoCorpusConfig(RunConfig):
    out: str = "data/corpus"
    """Directory for the shards, local or s3://."""
    shards: int = 8
    """Number of .jsonl.gz shards."""
    limit: int | None = None
    """Keep only this many documents (after a seeded shuffle); unset keeps all 10,033."""
    seed: int = 0
    """Shuffle seed."""
    heldout_out: str | None = None
    """Also write the documents the limit leaves out here (one shard), labelled by `meta.topic`: a held-out
    set disjoint from the corpus, for evaluation (the pipeline's `domains.<name>.heldout`). Needs --limit."""

    def __post_init__(self) -> None:
        check_range("shards", self.shards, ge=1)
        check_range("limit", self.limit, ge=1, optional=True, hint="or unset for every document")
        check_seed("seed", self.seed)
        if self.heldout_out and self.limit is None:
            hint = "needs --limit: without one every document is in the corpus"
            raise ConfigError("heldout_out", self.heldout_out, hint)


def run(config: DemoCorpusConfig) -> list[str]:
    options = config.storage_options()
    uris = write_demo_corpus(config.out, config.shards, config.limit, config.seed, options)
    if config.heldout_out and config.limit is not None:
        uris += write_heldout(config.heldout_out, config.limit, config.seed, options)
    return uris


def main(argv: list[str] | None = None) -> None:
    cli.run_job(DemoCorpusConfig, run, argv, __doc__, prog="python -m jobs.make_demo_corpus")


if __name__ == "__main__":
    main()
