"""Selection rules: which scored documents become the domain dataset.

Every document carries its cosine similarity to every seed (`seed_sims`, one column per seed).
Three rules, all computed for several domains in one pass:

- ``per_seed_topn``: for each seed, its `top_n` nearest documents; a domain is the union over its
  seeds (the rule of arXiv 2505.00624). Under a scorer with one query per domain (a learned one,
  curation/selection/scorers.py), the domain's query takes `top_n` documents for each of its seeds, the
  most the paper's union could hold, so a size means the same whichever the scorer.
- ``global_topn``: per domain, the `top_n` documents with the highest domain score.
- ``threshold``: per domain, every document whose domain score is at least `threshold`.

A document's domain score is its best similarity over the domain's seeds, and `nearest_seed` is that
seed. At corpus scale the top-N is a per-block top-N (`block_candidates`) followed by a merge on the
driver (`merge_candidates`); only ids and scores travel, never texts. Exact-duplicate texts share an
id, and the merge keeps one `source` per id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from core.errors import ConfigError, check_range

SelectionRule = Literal["per_seed_topn", "global_topn", "threshold"]

CANDIDATE_SCHEMA = pa.schema(
    [("key", pa.int32()), ("id", pa.string()), ("source", pa.string()), ("score", pa.float32())]
)


@dataclass(frozen=True)
class SelectionSettings:
    """The rule, its size, and which seed belongs to which domain."""

    rule: SelectionRule
    seed_domains: list[str]
    top_n: int = 100
    threshold: float = 0.5
    seed_ids: list[str] | None = None
    """Each seed's id (curation.seeds), which a curated row's `nearest_seed` names; None: its index."""
    query_seeds: list[int] | None = None
    """How many seeds each query (each entry of `seed_domains`) stands for: 1 for a seed's own, a domain's
    seed count for a learned scorer's; None: 1 each. `per_seed_topn` takes `top_n` documents per seed."""

    def __post_init__(self) -> None:
        check_range("top_n", self.top_n, ge=1)
        check_range("threshold", self.threshold, ge=-1.0, le=1.0, hint="a cosine similarity")
        if not self.seed_domains:
            raise ConfigError("seeds", 0, "need at least one seed")
        if self.query_seeds is not None:
            if len(self.query_seeds) != len(self.seed_domains):
                raise ConfigError("query_seeds", self.query_seeds, f"needs one count per query "
                                  f"({len(self.seed_domains)})")  # fmt: skip
            for count in self.query_seeds:
                check_range("query_seeds", count, ge=1, hint="seeds behind a query")

    def quota(self, key: int) -> int:
        """Documents a top-N rule keeps for a key: a query under per_seed_topn, a domain otherwise."""
        if self.rule == "per_seed_topn" and self.query_seeds is not None:
            return self.top_n * self.query_seeds[key]
        return self.top_n

    @property
    def domains(self) -> list[str]:
        return sorted(set(self.seed_domains))

    def domain_members(self) -> list[np.ndarray]:
        """For each domain (in `domains` order), the seed indices that belong to it."""
        labels = np.asarray(self.seed_domains)
        return [np.flatnonzero(labels == domain) for domain in self.domains]


def nearest_seeds(seed_sims: np.ndarray, members: list[np.ndarray]) -> np.ndarray:
    """(docs, seeds) similarities, each domain's seed indices -> (docs, domains) index of its nearest seed.

    Ties go to the lower seed index. The encode actor explains a document's score with the same function
    (curation/explain.py), so its explanation is for the seed the selection scores it by.
    """
    nearest = np.empty((seed_sims.shape[0], len(members)), dtype=np.int32)
    for column, rows in enumerate(members):
        nearest[:, column] = rows[seed_sims[:, rows].argmax(axis=1)]
    return nearest


def domain_scores(seed_sims: np.ndarray, spec: SelectionSettings) -> tuple[np.ndarray, np.ndarray]:
    """(docs, seeds) similarities -> (docs, domains) best similarity and the seed index that gave it."""
    nearest = nearest_seeds(seed_sims, spec.domain_members())
    scores = np.take_along_axis(seed_sims, nearest.astype(np.int64), axis=1).astype(np.float32)
    return scores, nearest


def _top_rows(scores: np.ndarray, top_n: int) -> np.ndarray:
    """Indices of the `top_n` largest values, ties broken by position, best first."""
    if scores.shape[0] <= top_n:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, top_n - 1)[:top_n]
    return part[np.argsort(-scores[part], kind="stable")]


