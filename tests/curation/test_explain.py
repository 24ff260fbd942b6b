"""Explaining a selection: the latents behind each score, each domain's driving latents, and a planted latent
that the curated rows and the report must name."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import background

from core.batching import cached_tokenizer, tokenize_texts
from curation.encode import DocumentEncoder, EncoderSettings
from curation.explain import domain_drivers, row_explanations, top_contributions
from curation.latent_weights import save_corpus_sample
from curation.sae.model import SAEConfig, TopKSAE
from curation.selection.curate import CurateConfig, label_rows, run_curation
from curation.selection.explain_report import token_in_context
from curation.selection.rules import SelectionSettings, domain_scores, nearest_seeds


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one intra-op thread (see conftest.one_torch_thread)."""


def sparse_unit_vectors(rows: int, width: int, active: int, seed: int) -> np.ndarray:
    """Non-negative unit vectors with `active` non-zeros each, like pooled SAE codes."""
    rng = np.random.default_rng(seed)
    vectors = np.zeros((rows, width), dtype=np.float32)
    for row in range(rows):
        vectors[row, rng.choice(width, size=active, replace=False)] = rng.uniform(0.1, 1.0, size=active)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# --- the terms of a score -----------------------------------------------------------------------------


def test_contributions_are_the_largest_terms_and_sum_to_the_score_of_the_nearest_seed():
    docs = torch.tensor(sparse_unit_vectors(20, 64, 6, seed=1))
    seeds = torch.tensor(sparse_unit_vectors(3, 64, 30, seed=2))
    spec = SelectionSettings("global_topn", ["b", "a", "b"])  # domains ["a", "b"]; b has seeds 0 and 2
    sims = (docs @ seeds.T).numpy()
    scores, nearest = domain_scores(sims, spec)

    latents, terms = top_contributions(docs, seeds, nearest, count=6)  # 6 >= every doc's non-zeros: all terms

    assert latents.shape == terms.shape == (20, 2, 6)
    np.testing.assert_allclose(terms.sum(axis=2), scores, atol=1e-6)
    assert (np.diff(terms, axis=2) <= 0).all()  # best first
    doc, domain = 4, 1
    expected = docs[doc].numpy() * seeds[nearest[doc, domain]].numpy()
    assert latents[doc, domain, 0] == int(np.argmax(expected))
    np.testing.assert_allclose(terms[doc, domain], np.sort(expected)[::-1][:6], atol=1e-7)
    # Fewer latents kept: the largest ones, and the rest of the score is what was left out.
    few_latents, few_terms = top_contributions(docs, seeds, nearest, count=2)
    shared = few_terms > 0  # past the shared latents every term is 0, and which latent fills the slot is moot
    np.testing.assert_array_equal(few_latents[shared], latents[:, :, :2][shared])
    np.testing.assert_array_equal(few_terms, terms[:, :, :2])
    assert (few_terms.sum(axis=2) <= scores + 1e-6).all()


def test_nearest_seed_ties_go_to_the_lower_index_in_selection_and_explanation():
    sims = np.array([[0.5, 0.2, 0.5], [0.1, 0.3, 0.3]], dtype=np.float32)
    spec = SelectionSettings("per_seed_topn", ["x", "y", "x"])
    assert nearest_seeds(sims, spec.domain_members()).tolist() == [[0, 1], [2, 1]]  # row 0 ties: seed 0
    assert domain_scores(sims, spec)[1].tolist() == [[0, 1], [2, 1]]


