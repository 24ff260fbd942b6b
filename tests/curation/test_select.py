"""Selection rules on hand-made similarity matrices: per-seed top-N, global top-N, threshold, block merge."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from core.errors import ConfigError
from curation.selection.rules import (
    CANDIDATE_SCHEMA,
    SelectionSettings,
    block_candidates,
    domain_scores,
    label_selected,
    merge_candidates,
)

# Three seeds, two domains: seeds 0 and 1 are "math", seed 2 is "bio". Domains sort as ["bio", "math"].
SEED_DOMAINS = ["math", "math", "bio"]
# (docs, seeds) cosine similarities with no ties inside a column.
SIMS = np.array(
    [
        [0.90, 0.80, 0.10],  # d0: best for seed 0, second for seed 1
        [0.70, 0.10, 0.20],  # d1: second for seed 0
        [0.20, 0.85, 0.75],  # d2: best for seed 1, second for seed 2 (math and bio)
        [0.10, 0.20, 0.90],  # d3: best for seed 2
        [0.30, 0.30, 0.30],  # d4: never in a top 2
    ],
    dtype=np.float32,
)
IDS = np.array([f"d{i}" for i in range(len(SIMS))], dtype=object)
SOURCES = np.array([f"shard.jsonl#{i + 1}" for i in range(len(SIMS))], dtype=object)


def run_selection(
    spec: SelectionSettings, sims: np.ndarray, ids: np.ndarray, sources: np.ndarray, cuts: list[int] | None = None
) -> dict[str, tuple[str, list[int]]]:
    """Per-block candidates over the blocks that `cuts` marks off, then the driver's merge."""
    bounds = [0, *(cuts or []), len(sims)]
    tables = [
        block_candidates(ids[start:stop], sources[start:stop], sims[start:stop], spec)
        for start, stop in zip(bounds, bounds[1:], strict=False)
    ]
    return merge_candidates(pa.concat_tables(tables), spec)


def keys_by_id(selected: dict[str, tuple[str, list[int]]]) -> dict[str, list[int]]:
    return {doc_id: sorted(keys) for doc_id, (_, keys) in selected.items()}


def label_rows(
    spec: SelectionSettings, selected: dict[str, tuple[str, list[int]]]
) -> list[tuple[str, str, float, int]]:
    """label_selected over the selected rows of SIMS, as sorted (id, domain, score, nearest_seed) tuples."""
    rows = [int(doc_id[1:]) for doc_id in selected]
    n_keys = len(spec.seed_domains) if spec.rule == "per_seed_topn" else len(spec.domains)
    chosen = np.zeros((len(rows), n_keys), dtype=bool)
    for row, doc_id in enumerate(selected):
        chosen[row, selected[doc_id][1]] = True
    table = label_selected(IDS[rows], SIMS[rows], spec, chosen)
    return sorted(
        (doc_id, domain, round(score, 4), seed)
        for doc_id, domain, score, seed in zip(
            table.column("id").to_pylist(),
            table.column("domain").to_pylist(),
            table.column("score").to_pylist(),
            table.column("nearest_seed").to_pylist(),
            strict=True,
        )
    )


# --- the three rules --------------------------------------------------------------------------------


def test_per_seed_topn_is_the_union_over_a_domains_seeds():
    spec = SelectionSettings("per_seed_topn", SEED_DOMAINS, top_n=2)
    selected = run_selection(spec, SIMS, IDS, SOURCES)
    # Keys are seeds: seed 0 -> d0, d1; seed 1 -> d2, d0; seed 2 -> d3, d2.
    assert keys_by_id(selected) == {"d0": [0, 1], "d1": [0], "d2": [1, 2], "d3": [2]}
    assert selected["d0"][0] == "shard.jsonl#1"
    labels = label_rows(spec, selected)
    # d0 won two math seeds but is one math row; d2 won a math and a bio seed and is one row in each.
    assert labels == [
        ("d0", "math", 0.9, 0),
        ("d1", "math", 0.7, 0),
        ("d2", "bio", 0.75, 2),
        ("d2", "math", 0.85, 1),
        ("d3", "bio", 0.9, 2),
    ]


# The rows that both global top-2 and a 0.75 threshold select from SIMS: (id, domain, score, nearest seed).
TOP2_OR_OVER_075_ROWS = [
    ("d0", "math", 0.9, 0),
    ("d2", "bio", 0.75, 2),
    ("d2", "math", 0.85, 1),
    ("d3", "bio", 0.9, 2),
]


