"""The shipped seeds are written for FineScope, not copied from the packaged corpus: a seed that repeats a
corpus sentence makes its source document the obvious nearest neighbour, and the curation benches
(bench/curation_quality.py) would then measure a lookup instead of a retrieval."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO

from curation.demo_corpus import load_summaries

SEED_FILES = sorted((REPO / "jobs" / "seeds").glob("*.jsonl"))
N = 8


def ngrams(text: str, n: int = N) -> set[tuple[str, ...]]:
    """The n-grams of a text's lowercased word tokens."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@pytest.fixture(scope="module")
def corpus_ngrams() -> dict[tuple[str, ...], str]:
    """Every 8-gram of the packaged corpus, with the title of a document that holds it."""
    found: dict[tuple[str, ...], str] = {}
    for row in load_summaries():
        for gram in ngrams(row["text"]):
            found.setdefault(gram, row["meta"]["title"])
    return found


def test_the_ngrams_are_of_lowercased_words():
    assert ngrams("A b, C d e f g H; i", 8) == {tuple("abcdefgh"), tuple("bcdefghi")}
    assert ngrams("too short", 8) == set()


def test_the_shipped_seed_files_are_found():
    assert {path.name for path in SEED_FILES} >= {"demo.jsonl", "wikipedia-topics.jsonl"}


@pytest.mark.parametrize("path", SEED_FILES, ids=[path.name for path in SEED_FILES])
def test_no_shipped_seed_shares_an_8_gram_with_the_packaged_corpus(path, corpus_ngrams):
    shared = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        text = json.loads(line)["text"]
        for gram in sorted(ngrams(text) & corpus_ngrams.keys())[:1]:
            shared.append(f"{path.name}:{line_no}: '{' '.join(gram)}' is in '{corpus_ngrams[gram]}': {text}")
    assert shared == [], "rewrite these seeds in other words:\n" + "\n".join(shared)