def test_driving_latents_are_the_heaviest_in_the_mean_of_a_domains_seeds():
    seeds = np.zeros((3, 10), dtype=np.float32)
    seeds[0, [1, 4]] = [0.8, 0.6]
    seeds[1, [7]] = [1.0]
    seeds[2, [4, 9]] = [0.6, 0.8]
    drivers = domain_drivers(seeds, ["p", "q", "p"], count=3)
    assert drivers.domains == ["p", "q"]
    # p's mean: latent 4 -> 0.6, latents 1 and 9 -> 0.4 each (tie: lower index first).
    assert drivers.latents.tolist() == [[4, 1, 9], [7, 0, 1]]
    np.testing.assert_allclose(drivers.weights, [[0.6, 0.4, 0.4], [1.0, 0.0, 0.0]], atol=1e-7)
    assert drivers.as_dict()["q"][0] == [7, 1.0]


def test_row_explanations_take_the_chosen_domain_and_drop_unshared_latents():
    # Two domains x three latents per row, flattened as the encode actor writes them.
    scored = pa.table(
        {
            "domain_latents": [[1, 2, 3, 7, 8, 9], [4, 5, 6, 10, 11, 12]],
            "domain_contributions": [[0.5, 0.2, 0.0, 0.9, 0.1, 0.05], [0.3, 0.0, 0.0, 0.6, 0.2, 0.0]],
        }
    )
    latents, terms = row_explanations(scored, np.array([1, 0]), domains=2)
    assert latents.to_pylist() == [[7, 8, 9], [4]]
    np.testing.assert_allclose(terms.to_pylist()[0], [0.9, 0.1, 0.05], rtol=1e-6)
    assert latents.type == pa.list_(pa.int32()) and terms.type == pa.list_(pa.float32())
    # Output written before the explanation columns existed: null lists, not an error.
    old_latents, old_terms = row_explanations(pa.table({"id": ["a"]}), np.array([0]), domains=1)
    assert old_latents.to_pylist() == [None] and old_terms.to_pylist() == [None]


def test_label_rows_give_each_curated_row_the_terms_of_its_own_domain():
    spec = SelectionSettings("global_topn", ["b", "a"], top_n=1)  # domains ["a", "b"]: a is seed 1, b seed 0
    scored = pa.table(
        {
            "id": ["d0", "d1"],
            "text": ["zero", "one"],
            "source": ["s#1", "s#2"],
            "meta": ["{}", "{}"],
            "n_tokens": [3, 4],
            "seed_sims": [[0.6, 0.2], [0.1, 0.7]],
            # Per row: domain a's two latents and terms, then domain b's.
            "domain_latents": [[11, 12, 21, 22], [13, 14, 23, 24]],
            "domain_contributions": [[0.15, 0.05, 0.4, 0.2], [0.5, 0.2, 0.1, 0.0]],
        }
    )
    selected = {"d0": ("s#1", [1]), "d1": ("s#2", [0, 1])}  # d0 for b; d1 for a and b

    rows = label_rows(scored, spec, selected).to_pylist()

    got = {(row["id"], row["domain"]): (row["top_latents"], row["latent_contributions"]) for row in rows}
    assert got.keys() == {("d0", "b"), ("d1", "a"), ("d1", "b")}
    assert got[("d0", "b")][0] == [21, 22] and got[("d1", "a")][0] == [13, 14]
    assert got[("d1", "b")] == ([23], [pytest.approx(0.1)])  # the 0 term is not listed
    np.testing.assert_allclose(got[("d0", "b")][1], [0.4, 0.2], rtol=1e-6)


# --- token-level peaks --------------------------------------------------------------------------------


def test_peaks_are_each_watched_latents_largest_code_after_position_zero(tiny_model_dir):
    encoder = DocumentEncoder(EncoderSettings(model=tiny_model_dir, sae_dir=None, layer=2, max_batch_tokens=48))
    sae = TopKSAE(SAEConfig(d_in=64, k=8, layer=2))
    docs = [[random.Random(seed).randrange(4, 230) for _ in range(length)] for seed, length in enumerate([9, 3, 14])]
    sae.fit_normalizer(encoder.activations(docs))
    encoder = DocumentEncoder(encoder.spec, sae=sae)
    watch = torch.tensor([0, 17, 300, 511])

    vectors, peaks, positions = encoder.encode_with_peaks(docs, watch)

    torch.testing.assert_close(vectors, encoder.encode(docs))
    for row, doc in enumerate(docs):
        hidden = encoder.forward(torch.tensor([doc]), torch.ones(1, len(doc), dtype=torch.long))[0]
        codes = sae.encode_dense(hidden)[1:, watch]  # position 0 does not count
        torch.testing.assert_close(peaks[row], codes.max(dim=0).values, atol=1e-5, rtol=0)
        assert positions[row].tolist() == (codes.argmax(dim=0) + 1).tolist()