def test_global_topn_ranks_on_the_domain_score():
    spec = SelectionSettings("global_topn", SEED_DOMAINS, top_n=2)
    selected = run_selection(spec, SIMS, IDS, SOURCES)
    # Keys are domains: 0 = bio (d3 0.90, d2 0.75), 1 = math (d0 0.90, d2 0.85); d1 (math 0.70) misses.
    assert keys_by_id(selected) == {"d0": [1], "d2": [0, 1], "d3": [0]}
    assert label_rows(spec, selected) == TOP2_OR_OVER_075_ROWS


def test_global_topn_takes_everything_when_the_corpus_is_smaller_than_top_n():
    spec = SelectionSettings("global_topn", SEED_DOMAINS, top_n=50)
    selected = run_selection(spec, SIMS, IDS, SOURCES, cuts=[2])
    assert keys_by_id(selected) == {doc_id: [0, 1] for doc_id in IDS}


def test_threshold_is_inclusive():
    # 0.75 is exact in float32, so d2's bio score sits exactly on the cut.
    spec = SelectionSettings("threshold", SEED_DOMAINS, threshold=0.75)
    selected = run_selection(spec, SIMS, IDS, SOURCES, cuts=[1, 3])
    assert keys_by_id(selected) == {"d0": [1], "d2": [0, 1], "d3": [0]}
    assert label_rows(spec, selected) == TOP2_OR_OVER_075_ROWS


def test_threshold_as_typed_by_a_user_keeps_a_score_that_equals_it_in_float32():
    sims = np.array([[0.8], [0.7999]], dtype=np.float32)
    spec = SelectionSettings("threshold", ["a"], threshold=0.8)
    selected = run_selection(spec, sims, np.array(["x", "y"], dtype=object), np.array(["s", "s"], dtype=object))
    assert list(selected) == ["x"]


def test_threshold_above_every_score_selects_nothing():
    spec = SelectionSettings("threshold", SEED_DOMAINS, threshold=0.95)
    candidates = block_candidates(IDS, SOURCES, SIMS, spec)
    assert candidates.schema == CANDIDATE_SCHEMA
    assert candidates.num_rows == 0
    assert merge_candidates(candidates, spec) == {}


# --- blocks and merge -------------------------------------------------------------------------------


def reference_selection(spec: SelectionSettings, sims: np.ndarray, ids: np.ndarray) -> dict[str, list[int]]:
    """The rule computed directly on the whole matrix, written independently of the library."""
    if spec.rule == "per_seed_topn":
        scores = sims
    else:
        labels = np.asarray(spec.seed_domains)
        scores = np.stack([sims[:, labels == domain].max(axis=1) for domain in spec.domains], axis=1)
    chosen: dict[str, list[int]] = {}
    for key in range(scores.shape[1]):
        if spec.rule == "threshold":
            rows = np.flatnonzero(scores[:, key] >= spec.threshold)
        else:
            rows = np.argsort(-scores[:, key])[: spec.top_n]
        for row in rows:
            chosen.setdefault(str(ids[row]), []).append(key)
    return chosen


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rule", ["per_seed_topn", "global_topn", "threshold"])
def test_blocks_then_merge_equals_the_whole_matrix(rule, seed):
    rng = np.random.default_rng(seed)
    n_docs, n_seeds = 300, 6
    sims = rng.uniform(-1, 1, size=(n_docs, n_seeds)).astype(np.float32)
    # Ids in a shuffled order, so neither block order nor row order matches id order.
    ids = np.array([f"doc-{i:04d}" for i in rng.permutation(n_docs)], dtype=object)
    sources = np.array([f"s{i}" for i in range(n_docs)], dtype=object)
    spec = SelectionSettings(rule, ["a", "b", "a", "c", "b", "a"], top_n=int(rng.integers(1, 40)), threshold=0.6)
    cuts = sorted(rng.choice(np.arange(1, n_docs), size=int(rng.integers(2, 8)), replace=False).tolist())

    whole = run_selection(spec, sims, ids, sources)
    blocked = run_selection(spec, sims, ids, sources, cuts=cuts)

    assert blocked == whole
    assert keys_by_id(blocked) == keys_by_id({k: ("", v) for k, v in reference_selection(spec, sims, ids).items()})
    if rule != "threshold":
        per_key = np.bincount([key for _, keys in blocked.values() for key in keys])
        assert (per_key == spec.top_n).all()


def test_duplicate_across_blocks_takes_one_slot_and_keeps_the_lexically_first_source():
    spec = SelectionSettings("global_topn", ["a"], top_n=3)
    ids = np.array(["dup", "x1", "x2", "dup", "x3", "x4"], dtype=object)
    sources = np.array(["b.jsonl#4", "b.jsonl#5", "b.jsonl#6", "a.jsonl#9", "a.jsonl#1", "a.jsonl#2"], dtype=object)
    sims = np.array([[0.95], [0.90], [0.50], [0.95], [0.80], [0.40]], dtype=np.float32)

    selected = run_selection(spec, sims, ids, sources, cuts=[3])

    assert sorted(selected) == ["dup", "x1", "x3"]  # three distinct ids fill the three slots
    assert selected["dup"] == ("a.jsonl#9", [0])


