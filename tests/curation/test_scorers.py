"""Scorers: the queries documents are compared with, and what a learned one buys over the nearest seed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from curation.selection.scorers import domain_queries, logistic_weights, query_names


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# Latents: 0 the topic's own, 1 fires in every text (common words), 2 another topic's, 3 a rare one of no topic.
SEEDS = unit([[1.0, 2.0, 0.0, 0.0], [1.5, 2.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0]])
SEED_DOMAINS = ["maths", "maths", "history"]
SAMPLE = unit([[0.0, 2.0, 0.0, 0.0]] * 8 + [[0.0, 2.0, 0.0, 1.0]] * 4 + [[0.2, 2.0, 0.0, 0.0]] * 2)


def test_nearest_keeps_every_seed_as_its_own_query():
    queries = domain_queries(SEEDS, SEED_DOMAINS, ["a", "b", "c"], "nearest")
    np.testing.assert_array_equal(queries.vectors, SEEDS)
    assert (queries.domains, queries.ids) == (SEED_DOMAINS, ["a", "b", "c"])


def test_learned_scorers_make_one_named_unit_query_per_domain():
    for scorer in ("background", "classifier"):
        queries = domain_queries(SEEDS, SEED_DOMAINS, None, scorer, SAMPLE)
        assert queries.domains == ["history", "maths"]
        assert queries.ids == [f"history:{scorer}", f"maths:{scorer}"]
        np.testing.assert_allclose(np.linalg.norm(queries.vectors, axis=1), 1.0, rtol=1e-6)
        assert query_names(SEED_DOMAINS, None, scorer) == (queries.domains, queries.ids)


def test_background_is_the_seed_mean_less_the_sample_mean():
    queries = domain_queries(SEEDS, SEED_DOMAINS, None, "background", SAMPLE)
    expected = SEEDS[:2].mean(axis=0) - SAMPLE.mean(axis=0)
    np.testing.assert_allclose(queries.vectors[1], expected / np.linalg.norm(expected), rtol=1e-5)


def test_a_learned_query_ranks_the_topic_over_a_text_that_is_only_ordinary():
    """A document of common words alone is closer to a maths seed than a maths text with a rare latent of
    its own is; the nearest seed ranks it first, and both learned scorers put the maths text first."""
    ordinary, topical = unit([[0.0, 2.0, 0.0, 0.0]])[0], unit([[0.35, 0.6, 0.0, 0.7]])[0]
    nearest = SEEDS[:2] @ np.stack([ordinary, topical]).T
    assert nearest.max(axis=0)[0] > nearest.max(axis=0)[1]
    for scorer in ("background", "classifier"):
        maths = domain_queries(SEEDS, SEED_DOMAINS, None, scorer, SAMPLE).vectors[1]
        assert topical @ maths > ordinary @ maths, scorer
        assert maths[0] == maths.max(), scorer  # the topic's latent weighs most


def test_the_classifier_weighs_against_what_the_other_domain_has():
    maths = domain_queries(SEEDS, SEED_DOMAINS, None, "classifier", SAMPLE).vectors[1]
    assert maths[2] < 0  # history's latent counts against maths


def test_logistic_weights_are_deterministic_and_separate_the_classes():
    rng = np.random.default_rng(0)
    positives = rng.normal(1.0, 0.3, (6, 5))
    negatives = rng.normal(0.0, 0.3, (40, 5))
    first, second = logistic_weights(positives, negatives), logistic_weights(positives, negatives)
    np.testing.assert_array_equal(first, second)
    assert (positives @ first).min() > (negatives @ first).max()


def test_a_learned_scorer_without_a_sample_or_an_unknown_scorer_is_refused():
    with pytest.raises(ValueError, match="needs a corpus sample"):
        domain_queries(SEEDS, SEED_DOMAINS, None, "classifier", None)
    with pytest.raises(ValueError, match="unknown scorer"):
        query_names(SEED_DOMAINS, None, "best")


# --- the corpus sample beside the SAE, and what a curate run checks of it -----------------------------------


def test_the_sample_round_trips_exactly_and_refuses_another_saes_width(tmp_path):
    import torch

    from curation.latent_weights import SAMPLE_FILE, LatentSample, sample_bytes

    pooled = torch.tensor([[0.0, 0.5, 0.25], [0.125, 0.0, 0.0]])
    (tmp_path / SAMPLE_FILE).write_bytes(sample_bytes(pooled, "rate"))
    sample = LatentSample.load(tmp_path, 3)
    assert sample is not None and sample.pooling == "rate"
    assert torch.equal(sample.pooled, pooled)
    with pytest.raises(ValueError, match="another SAE"):
        LatentSample.load(tmp_path, 4)
    assert LatentSample.load(tmp_path / "absent", 3) is None


@pytest.fixture
def sae_world(tmp_path, tiny_model_dir):
    """A corpus, seeds and an SAE with latent statistics and no corpus sample (as trained before it was kept)."""
    from helpers import write_corpus

    from core.models import model_info
    from curation.latent_weights import STATS_FILE, LatentStats
    from curation.sae.model import SAEConfig, TopKSAE
    from curation.selection.curate import CurateConfig

    corpus = write_corpus(tmp_path / "corpus", bad_rows=False)
    info = model_info(tiny_model_dir)
    cfg = SAEConfig(d_in=info.hidden_size, expansion_factor=2, k=4, layer=1, coords=list(range(info.hidden_size)),
                    base_model={"name": tiny_model_dir})  # fmt: skip
    TopKSAE(cfg).save(str(tmp_path / "sae"))
    (tmp_path / "sae" / STATS_FILE).write_bytes(LatentStats(docs=4, fired_in=[1] * cfg.num_latents).to_bytes())
    config = CurateConfig(corpus=[str(tmp_path / "corpus" / "*.jsonl.gz")], seeds=corpus["seeds"],
                          sae=str(tmp_path / "sae"), out=str(tmp_path / "out"), scorer="nearest")  # fmt: skip
    return config, cfg.num_latents


def test_a_learned_scorer_needs_the_saes_sample_pooled_as_the_run_pools(sae_world):
    import dataclasses

    import torch

    from core.errors import ConfigError
    from curation.latent_weights import SAMPLE_FILE, sample_bytes
    from curation.selection.curate import CurateConfig, plan

    config, width = sae_world
    assert plan(config).background is None  # nearest reads no sample
    learned = dataclasses.replace(config, scorer="classifier")
    for unnamed in (learned, dataclasses.replace(config, scorer=CurateConfig.scorer, feedback=None)):  # the default
        with pytest.raises(ConfigError) as error:
            plan(unnamed)
        message = str(error.value)
        assert error.value.field == "scorer" and SAMPLE_FILE in message and "jobs.train_sae" in message
        assert "--scorer nearest" in message
    pooled = torch.zeros((5, width))
    pooled[:, 0], pooled[0, 1] = 0.5, 0.25
    (Path(config.sae) / SAMPLE_FILE).write_bytes(sample_bytes(pooled, "rate"))
    checked = plan(learned)
    background = checked.background
    assert background.shape == (5, width)
    assert checked.feedback == 0  # unset: one in 25 of a 5-document sample
    np.testing.assert_allclose(np.linalg.norm(background, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ConfigError) as error:
        plan(dataclasses.replace(learned, pooling="mean"))
    assert error.value.field == "pooling" and "--pooling rate" in str(error.value)


def test_the_scorer_is_in_the_identity_and_nearest_keeps_the_identity_it_had(sae_world):
    import dataclasses

    config, _ = sae_world
    assert config.feedback == 0  # unset under nearest is none at all
    assert "scorer" not in config.content() and "feedback" not in config.content()  # as curated before scorers
    learned = dataclasses.replace(config, scorer="background")
    assert learned.content()["scorer"] == "background"
    assert learned.digest() != config.digest()


def test_feedback_adds_the_domains_best_unclaimed_sample_documents_and_learns_again():
    from curation.selection.scorers import guarded_feedback

    table = np.array([[0.9, 0.95], [0.8, 0.1], [0.7, 0.2], [0.1, 0.6], [0.6, 0.5]])
    assert [rows.tolist() for rows in guarded_feedback(table, 2)] == [[1, 2], [0, 3]]  # doc 0 is domain 1's
    # A sample document with a second maths latent (4) that no seed has: feedback brings that latent in.
    seeds = unit([[1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.2, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.0]])
    sample = unit([[0.0, 1.0, 0.0, 0.0, 0.0]] * 10 + [[1.0, 1.0, 0.0, 0.0, 1.0]] * 2 + [[0.0, 1.0, 0.0, 1.0, 0.0]] * 3)
    for scorer in ("background", "classifier"):
        plain = domain_queries(seeds, SEED_DOMAINS, None, scorer, sample)
        grown = domain_queries(seeds, SEED_DOMAINS, None, scorer, sample, feedback=2)
        assert grown.ids == plain.ids and grown.vectors[1][4] > plain.vectors[1][4] + 0.05, scorer


def test_the_default_is_the_classifier_with_feedback_scaled_to_the_sample():
    from curation.selection.curate import CurateConfig
    from curation.selection.reselect import scoring_of
    from curation.selection.scorers import default_feedback, resolve_feedback

    assert CurateConfig.scorer == "classifier" and CurateConfig.feedback is None
    # 80 at the bench's 2,048-document sample (where 80 was chosen), proportionally fewer below it.
    assert [default_feedback("classifier", docs) for docs in (10_000, 2048, 1000, 100, 10)] == [80, 80, 40, 4, 0]
    assert default_feedback("background", 1000) == 40 and default_feedback("nearest", 2048) == 0
    assert resolve_feedback("classifier", None, 1000) == 40 and resolve_feedback("classifier", 7, 1000) == 7
    # Unset feedback on a 25-document sample: one feedback document per domain, the same queries as feedback=1.
    sample = unit(np.random.default_rng(0).random((25, 4)))
    unset = domain_queries(SEEDS, SEED_DOMAINS, None, "classifier", sample, feedback=None)
    np.testing.assert_array_equal(
        unset.vectors, domain_queries(SEEDS, SEED_DOMAINS, None, "classifier", sample, 1).vectors
    )
    assert not np.array_equal(unset.vectors, domain_queries(SEEDS, SEED_DOMAINS, None, "classifier", sample, 0).vectors)
    # A run's resolved feedback is what a re-selection reads back, not its config's unset one.
    manifest = {"stage": "curate", "scorer": "classifier", "feedback": 40, "config": {"scorer": "classifier",
                                                                                   "feedback": None}}  # fmt: skip
    assert scoring_of(manifest) == ("classifier", 40)
    assert scoring_of({"stage": "curate", "config": {}}) == ("nearest", 0)  # curated before scorers


def test_per_seed_topn_keeps_top_n_per_seed_behind_a_domain_query():
    from curation.seeds import Seeds
    from curation.selection.curate import selection_settings
    from curation.selection.rules import block_candidates, merge_candidates

    seeds = Seeds(texts=["a", "b", "c"], domains=SEED_DOMAINS)  # maths has two seeds, history one
    config = SimpleNamespace(rule="per_seed_topn", top_n=3, threshold=None)
    ids = np.array([f"d{index:02d}" for index in range(20)])

    def sizes(scorer: str) -> dict[str, int]:
        settings = selection_settings(config, seeds, scorer)
        sims = np.random.default_rng(1).random((20, len(settings.seed_domains))).astype(np.float32)
        chosen = merge_candidates(block_candidates(ids, ids, sims, settings), settings)
        labels = np.asarray(settings.seed_domains)
        return {domain: sum(any(labels[key] == domain for key in keys) for _, keys in chosen.values())
                for domain in settings.domains}  # fmt: skip

    assert selection_settings(config, seeds, "nearest").query_seeds is None
    assert selection_settings(config, seeds, "classifier").query_seeds == [1, 2]  # history, maths
    nearest = sizes("nearest")  # the union of each seed's 3: between 3 and 6 for maths
    assert nearest["history"] == 3 and 3 <= nearest["maths"] <= 6
    assert sizes("classifier") == {"history": 3, "maths": 6}  # the most the union could hold


def test_feedback_needs_a_learned_scorer(sae_world):
    import dataclasses

    from core.errors import ConfigError

    config, _ = sae_world
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(config, feedback=20)
    assert error.value.field == "feedback" and "--scorer classifier" in str(error.value)
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(config, scorer="classifier", feedback=-1)
    assert error.value.field == "feedback"
    learned = dataclasses.replace(config, scorer="classifier", feedback=20)
    assert learned.content()["feedback"] == 20 and "feedback" not in config.content()


def test_the_sample_is_read_from_s3_as_one_file(s3_bucket):
    import torch

    from core import storage
    from curation.latent_weights import SAMPLE_FILE, LatentSample, sample_bytes

    options = storage.StorageOptions().resolved()
    pooled = torch.tensor([[0.0, 0.5, 0.25], [0.125, 0.0, 0.0]])
    sae = f"s3://{s3_bucket}/sae"
    assert LatentSample.load(sae, 3, options) is None
    storage.write_bytes_atomic(f"{sae}/{SAMPLE_FILE}", sample_bytes(pooled, "rate"), options)
    sample = LatentSample.load(sae, 3, options)
    assert sample is not None and torch.equal(sample.pooled, pooled)