def test_token_in_context_bolds_the_token_and_keeps_the_spaces(tiny_model_dir):
    tokenizer = cached_tokenizer(tiny_model_dir)
    ids = tokenize_texts(tokenizer, ["w1 w2 w3 w177 w4 w5"], 64)[0]
    assert token_in_context(tokenizer, ids, 3, width=2) == "…w2 w3 **w177** w4 w5"
    assert token_in_context(tokenizer, ids, 0, width=1) == "**w1** w2…"
    assert token_in_context(tokenizer, ids, 6) == "(token position beyond the text)"


# --- a planted latent, end to end ---------------------------------------------------------------------

LAYER = 1
# Each domain's marker word and the SAE latent made to fire on it, and on nothing else.
PLANTED = {"alpha": ("w177", 5), "beta": ("w188", 9)}


def planted_texts(word: str, first: int) -> list[str]:
    """Documents in which `word` is every other token, between words no other document uses."""
    return [f"{word} w{first + 3 * i} {word} w{first + 3 * i + 1} {word} w{first + 3 * i + 2} {word}" for i in range(3)]


SEEDS = [
    {"domain": "alpha", "text": "w177 w20 w177 w21 w177 w22 w177"},
    {"domain": "alpha", "text": "w23 w177 w24 w177 w25"},
    {"domain": "beta", "text": "w188 w26 w188 w27 w188 w28 w188"},
]


def planted_sae(model_dir: str, texts: list[str]) -> TopKSAE:
    """A k=1 SAE over the tiny model's layer 1 whose latent PLANTED[d][1] fires exactly on PLANTED[d][0].

    Random latents share the other tokens. Each planted latent's encoder row is a least-squares separator of
    its word's activations from every other counted token in `texts`, scaled so its pre-activation is at
    least +50 on the word (winning the top-1 over random latents, which stay below ~10) and at most -50 off it.
    """
    encoder = DocumentEncoder(EncoderSettings(model=model_dir, sae_dir=None, layer=LAYER))
    token_lists = tokenize_texts(encoder.tokenizer, texts, 256)
    hidden = [encoder.forward(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0] for ids in token_lists]
    acts = torch.cat([h[1:] for h in hidden])
    token_ids = torch.tensor([token for ids in token_lists for token in ids[1:]])
    sae = TopKSAE(SAEConfig(d_in=64, num_latents=64, k=1, layer=LAYER, base_model={"name": model_dir}), seed=3)
    sae.fit_normalizer(acts)
    x = torch.cat([sae.normalize(acts), torch.ones(len(acts), 1)], dim=1).double()
    for word, latent in PLANTED.values():
        target = token_ids == encoder.tokenizer.convert_tokens_to_ids(word)
        solution = torch.linalg.lstsq(x, (2.0 * target - 1.0).double()[:, None]).solution[:, 0]
        projection = x @ solution
        low, high = float(projection[target].min()), float(projection[~target].max())
        assert low > high, f"{word} is not linearly separable at layer {LAYER}"
        scale = 100.0 / (low - high)
        with torch.no_grad():
            sae.W_enc[latent] = (solution[:-1] * scale).float()
            sae.b_enc[latent] = float((solution[-1] - (low + high) / 2) * scale)
    return sae


