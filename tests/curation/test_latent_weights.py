"""Rarity weighting of SAE latents: the statistics, the weights, and what they change in a document's vector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from curation.latent_weights import STATS_FILE, LatentStats, latent_stats, max_weight


def test_stats_count_the_documents_each_latent_fires_in():
    vectors = np.array([[0.5, 0.0, 0.1, 0.0], [0.2, 0.0, 0.0, 0.0], [0.9, 0.3, 0.0, 0.0]])
    stats = latent_stats(torch.tensor(vectors))
    assert stats == LatentStats(docs=3, fired_in=[3, 1, 1, 0])
    weights = stats.weights()
    assert weights.dtype == np.float32
    # Everywhere: weight 1. Nowhere: the largest weight, finite. Rarer latents weigh more.
    assert weights[0] == pytest.approx(1.0) and weights[3] == pytest.approx(max_weight(3))
    assert weights[1] == weights[2] == pytest.approx(math.log(4 / 2) + 1)
    assert weights[0] < weights[1] < weights[3]


def test_stats_round_trip_and_absence(tmp_path):
    stats = LatentStats(docs=5, fired_in=[5, 0, 2])
    (tmp_path / STATS_FILE).write_bytes(stats.to_bytes())
    assert LatentStats.load(tmp_path) == stats
    assert LatentStats.load(tmp_path / "elsewhere") is None


def test_a_rare_shared_latent_outweighs_a_common_one():
    """The seed fires a common latent (0) and a rare one (1). Document A shares only the common latent, at a
    high rate; document B only the rare one. Unweighted, A is nearer; weighted by rarity, B is."""
    corpus = np.zeros((100, 3))
    corpus[:, 0] = 0.6  # latent 0 fires in every document
    corpus[:3, 1] = 0.2  # latent 1 in three
    corpus[:50, 2] = 0.3
    weights = latent_stats(corpus).weights()
    seed = np.array([0.6, 0.3, 0.0])
    doc_a, doc_b = np.array([0.8, 0.0, 0.4]), np.array([0.3, 0.3, 0.4])

    def cosine(x, y):
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    assert cosine(seed, doc_a) > cosine(seed, doc_b)
    assert cosine(seed * weights, doc_b * weights) > cosine(seed * weights, doc_a * weights)


def test_curation_without_statistics_says_how_to_get_them(tmp_path, tiny_model_dir):
    from helpers import write_corpus

    from core.models import model_info
    from curation.sae.model import SAEConfig, TopKSAE
    from curation.selection.curate import CurateConfig, plan

    corpus = write_corpus(tmp_path / "corpus", bad_rows=False)
    info = model_info(tiny_model_dir)
    cfg = SAEConfig(d_in=info.hidden_size, expansion_factor=2, k=4, layer=1, coords=list(range(info.hidden_size)),
                    base_model={"name": tiny_model_dir})  # fmt: skip
    TopKSAE(cfg).save(str(tmp_path / "sae"))
    config = CurateConfig(corpus=[str(tmp_path / "corpus" / "*.jsonl.gz")], seeds=corpus["seeds"],
                          sae=str(tmp_path / "sae"), out=str(tmp_path / "out"), scorer="nearest")  # fmt: skip
    with pytest.raises(ConfigError) as error:
        plan(config)
    assert (
        error.value.field == "weighting"
        and "jobs.train_sae" in str(error.value)
        and "--weighting none" in str(error.value)
    )
    assert plan(CurateConfig(**{**config.__dict__, "weighting": "none"})).latent_weights is None
    (tmp_path / "sae" / STATS_FILE).write_bytes(LatentStats(docs=4, fired_in=[1] * 7).to_bytes())
    with pytest.raises(ConfigError, match="another SAE"):
        plan(config)
    (tmp_path / "sae" / STATS_FILE).write_bytes(LatentStats(docs=4, fired_in=[1] * cfg.num_latents).to_bytes())
    assert plan(config).latent_weights == pytest.approx([math.log(5 / 2) + 1] * cfg.num_latents)


@pytest.mark.parametrize("content", ['{"docs": NaN, "fired_in": [1]}', '{"docs": 4, "fired_in": [1, Infinity]}',
                                     '{"docs": 4, "fired_in": [5]}', '{"docs": 0, "fired_in": []}',
                                     '{"docs": 4, "fired_in": [true]}', '{"docs": 4}'])  # fmt: skip
def test_statistics_that_are_no_counts_are_refused(tmp_path, content):
    (tmp_path / STATS_FILE).write_text(content)
    with pytest.raises(ValueError, match="not a valid"):
        LatentStats.load(tmp_path)


def test_curation_refuses_an_sae_that_diverged(tmp_path, tiny_model_dir):
    """Such an SAE used to be accepted: every document scored 0.0 and the first ids were picked for every seed."""
    from helpers import write_corpus

    from core.models import model_info
    from curation.sae.model import SAEConfig, TopKSAE
    from curation.selection.curate import CurateConfig, plan

    corpus = write_corpus(tmp_path / "corpus", bad_rows=False)
    info = model_info(tiny_model_dir)
    cfg = SAEConfig(d_in=info.hidden_size, expansion_factor=2, k=4, layer=1, coords=list(range(info.hidden_size)),
                    base_model={"name": tiny_model_dir})  # fmt: skip
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.fill_(float("nan"))
    sae.save(str(tmp_path / "sae"))
    config = CurateConfig(corpus=[str(tmp_path / "corpus" / "*.jsonl.gz")], seeds=corpus["seeds"],
                          sae=str(tmp_path / "sae"), out=str(tmp_path / "out"), weighting="none")  # fmt: skip
    with pytest.raises(ConfigError) as error:
        plan(config)
    assert error.value.field == "sae" and "W_enc" in str(error.value) and "jobs.train_sae" in str(error.value)
