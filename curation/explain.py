"""Why a document was selected: the SAE latents behind its score, and the latents behind each domain.

A document's score for a domain is the cosine between its unit vector d and the unit vector s of the
domain's nearest seed (docs/design.md, "Selection rules"), that is sum_j d_j * s_j, a sum over SAE
latents. The latents with the largest terms are what put the document there. The encode actor, which
holds the document vectors and the token-level SAE codes, turns them into small columns of `scored/`
(docs/curation.md, "Why is this document here?"), each (docs, domains * width) with domains in sorted
order:

- `domain_latents`, `domain_contributions`: per domain, the `EXPLAIN_LATENTS` latents with the largest
  terms d_j * s_j for the domain's nearest seed, best first. `curated/` keeps the chosen domain's as
  `top_latents` and `latent_contributions`.
- `driver_peaks`, `driver_positions`: per domain, for each of its `DRIVER_LATENTS` driving latents (the
  largest weights in the mean of its seeds' vectors), the largest activation over the document's counted
  tokens and the token position where it is. The report reads these to show each driving latent's
  top-activating tokens in context and how often it fires across the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from curation.selection.rules import nearest_seeds

EXPLAIN_LATENTS = 8
"""Latents kept per document and domain: the largest terms of its score."""
DRIVER_LATENTS = 8
"""Driving latents per domain whose peak activation every document records."""

EXPLAIN_COLUMNS = ("domain_latents", "domain_contributions", "driver_peaks", "driver_positions")


@dataclass(frozen=True)
class DomainDrivers:
    """Each domain's seeds and the latents that weigh most in them, in sorted domain order."""

    domains: list[str]
    members: list[np.ndarray]
    """Per domain, the indices of its seeds."""
    latents: np.ndarray
    """(domains, DRIVER_LATENTS) latent indices, heaviest first."""
    weights: np.ndarray
    """(domains, DRIVER_LATENTS) their weight in the mean of the domain's unit seed vectors."""

    def as_dict(self) -> dict[str, list[list[float]]]:
        """{domain: [[latent, weight], ...]} for the manifest: which latent each `driver_*` slot is."""
        return {
            domain: [[int(latent), round(float(weight), 6)] for latent, weight in zip(lat, wt, strict=True)]
            for domain, lat, wt in zip(self.domains, self.latents, self.weights, strict=True)
        }


def domain_drivers(seed_vectors: np.ndarray, seed_domains: list[str], count: int = DRIVER_LATENTS) -> DomainDrivers:
    """(seeds, latents) unit seed vectors -> each domain's `count` heaviest latents (ties: lower index first)."""
    vectors = np.asarray(seed_vectors, dtype=np.float32)
    domains = sorted(set(seed_domains))
    labels = np.asarray(seed_domains)
    members = [np.flatnonzero(labels == domain) for domain in domains]
    count = min(count, vectors.shape[1])
    centroids = np.stack([vectors[rows].mean(axis=0) for rows in members])
    latents = np.argsort(-centroids, axis=1, kind="stable")[:, :count]
    weights = np.take_along_axis(centroids, latents, axis=1)
    return DomainDrivers(domains, members, latents.astype(np.int64), weights.astype(np.float32))


def top_contributions(
    doc_vectors: torch.Tensor, seed_vectors: torch.Tensor, nearest: np.ndarray, count: int = EXPLAIN_LATENTS
) -> tuple[np.ndarray, np.ndarray]:
    """Per document and domain, the `count` latents with the largest terms of its score, best first.

    doc_vectors (docs, latents) and seed_vectors (seeds, latents) are unit-norm; nearest (docs, domains)
    is each domain's nearest seed. Returns latents (docs, domains, count) int32 and their terms
    d_j * s_j (float32), which sum to the domain score up to the latents left out.
    """
    docs, width = doc_vectors.shape[0], min(count, doc_vectors.shape[1])
    latents = np.zeros((docs, nearest.shape[1], width), dtype=np.int32)
    terms = np.zeros((docs, nearest.shape[1], width), dtype=np.float32)
    for column in range(nearest.shape[1]):  # one domain at a time: (docs, latents), never (docs, domains, latents)
        products = doc_vectors * seed_vectors[torch.as_tensor(nearest[:, column], dtype=torch.long)]
        values, indices = products.topk(width, dim=1)
        latents[:, column] = indices.numpy()
        terms[:, column] = values.numpy()
    return latents, terms


def explain_columns(
    doc_vectors: torch.Tensor,
    seed_vectors: torch.Tensor,
    seed_sims: np.ndarray,
    peaks: torch.Tensor,
    positions: torch.Tensor,
    drivers: DomainDrivers,
) -> dict[str, np.ndarray]:
    """The encode actor's explanation columns for one batch, each 2-D (docs, domains * width)."""
    docs = seed_sims.shape[0]
    nearest = nearest_seeds(seed_sims, drivers.members)
    latents, terms = top_contributions(doc_vectors, seed_vectors, nearest)
    flat = (docs, latents.shape[1] * latents.shape[2])
    return {
        "domain_latents": latents.reshape(flat),
        "domain_contributions": terms.reshape(flat),
        "driver_peaks": peaks.numpy().astype(np.float32).reshape(docs, drivers.latents.size),
        "driver_positions": positions.numpy().astype(np.int32).reshape(docs, drivers.latents.size),
    }


def matrix(table: pa.Table, column: str, domains: int) -> np.ndarray | None:
    """A 2-D explanation column of a scored table as (rows, domains, width); None when absent (older output)."""
    if column not in table.column_names:
        return None
    if table.num_rows == 0:
        return np.zeros((0, domains, 0))
    values = np.stack(table.column(column).to_numpy(zero_copy_only=False))
    return values.reshape(table.num_rows, domains, -1)


def row_explanations(scored: pa.Table, domain_index: np.ndarray, domains: int) -> tuple[pa.Array, pa.Array]:
    """For scored rows and the domain each was selected for: (`top_latents`, `latent_contributions`).

    Lists, best first, without the latents whose term is 0 (not shared by document and seed); null lists
    when `scored` predates the explanation columns.
    """
    latents = matrix(scored, "domain_latents", domains)
    terms = matrix(scored, "domain_contributions", domains)
    if latents is None or terms is None:
        nulls = [None] * scored.num_rows
        return pa.array(nulls, pa.list_(pa.int32())), pa.array(nulls, pa.list_(pa.float32()))
    rows = np.arange(scored.num_rows)
    chosen_latents, chosen_terms = latents[rows, domain_index], terms[rows, domain_index]
    keep = chosen_terms != 0
    return (
        pa.array([lat[k].tolist() for lat, k in zip(chosen_latents, keep, strict=True)], pa.list_(pa.int32())),
        pa.array([t[k].tolist() for t, k in zip(chosen_terms, keep, strict=True)], pa.list_(pa.float32())),
    )