def why_table(report: str, domain: str) -> dict[int, list[str]]:
    """The rows of `domain`'s table in the report's "Why these documents" section, by latent."""
    section = report.split("## Why these documents", 1)[1].split(f"### {domain}\n\n", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if re.match(r"\| \d", line)]
    return {int(cells[0]): [cell.strip() for cell in cells[1:]] for cells in rows}


@pytest.fixture(scope="module")
def planted_run(ray_local, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    rng = random.Random(5)
    corpus = [background(rng) for _ in range(30)]
    corpus += planted_texts("w177", 30) + planted_texts("w188", 40)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus))
    (root / "seeds.jsonl").write_text("".join(json.dumps(seed) + "\n" for seed in SEEDS))
    sae = planted_sae(tiny_model_dir, corpus + [seed["text"] for seed in SEEDS])
    sae.save(root / "sae")
    # The corpus sample and rarity statistics `jobs.train_sae` would measure, on the whole corpus: the
    # explanation is of the weighted vectors curation scores by.
    encoder = DocumentEncoder(EncoderSettings(model=tiny_model_dir, sae_dir=None, layer=LAYER), sae=sae)
    save_corpus_sample(root / "sae", encoder.encode(tokenize_texts(encoder.tokenizer, corpus, 256)), "rate")
    config = CurateConfig(
        corpus=[str(root / "corpus.jsonl")], seeds=str(root / "seeds.jsonl"), sae=str(root / "sae"),
        out=str(root / "out"), rule="global_topn", top_n=3, cpus=0.5, batch_size=16,
        scorer="nearest",  # each seed a query: a document's listed terms are all it shares with one
    )  # fmt: skip
    manifest = run_curation(config)
    return {"out": root / "out", "documents": len(corpus), "manifest": manifest}


@pytest.mark.timeout(300)
def test_curated_rows_name_the_planted_latent_first_and_their_terms_sum_to_the_score(planted_run):
    rows = pq.read_table(planted_run["out"] / "curated").to_pylist()
    assert sorted((row["domain"], row["text"]) for row in rows) == sorted(
        [("alpha", text) for text in planted_texts("w177", 30)] + [("beta", text) for text in planted_texts("w188", 40)]
    )
    for row in rows:
        assert row["top_latents"][0] == PLANTED[row["domain"]][1]
        # A k=1 SAE fires one latent per token: a 6-token document shares at most 6 latents with a seed, all kept.
        assert sum(row["latent_contributions"]) == pytest.approx(row["score"], abs=1e-5)
        assert row["latent_contributions"] == sorted(row["latent_contributions"], reverse=True)
    schema = pq.read_schema(next((planted_run["out"] / "curated").glob("*.parquet")))
    assert schema.field("top_latents").type == pa.list_(pa.int32())
    assert schema.field("latent_contributions").type == pa.list_(pa.float32())


@pytest.mark.timeout(300)
def test_report_lists_the_planted_latent_with_its_word_in_context_and_its_firing_frequency(planted_run):
    report = (planted_run["out"] / "report.md").read_text()
    for domain, (word, latent) in PLANTED.items():
        table = why_table(report, domain)
        assert list(table)[0] == latent  # the heaviest latent in the domain's seeds
        weight, in_selected, in_corpus, contexts = table[latent]
        assert float(weight) > 0.3
        assert in_selected == "100.0%"  # it fires in every document selected for the domain...
        assert in_corpus == f"{3 / planted_run['documents']:.1%}"  # ...and in nothing else of the corpus
        snippets = contexts.split("<br>")
        assert len(snippets) == 3 and all(f"**{word}**" in snippet for snippet in snippets)
    # The top examples name their driving latent too, and the manifest says which latent each slot is.
    assert re.search(rf"\| w177 w3\d .* \| {PLANTED['alpha'][1]} \(0\.\d+\)", report)
    drivers = planted_run["manifest"]["driving_latents"]
    assert drivers["beta"][0][0] == PLANTED["beta"][1]
    assert (planted_run["out"] / "latents.png").stat().st_size > 1000
