"""How much each SAE latent counts when documents are compared: rarity weighting.

Pooled by firing rate, every document's vector shares a floor of latents that fire on nearly any text
(function words, punctuation, sentence position). They carry most of a vector's norm, so plain cosine
similarity partly measures how ordinary two texts are. Weighting each latent by its rarity over the
corpus's documents, an inverse document frequency as retrieval weights words, lets the latents that
name a topic decide the cosine instead (docs/results.md, "Curation quality", measures what it buys).

The frequencies are measured once per SAE, on a sample of the corpus it was trained on, and stored beside
its weights (`latent_stats.json`), so every curation with that SAE, each scheduled batch included,
scores on the same scale.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATS_FILE = "latent_stats.json"


@dataclass
class LatentStats:
    """In how many of `docs` sampled documents each latent fires at least once."""

    docs: int
    fired_in: list[int]

    def weights(self) -> np.ndarray:
        """(latents,) rarity weights: log((1 + docs) / (1 + documents it fires in)) + 1, float32.

        The smoothing keeps a latent that fired in no sampled document finite (the largest weight), and
        the + 1 keeps one that fires everywhere at weight 1 rather than 0: it still counts, just least.
        """
        fired = np.asarray(self.fired_in, dtype=np.float64)
        return (np.log((1 + self.docs) / (1 + fired)) + 1).astype(np.float32)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def load(cls, directory: str | Path) -> LatentStats | None:
        """A local SAE directory's stats, or None when it has none (an SAE trained without them)."""
        path = Path(directory, STATS_FILE)
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        docs, fired_in = raw.get("docs"), raw.get("fired_in")
        counts = fired_in if isinstance(fired_in, list) else [None]
        if not _count(docs) or docs < 1 or not all(_count(n) and 0 <= n <= docs for n in counts):
            raise ValueError(f"{path} is not a valid {STATS_FILE}: `docs` must be a count >= 1 and `fired_in` a "
                             "list of counts within it; measure it again with `python -m jobs.train_sae`")  # fmt: skip
        return cls(docs=docs, fired_in=list(counts))


def _count(value: object) -> bool:
    """A count as JSON gives it: an int, and not a bool (NaN, infinities and fractions are floats)."""
    return isinstance(value, int) and not isinstance(value, bool)


def latent_stats(vectors: torch.Tensor | np.ndarray) -> LatentStats:
    """(docs, latents) pooled document vectors (any pooling where a latent that never fired is 0) -> stats."""
    fired = torch.as_tensor(vectors) > 0
    return LatentStats(docs=int(fired.shape[0]), fired_in=fired.sum(dim=0).tolist())


def max_weight(docs: int) -> float:
    """The largest weight a sample of `docs` documents can give (a latent that never fired)."""
    return math.log(1 + docs) + 1


SAMPLE_FILE = "latent_sample.parquet"
"""The pooled codes of the documents the statistics were measured on: the corpus sample the learned scorers
compare with (curation/selection/scorers.py)."""


def sample_bytes(pooled: torch.Tensor, pooling: str) -> bytes:
    """(docs, latents) pooled codes, before any weighting -> `SAMPLE_FILE`'s Parquet bytes (sparse, exact), with
    the pooling they were made by and the SAE's width in the file's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.encode import sparse_codes

    metadata = {"pooling": pooling, "latents": str(pooled.shape[1])}
    table = pa.table(sparse_codes(pooled)).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def save_corpus_sample(directory: str | Path, pooled: torch.Tensor, pooling: str, options: Any = None) -> LatentStats:
    """Store beside an SAE, local or s3://, what is measured on its corpus sample: the sample's pooled codes
    (`SAMPLE_FILE`) and then their statistics (`STATS_FILE`, which marks the measurement done)."""
    from core import storage

    stats = latent_stats(pooled)
    storage.write_bytes_atomic(storage.join(str(directory), SAMPLE_FILE), sample_bytes(pooled, pooling), options)
    storage.write_bytes_atomic(storage.join(str(directory), STATS_FILE), stats.to_bytes(), options)
    return stats


@dataclass
class LatentSample:
    """The corpus sample's pooled codes (docs, latents), and the pooling that made them."""

    pooled: torch.Tensor
    pooling: str

    @classmethod
    def load(cls, directory: str | Path, width: int, options: Any = None) -> LatentSample | None:
        """An SAE directory's sample, local or s3:// (only this file is read), or None when it has none (an SAE
        trained before it was kept)."""
        import pyarrow.parquet as pq

        from core import storage
        from curation.encode import dense_codes

        path = storage.join(str(directory), SAMPLE_FILE)
        if not storage.exists(path, options):
            return None
        with storage.open_read(path, options) as handle:
            table = pq.read_table(handle)
        metadata = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
        if metadata.get("latents") != str(width):
            raise ValueError(f"{path} holds codes of {metadata.get('latents')} latents, the SAE has {width}: it "
                             "belongs to another SAE")  # fmt: skip
        pooled = dense_codes(table.column("code_latents"), table.column("code_values"), width)
        if not torch.isfinite(pooled).all():
            raise ValueError(f"{path} holds codes that are not finite")
        return cls(pooled, metadata.get("pooling", "rate"))
