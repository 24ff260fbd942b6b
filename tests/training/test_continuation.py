"""The continuation task: questions from held-out documents, their scoring, and the paired test between models."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter

import numpy as np
import pytest

from core import models
from core.errors import ConfigError
from training.evaluation import stats
from training.evaluation.continuation import (
    DUPLICATE,
    NO_TOPIC,
    TOO_FEW_DISTRACTORS,
    TOO_SHORT,
    Document,
    build_questions,
    encode_questions,
    question_hits,
    score_questions,
)
from training.evaluation.likelihood import score_naive


def words_doc(index: int, topic: str, length: int, vocabulary: int = 200) -> Document:
    """A document of `length` words w0..w199, different for every index, with a unique id."""
    rng = np.random.default_rng(index)
    text = " ".join(f"w{i}" for i in rng.integers(0, vocabulary, length))
    return Document(f"doc{index:04d}", text, topic)


def corpus(per_topic: int = 40, length: int = 12) -> list[Document]:
    topics = ["alpha", "beta", "gamma"]
    return [words_doc(i, topics[i % 3], length) for i in range(per_topic * 3)]


def test_every_document_gives_a_question_or_is_counted_under_its_reason():
    docs = corpus(per_topic=10)
    docs += [words_doc(900, "alpha", 5), words_doc(901, "beta", 7)]  # shorter than 4 + 4 words
    docs += [docs[0], Document("doc0950", "w1 " * 20, "")]  # the same id again; no topic
    docs += [words_doc(960, "lonely", 12), words_doc(961, "lonely", 12)]  # only one other document of its topic
    built = build_questions(docs, context_words=4, choice_words=4, distractors=3, seed=0)
    assert built.documents == len(docs) == 36
    assert built.skipped == {TOO_SHORT: 2, DUPLICATE: 1, NO_TOPIC: 1, TOO_FEW_DISTRACTORS: 2}
    assert len(built.questions) == 30
    assert [q.doc_id for q in built.questions] == [d.id for d in docs[:30]]  # in the documents' order


def test_a_question_is_the_documents_opening_then_its_next_span_among_same_topic_spans_at_the_same_offset():
    docs = corpus()
    by_id = {doc.id: doc for doc in docs}
    built = build_questions(docs, context_words=5, choice_words=3, distractors=3, seed=1)
    assert len(built.questions) == len(docs)
    for q in built.questions:
        words = by_id[q.doc_id].text.split()
        assert q.context == " ".join(words[:5])
        assert len(q.choices) == 4 and q.choice_ids[q.answer] == q.doc_id
        assert q.choices[q.answer] == " " + " ".join(words[5:8])
        assert len(q.distractor_ids) == 3 and q.doc_id not in q.distractor_ids
        assert len(set(q.choice_ids)) == 4 and len(set(q.choices)) == 4
        for source, choice in zip(q.choice_ids, q.choices, strict=True):
            assert by_id[source].topic == q.topic  # distractors share the document's topic
            assert choice == " " + " ".join(by_id[source].text.split()[5:8])  # at the same word offset


def test_a_distractor_whose_span_equals_the_answers_is_never_drawn():
    shared = " ".join(f"w{i}" for i in range(10))
    twins = [Document(f"twin{i}", f"w{100 + i} w{110 + i} {shared}", "alpha") for i in range(3)]
    others = [words_doc(i, "alpha", 12) for i in range(3)]
    built = build_questions(twins + others, context_words=2, choice_words=4, distractors=3, seed=0)
    twin_questions = [q for q in built.questions if q.doc_id.startswith("twin")]
    assert len(twin_questions) == 3
    for q in twin_questions:  # the other twins carry the same span: only the three others can be its distractors
        assert set(q.distractor_ids) == {"doc0000", "doc0001", "doc0002"}


def test_the_same_documents_and_seed_give_the_same_questions_and_another_seed_others():
    docs = corpus()
    first = build_questions(docs, context_words=4, choice_words=4, seed=7)
    again = build_questions(list(docs), context_words=4, choice_words=4, seed=7)
    other = build_questions(docs, context_words=4, choice_words=4, seed=8)
    assert first.questions == again.questions
    assert [q.choice_ids for q in first.questions] != [q.choice_ids for q in other.questions]
    assert [q.doc_id for q in first.questions] == [q.doc_id for q in other.questions]


def test_the_answers_position_is_spread_evenly_over_the_choices_in_a_seeded_order():
    built = build_questions(corpus(per_topic=34), context_words=4, choice_words=4, seed=3)  # 102 questions
    answers = [q.answer for q in built.questions]
    counts = Counter(answers)
    assert sorted(counts) == [0, 1, 2, 3] and max(counts.values()) - min(counts.values()) <= 1
    assert answers != sorted(answers) and answers[:8] != [0, 1, 2, 3, 0, 1, 2, 3]


def test_with_spans_a_document_asks_for_each_consecutive_span_after_everything_before_it():
    docs = [words_doc(i, "alpha", 4 + 3 * (i % 4)) for i in range(12)]  # 4, 7, 10, 13 words: 0 to 3 spans
    by_id = {doc.id: doc for doc in docs}
    built = build_questions(docs, context_words=4, choice_words=3, distractors=2, seed=0, spans=3)
    assert built.skipped == {TOO_SHORT: 3} and built.unasked_spans == 0
    assert Counter(q.doc_id for q in built.questions) == {d.id: (4 + 3 * (i % 4) - 4) // 3 for i, d in enumerate(docs)
                                                          if i % 4}  # fmt: skip
    assert len(built.questions) == 3 * (1 + 2 + 3)
    for q in built.questions:
        words = by_id[q.doc_id].text.split()
        assert q.offset in (4, 7, 10) and q.context == " ".join(words[: q.offset])
        assert q.choices[q.answer] == " " + " ".join(words[q.offset : q.offset + 3])
        for source, choice in zip(q.choice_ids, q.choices, strict=True):
            assert choice == " " + " ".join(by_id[source].text.split()[q.offset : q.offset + 3])
    # A document's questions come in its spans' order, and no two of them share an answer.
    first = [(q.doc_id, q.offset) for q in built.questions]
    assert first == sorted(first, key=lambda key: (key[0], key[1])) and len(set(first)) == len(first)
    capped = build_questions(docs, context_words=4, choice_words=3, distractors=2, seed=0, spans=2)
    assert len(capped.questions) == 3 * (1 + 2 + 2) and max(q.offset for q in capped.questions) == 7


def test_a_later_span_too_few_documents_reach_is_counted_unasked_not_dropped_silently():
    docs = [words_doc(i, "alpha", 8) for i in range(4)] + [words_doc(9, "alpha", 11)]  # only one reaches 8..10
    built = build_questions(docs, context_words=5, choice_words=3, distractors=3, seed=0, spans=2)
    assert len(built.questions) == 5 and {q.offset for q in built.questions} == {5}
    assert built.unasked_spans == 1 and built.skipped == {}


def test_one_span_asks_what_the_task_always_asked():
    docs = corpus(per_topic=10, length=20)
    one = build_questions(docs, context_words=4, choice_words=4, seed=5)
    assert one.questions == build_questions(docs, context_words=4, choice_words=4, seed=5, spans=1).questions
    assert {q.offset for q in one.questions} == {4} and len(one.questions) == len(docs)
    assert len(build_questions(docs, context_words=4, choice_words=4, seed=5, spans=4).questions) == 4 * len(docs)


@pytest.mark.parametrize(
    ("name", "value"),
    [("context_words", 0), ("choice_words", -1), ("distractors", 0), ("context_words", 2.5),
     ("choice_words", math.nan), ("distractors", math.inf), ("seed", -1), ("seed", 1.0), ("spans", 0),
     ("spans", 1.5)],
)  # fmt: skip
def test_sizes_that_make_no_question_are_refused_naming_the_argument(name, value):
    with pytest.raises(ConfigError) as error:
        build_questions(corpus(), **{name: value})
    assert error.value.field == name


# --- scoring ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_tokenizer(tiny_model_dir), models.load_model(tiny_model_dir)


def test_scores_equal_one_plain_forward_per_choice_and_the_choice_is_the_best_per_character(tiny, one_torch_thread):
    tokenizer, model = tiny
    questions = build_questions(corpus(per_topic=4, length=14), context_words=6, choice_words=5, seed=0).questions[:6]
    scores = score_questions(model, tokenizer, questions, max_batch_tokens=64)
    naive = score_naive(model, encode_questions(tokenizer, questions))
    np.testing.assert_allclose(scores.logprob, naive, atol=1e-4)
    assert (scores.n_tokens == 5).all()  # a word-level tokenizer: one token per word
    assert scores.n_chars.tolist() == [[len(choice) for choice in q.choices] for q in questions]
    expected = [int(np.argmax(naive[i] / scores.n_chars[i])) == q.answer for i, q in enumerate(questions)]
    assert question_hits(scores, questions).tolist() == expected
    by_sum = [int(np.argmax(naive[i])) == q.answer for i, q in enumerate(questions)]
    assert question_hits(scores, questions, "sum").tolist() == by_sum
    with pytest.raises(ConfigError, match="norm"):
        question_hits(scores, questions, "mean")


def test_mcnemar_on_two_models_hits_counts_only_the_questions_they_disagree_on():
    # 8 right for A only, 2 for B only, 30 for both, 10 for neither: p = 2 * P(X <= 2), X ~ Binomial(10, 1/2).
    a = np.array([True] * 8 + [False] * 2 + [True] * 30 + [False] * 10)
    b = np.array([False] * 8 + [True] * 2 + [True] * 30 + [False] * 10)
    test = stats.mcnemar_exact(a, b)
    assert (test["only_a"], test["only_b"]) == (8, 2)
    assert test["p_value"] == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert test["difference"] == pytest.approx(0.12)
    assert stats.accuracy(a).correct == 38 and stats.accuracy(a).ci_low < 38 / 50 < stats.accuracy(a).ci_high


@pytest.mark.timeout(300)
def test_the_bench_scores_every_domain_on_its_questions_quick(tmp_path, monkeypatch, one_torch_thread):
    from bench import continuation_choice

    out = tmp_path / "figures.json"
    argv = ["continuation_choice", "--quick", "--questions", "12", "--threads", "1", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    continuation_choice.main()
    figures = json.loads(out.read_text())["results"]
    assert sorted(figures["domains"]) == ["biology", "history", "mathematics"] and figures["chance"] == 0.25
    for entry in figures["domains"].values():
        assert entry["questions"] == 12 and entry["documents"] == entry["usable_questions"] + sum(
            entry["skipped"].values()
        )
        assert set(entry["skipped"]) <= {TOO_SHORT}
        assert sorted(entry["accuracy"]) == ["char", "sum", "token"] and entry["accuracy"]["char"]["total"] == 12
