"""The baselines of bench/curation_quality.py, each with the variants its users would try.

- **BM25** from `bm25s` (its `lucene` scoring, English stop words out), over a grid of k1 and b, with all
  of a topic's seeds as one query or each seed as a query (the best one counts); and with RM3-style
  pseudo-relevance feedback: the first ranking's top documents give a relevance model of terms, whose
  heaviest terms join the query (Lavrenko and Croft's RM1 interpolated with the query, as Anserini's RM3).
- **Dense vectors** (the model's mean-pooled hidden states, MiniLM's sentence embeddings): cosine with each
  seed (the best counts) or with the seeds' centroid, raw or centred on the corpus mean (which removes the
  direction every document shares, and with it most of what makes raw cosines of hidden states alike).

The bench picks each family's variant on its development topics; nothing here knows about the halves.
The libraries (bm25s, scikit-learn, sentence-transformers) come with `pip install -e '.[bench]'` and are
imported inside the functions that use them, so the bench imports without them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

# Shared with the replication's curator arms (experiments/replication), so both rank the same way.
from curation.baselines import Lexicon, bm25_weights, centred, lexicon, query_counts

__all__ = ["Lexicon", "bm25_variants", "bm25_weights", "centred", "lexicon", "query_counts", "rm3_query"]

BM25_K1 = (0.6, 0.9, 1.2, 1.5, 2.0)
BM25_B = (0.3, 0.5, 0.75, 0.9)
RM3_DOCS = (5, 10, 30)
"""Feedback documents: the first ranking's best, whose terms form the relevance model."""
RM3_TERMS = (10, 30, 100)
"""Expansion terms: the relevance model's heaviest, which join the query."""
RM3_QUERY_WEIGHT = (0.3, 0.5, 0.7)
"""The original query's share of the expanded one (Anserini's default: 0.5)."""


def rm3_query(
    query: np.ndarray, first: np.ndarray, words: Lexicon, docs: int, terms: int, query_weight: float
) -> np.ndarray:
    """RM3: the query's term distribution interpolated with a relevance model of its `docs` best documents
    (`first`: their scores), cut to its `terms` heaviest terms and renormalised."""
    top = np.argsort(-first, kind="stable")[:docs]
    weights = np.maximum(first[top], 0.0)
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(top), 1.0 / len(top))
    tf = words.counts[top]
    lengths = np.maximum(np.asarray(tf.sum(axis=1)).ravel(), 1.0)
    relevance = np.asarray(tf.multiply((weights / lengths)[:, None]).sum(axis=0)).ravel()
    keep = np.argsort(-relevance, kind="stable")[:terms]
    model = np.zeros_like(relevance)
    model[keep] = relevance[keep]
    model = model / model.sum() if model.sum() > 0 else model
    return query_weight * query / max(query.sum(), 1e-12) + (1 - query_weight) * model


def _topic_scores(sims: np.ndarray, seed_topics: np.ndarray, topics: list[str], rule: str) -> np.ndarray:
    """(docs, seeds) -> (docs, topics): the best seed (`max`) or the sum over the topic's seeds."""
    out = np.zeros((sims.shape[0], len(topics)), dtype=np.float32)
    for column, topic in enumerate(topics):
        members = np.flatnonzero(seed_topics == topic)
        out[:, column] = sims[:, members].max(axis=1) if rule == "max" else sims[:, members].sum(axis=1)
    return out


def bm25_variants(
    words: Lexicon, seed_texts: list[str], seed_topics: np.ndarray, topics: list[str]
) -> Iterator[tuple[str, str, np.ndarray]]:
    """(family, variant, (docs, topics) scores) for every BM25 setting tried: plain over k1 x b x query form,
    then RM3 over its grid, on each (k1, b) of the plain grid with the topic's seeds as one query."""
    seed_queries = query_counts(words, seed_texts)
    topic_queries = np.stack([seed_queries[seed_topics == topic].sum(axis=0) for topic in topics])
    for k1, b in itertools.product(BM25_K1, BM25_B):
        matrix, _ = bm25_weights(words, k1, b)
        per_seed = np.asarray(matrix @ seed_queries.T)
        yield "BM25", f"k1 {k1}, b {b}, best seed", _topic_scores(per_seed, seed_topics, topics, "max")
        first = np.asarray(matrix @ topic_queries.T)
        yield "BM25", f"k1 {k1}, b {b}, seeds as one query", first
        for docs, terms, weight in itertools.product(RM3_DOCS, RM3_TERMS, RM3_QUERY_WEIGHT):
            expanded = np.stack([rm3_query(topic_queries[t], first[:, t], words, docs, terms, weight)
                                 for t in range(len(topics))])  # fmt: skip
            name = f"k1 {k1}, b {b}, RM3 {docs} docs, {terms} terms, query weight {weight}"
            yield "BM25 + RM3", name, np.asarray(matrix @ expanded.T)
