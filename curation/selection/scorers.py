"""Scorers: how a domain's seeds become the vectors every document is compared with.

A document's score is the cosine between its unit vector d and a unit query vector q, that is
sum_j d_j * q_j over SAE latents, so the latents with the largest terms explain it whatever the scorer
(curation/explain.py). The scorers differ in the queries:

- ``nearest``: every seed is a query, and a domain's score is its best seed's (the paper's rule).
- ``background``: one query per domain, the mean of its seeds' vectors less the mean vector of a sample of
  the corpus. What every text shares (the latents of common words, sentence position, ordinary prose)
  cancels, and a document scores by how much more of the domain's latents it has than a typical one.
- ``classifier``: one query per domain, the weights of an L2-regularised logistic regression that tells
  the domain's seeds from the corpus sample and the other domains' seeds (as quality classifiers are
  trained on curated against random text). It learns which latents separate the domain, not only which
  fire in its seeds.

The corpus sample is the one the SAE's latent statistics were measured on (`jobs.train_sae`), kept beside
the SAE as pooled codes (curation/latent_weights.py, `SAMPLE_FILE`), so every curation with that SAE, each
scheduled batch included, compares with the same queries.

The default, `classifier` with feedback (`default_feedback`), is the scoring that ranked best on the
development topics of the curation-quality bench (docs/results.md); `nearest` is the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Scorer = Literal["nearest", "background", "classifier"]
SCORERS: tuple[str, ...] = ("nearest", "background", "classifier")
LEARNED = frozenset({"background", "classifier"})
"""Scorers that compare with the corpus sample: one query per domain."""

DEFAULT_SCORER: Scorer = "classifier"
"""The jobs' scorer unless one is named: the best on the curation-quality bench's development topics."""

FEEDBACK_DOCS = 80
FEEDBACK_SHARE = 25
"""A learned scorer's feedback unless one is named: `FEEDBACK_DOCS` sample documents per domain, or one in
`FEEDBACK_SHARE` of the sample's documents where that is fewer. The bench chose 80 on its development
topics, with a sample of 2,048 documents (`stats_docs`' default); a smaller sample gets proportionally fewer,
so that a domain's feedback stays within the domain's share of it."""

CLASSIFIER_L2 = 1e-3
"""The classifier's L2 penalty, 0.5 * l2 * |w|^2 against a loss that is the mean over each class (the two
halves weigh alike however few the seeds)."""


@dataclass(frozen=True)
class Queries:
    """The unit vectors documents are scored against, each with its domain and a name for `nearest_seed`."""

    vectors: np.ndarray
    """(queries, latents) float32, unit norm."""
    domains: list[str]
    ids: list[str]


def query_names(seed_domains: list[str], seed_ids: list[str] | None, scorer: str) -> tuple[list[str], list[str]]:
    """The queries' domains and names, known before any vector: the seeds' own under `nearest`, else one per
    domain (sorted), named `<domain>:<scorer>`."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; one of {SCORERS}")
    if scorer == "nearest":
        return list(seed_domains), list(seed_ids or [str(index) for index in range(len(seed_domains))])
    domains = sorted(set(seed_domains))
    return domains, [f"{domain}:{scorer}" for domain in domains]


def default_feedback(scorer: str, sample_docs: int) -> int:
    """The feedback a scorer takes unless one is named: 0 under `nearest`, else `FEEDBACK_DOCS` per domain or
    one in `FEEDBACK_SHARE` of a `sample_docs`-document sample, whichever is fewer."""
    return min(FEEDBACK_DOCS, sample_docs // FEEDBACK_SHARE) if scorer in LEARNED else 0


def resolve_feedback(scorer: str, feedback: int | None, sample_docs: int) -> int:
    """A config's `feedback`, with None (unset) as `default_feedback`."""
    return default_feedback(scorer, sample_docs) if feedback is None else feedback


def domain_queries(
    seed_vectors: np.ndarray,
    seed_domains: list[str],
    seed_ids: list[str] | None,
    scorer: str,
    background: np.ndarray | None = None,
    feedback: int | None = 0,
) -> Queries:
    """(seeds, latents) unit seed vectors -> the queries of `scorer` (see `query_names`).

    `background` is the (docs, latents) corpus sample, weighted and unit-normed as the documents are; only
    the learned scorers read it. `feedback` > 0 (learned scorers only) adds one round of pseudo-relevance
    feedback on the sample: each domain's `feedback` best sample documents that no other domain scores
    higher join its seeds, and the queries are learned again. The guard keeps a document that sits between
    two domains from pulling either towards the other; the sample stays the unlabelled class as it was.
    None: `default_feedback` for this sample.
    """
    seeds = np.asarray(seed_vectors, dtype=np.float32)
    domains, ids = query_names(seed_domains, seed_ids, scorer)
    if scorer == "nearest":
        return Queries(seeds, domains, ids)
    if background is None or len(background) == 0:
        raise ValueError(f"the {scorer} scorer needs a corpus sample")
    sample = np.asarray(background, dtype=np.float32)
    labels = np.asarray(seed_domains)
    vectors = _learned(seeds, labels, domains, scorer, sample)
    feedback = resolve_feedback(scorer, feedback, len(sample))
    if feedback:
        kept = guarded_feedback(sample @ vectors.T, feedback)
        grown = np.concatenate([seeds, *(sample[rows] for rows in kept)])
        grown_labels = np.concatenate([labels, *(np.full(len(rows), d) for rows, d in zip(kept, domains, strict=True))])
        vectors = _learned(grown, grown_labels, domains, scorer, sample)
    return Queries(vectors, domains, ids)


def _learned(seeds: np.ndarray, labels: np.ndarray, domains: list[str], scorer: str, sample: np.ndarray) -> np.ndarray:
    """(domains, latents) unit query vectors of a learned scorer from labelled seed vectors and the sample."""
    rows = []
    for domain in domains:
        members = labels == domain
        if scorer == "background":
            rows.append(seeds[members].mean(axis=0) - sample.mean(axis=0))
        else:
            rows.append(logistic_weights(seeds[members], np.concatenate([sample, seeds[~members]])))
    vectors = np.stack(rows)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors.astype(np.float32)


def guarded_feedback(scores: np.ndarray, feedback: int) -> list[np.ndarray]:
    """(docs, domains) scores -> per domain, its `feedback` best documents among those no other domain scores
    higher (ties go to the lower domain), best first."""
    owner = scores.argmax(axis=1)
    out = []
    for column in range(scores.shape[1]):
        ranked = np.argsort(-scores[:, column], kind="stable")
        out.append(ranked[owner[ranked] == column][:feedback])
    return out


def logistic_weights(positives: np.ndarray, negatives: np.ndarray, l2: float = CLASSIFIER_L2) -> np.ndarray:
    """The weights (no intercept: it shifts every score alike) of a logistic regression of positives against
    negatives, each class weighted to half the loss, fitted by L-BFGS to convergence in float64.

    Deterministic: the loss is convex and the start is zero, so the same inputs give the same weights.
    """
    x = torch.as_tensor(np.concatenate([positives, negatives]), dtype=torch.float64)
    y = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).double()
    balance = torch.cat([torch.full((len(positives),), 0.5 / len(positives)),
                         torch.full((len(negatives),), 0.5 / len(negatives))]).double()  # fmt: skip
    weights = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weights[:-1] + weights[-1]
        value = (balance * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum()
        value = value + 0.5 * l2 * (weights[:-1] ** 2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return weights[:-1].detach().numpy().astype(np.float32)