def _top_unique_rows(ids: np.ndarray, scores: np.ndarray, top_n: int) -> np.ndarray:
    """Rows of the `top_n` best distinct ids, with every copy of those ids.

    A text duplicated inside one block must take one slot, not two; all its copies go on so the merge
    can keep one source for it.
    """
    order = np.lexsort((ids, -scores))
    _, first = np.unique(ids[order], return_index=True)
    best_ids = ids[order[np.sort(first)[:top_n]]]
    return np.flatnonzero(np.isin(ids, best_ids))


def rule_scores(seed_sims: np.ndarray, spec: SelectionSettings) -> np.ndarray:
    """(docs, keys) scores a rule ranks on: per seed for per_seed_topn, per domain otherwise."""
    if spec.rule == "per_seed_topn":
        return seed_sims
    return domain_scores(seed_sims, spec)[0]


def block_candidates(ids: np.ndarray, sources: np.ndarray, seed_sims: np.ndarray, spec: SelectionSettings) -> pa.Table:
    """One block's candidates: its own top-N per key (or all rows over the threshold)."""
    scores = rule_scores(np.asarray(seed_sims, dtype=np.float32), spec)
    keys, rows = [], []
    for key in range(scores.shape[1]):
        if spec.rule == "threshold":
            chosen = np.flatnonzero(scores[:, key] >= spec.threshold)
        else:
            chosen = _top_unique_rows(np.asarray(ids), scores[:, key], spec.quota(key))
        keys.append(np.full(len(chosen), key, dtype=np.int32))
        rows.append(chosen)
    row_index = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    key_index = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int32)
    return pa.table(
        {
            "key": key_index,
            "id": np.asarray(ids)[row_index],
            "source": np.asarray(sources)[row_index],
            "score": scores[row_index, key_index],
        },
        schema=CANDIDATE_SCHEMA,
    )


def merge_candidates(candidates: pa.Table, spec: SelectionSettings) -> dict[str, tuple[str, list[int]]]:
    """Merge per-block candidates into the selection: id -> (the one source kept for it, the keys it won).

    Keys are seeds under ``per_seed_topn`` and domains otherwise (indices into `spec.domains`).
    """
    keys = candidates.column("key").to_numpy()
    ids = candidates.column("id").to_numpy(zero_copy_only=False)
    sources = candidates.column("source").to_numpy(zero_copy_only=False)
    scores = candidates.column("score").to_numpy()
    # The source kept for a duplicated text is the lexically first, whichever key selects it.
    first_source: dict[str, str] = {}
    for doc_id, source in zip(ids, sources, strict=True):
        if doc_id not in first_source or source < first_source[doc_id]:
            first_source[doc_id] = source
    selected: dict[str, tuple[str, list[int]]] = {}
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        # One entry per id: a duplicate text found in two blocks must not take two slots.
        order = rows[np.lexsort((ids[rows], -scores[rows]))]
        _, first = np.unique(ids[order], return_index=True)
        unique_rows = order[np.sort(first)]
        if spec.rule != "threshold":
            unique_rows = unique_rows[: spec.quota(int(key))]
        for row in unique_rows:
            doc_id = str(ids[row])
            selected.setdefault(doc_id, (first_source[doc_id], []))[1].append(int(key))
    return selected


def label_selected(ids: np.ndarray, seed_sims: np.ndarray, spec: SelectionSettings, chosen: np.ndarray) -> pa.Table:
    """For rows already selected, one (id, domain, score, nearest_seed) row per domain they were chosen for.

    `chosen` is (docs, keys) booleans from the rule; a row chosen for a seed counts for its domain.
    """
    scores, nearest = domain_scores(np.asarray(seed_sims, dtype=np.float32), spec)
    if spec.rule == "per_seed_topn":
        labels = np.asarray(spec.seed_domains)
        in_domain = np.stack([chosen[:, labels == domain].any(axis=1) for domain in spec.domains], axis=1)
    else:
        in_domain = chosen
    rows, columns = np.nonzero(in_domain)
    return pa.table(
        {
            "id": np.asarray(ids)[rows],
            "domain": np.asarray(spec.domains)[columns],
            "score": scores[rows, columns],
            "nearest_seed": nearest[rows, columns],
        }
    )