def test_duplicate_within_one_block_takes_one_slot():
    # The same text twice in one block (two lines of one shard): one id, one slot, so the
    # next-best document still gets in.
    spec = SelectionSettings("global_topn", ["a"], top_n=2)
    ids = np.array(["dup", "dup", "other", "worst"], dtype=object)
    sources = np.array(["f.jsonl#2", "f.jsonl#1", "f.jsonl#3", "f.jsonl#4"], dtype=object)
    sims = np.array([[0.9], [0.9], [0.8], [0.1]], dtype=np.float32)

    selected = run_selection(spec, sims, ids, sources)

    assert sorted(selected) == ["dup", "other"]
    assert selected["dup"][0] == "f.jsonl#1"


def test_a_doc_selected_by_two_keys_is_one_entry_listing_both():
    spec = SelectionSettings("per_seed_topn", ["a", "b"], top_n=1)
    sims = np.array([[0.9, 0.9], [0.1, 0.2]], dtype=np.float32)
    selected = run_selection(spec, sims, np.array(["p", "q"], dtype=object), np.array(["s1", "s2"], dtype=object))
    assert selected == {"p": ("s1", [0, 1])}


# --- scores and labels ------------------------------------------------------------------------------


def test_domain_scores_are_the_best_seed_and_name_it():
    spec = SelectionSettings("global_topn", SEED_DOMAINS)
    scores, nearest = domain_scores(SIMS, spec)
    assert spec.domains == ["bio", "math"]
    assert scores.shape == nearest.shape == (5, 2)
    np.testing.assert_allclose(scores[:, 0], SIMS[:, 2])
    np.testing.assert_allclose(scores[:, 1], np.maximum(SIMS[:, 0], SIMS[:, 1]))
    assert nearest[:, 0].tolist() == [2, 2, 2, 2, 2]
    assert nearest[:, 1].tolist() == [0, 0, 1, 1, 0]  # d4 ties at 0.30: the first seed wins


def test_domain_members_follow_sorted_domains():
    spec = SelectionSettings("per_seed_topn", ["z", "a", "z", "m"])
    assert spec.domains == ["a", "m", "z"]
    assert [members.tolist() for members in spec.domain_members()] == [[1], [3], [0, 2]]


def test_label_selected_for_per_seed_keys_collapses_seeds_to_domains():
    spec = SelectionSettings("per_seed_topn", SEED_DOMAINS)
    chosen = np.array([[True, True, False], [False, False, True], [False, False, False]])
    table = label_selected(IDS[:3], SIMS[:3], spec, chosen)
    assert table.column_names == ["id", "domain", "score", "nearest_seed"]
    assert table.column("id").to_pylist() == ["d0", "d1"]
    assert table.column("domain").to_pylist() == ["math", "bio"]
    np.testing.assert_allclose(table.column("score").to_numpy(), [0.9, 0.2], rtol=1e-6)
    assert table.column("nearest_seed").to_pylist() == [0, 2]


def test_label_selected_with_nothing_chosen_is_empty():
    spec = SelectionSettings("global_topn", SEED_DOMAINS)
    table = label_selected(IDS, SIMS, spec, np.zeros((5, 2), dtype=bool))
    assert table.num_rows == 0


# --- spec errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["per_seed_topn", "global_topn"])
@pytest.mark.parametrize("top_n", [0, -3])
def test_top_n_below_one_names_top_n(rule, top_n):
    with pytest.raises(ConfigError) as excinfo:
        SelectionSettings(rule, ["a"], top_n=top_n)
    assert excinfo.value.field == "top_n"
    assert str(excinfo.value).startswith(f"top_n={top_n}")


@pytest.mark.parametrize("threshold", [1.01, -1.5, 7.0])
def test_threshold_outside_cosine_range_names_threshold(threshold):
    with pytest.raises(ConfigError) as excinfo:
        SelectionSettings("threshold", ["a"], threshold=threshold)
    assert excinfo.value.field == "threshold"
    assert "[-1, 1]" in str(excinfo.value)


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 1.0])
def test_threshold_bounds_are_accepted(threshold):
    assert SelectionSettings("threshold", ["a"], threshold=threshold).threshold == threshold


def test_no_seeds_names_seeds():
    with pytest.raises(ConfigError) as excinfo:
        SelectionSettings("per_seed_topn", [])
    assert excinfo.value.field == "seeds"
