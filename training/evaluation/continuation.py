"""A multiple-choice task built from held-out documents: which span continues this document?

Each question's context is a document's first `context_words` words; the correct choice is its next
`choice_words` words, and the distractors are the spans at the same word offset (the same relative
position) of other documents of the same topic, so topic words alone cannot give the answer away. Every
choice has the same number of words. With `spans` above one, a document asks up to that many questions,
one per consecutive span: the i-th asks for the span at word offset `context_words + i * choice_words`
with every word before it as context, so no two questions of a document share an answer; short held-out
documents thus give enough questions for a paired test. Choices are scored by the shared-prefix scorer of
`likelihood.py`, like MMLU (`question_hits`); a model's accuracy carries a Wilson interval (`stats.accuracy`),
and two models on the same questions are compared by McNemar's exact test (`stats.mcnemar_exact`).

A small model that sits at chance on MMLU is well above chance here (docs/replication.md, "A task metric
above chance"): the task measures how well a model predicts a domain's text, one decision per document.

Words are whitespace-separated tokens (`str.split`) joined by single spaces, so a document's line breaks
become spaces in its question. Nothing vanishes: a document that gives no question is counted under a
reason in `QuestionSet.skipped`.
"""

from __future__ import annotations

import logging
import numbers
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from core.errors import ConfigError, check_range, check_seed
from training.evaluation.evaluate import NORMS
from training.evaluation.likelihood import ChoiceScores, PackedItem, encode_item, score_items

logger = logging.getLogger(__name__)

CONTEXT_WORDS = 32
"""Words of a document that make a question's context."""
CHOICE_WORDS = 16
"""Words of every choice: the document's next span, and each distractor's span at the same offset."""
DISTRACTORS = 3
"""Wrong choices per question (3: four choices, chance is 25%)."""
NORM = "char"
"""How choices are compared: log-likelihood per character, the rule evaluate's MMLU report leads with (the
lm-evaluation-harness `acc_norm`). Distractors have as many words as the answer but not as many characters."""

TOO_SHORT = "too_short"
"""Fewer than context_words + choice_words words."""
DUPLICATE = "duplicate_id"
"""A document id seen before (ids are content hashes: the same text again)."""
NO_TOPIC = "no_topic"
"""An empty topic: no documents to draw same-topic distractors from."""
TOO_FEW_DISTRACTORS = "too_few_distractors"
"""Its topic has fewer than `distractors` other long-enough documents whose span differs from its own."""
SKIP_REASONS = (TOO_SHORT, DUPLICATE, NO_TOPIC, TOO_FEW_DISTRACTORS)


@dataclass(frozen=True)
class Document:
    """A held-out document: its id (content hash), its text and its topic label."""

    id: str
    text: str
    topic: str


@dataclass(frozen=True)
class ContinuationQuestion:
    """One question: a document's opening, and its next span among spans of other documents of its topic."""

    doc_id: str
    topic: str
    context: str
    choices: tuple[str, ...]
    """The spans, each with its leading space (the continuation of `context`)."""
    choice_ids: tuple[str, ...]
    """The document each choice was taken from; `choice_ids[answer] == doc_id`."""
    answer: int
    offset: int
    """Word offset of the answer's span in its document (every choice's, in its own document)."""

    @property
    def distractor_ids(self) -> tuple[str, ...]:
        """The documents the wrong choices came from, in choice order."""
        return tuple(doc for index, doc in enumerate(self.choice_ids) if index != self.answer)


@dataclass
class QuestionSet:
    """The questions built from a list of documents, and how many documents gave none, per reason."""

    questions: list[ContinuationQuestion]
    documents: int
    """Documents given: those that gave a question + sum(skipped.values())."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Documents that gave no question, per reason."""
    unasked_spans: int = 0
    """Later spans of documents that gave a question, left unasked: too few other documents of the topic
    reach that offset with a distinct span (only with `spans` above one)."""


def check_sizes(
    context_words: object, choice_words: object, distractors: object, seed: object, spans: object = 1
) -> None:
    """Refuse sizes that make no question, as ConfigErrors naming the argument."""
    for name, value in (("context_words", context_words), ("choice_words", choice_words),
                        ("distractors", distractors), ("spans", spans)):  # fmt: skip
        check_range(name, value, ge=1)
        if not isinstance(value, numbers.Integral):
            raise ConfigError(name, value, "must be a whole number")
    check_seed("seed", seed)


def build_questions(
    documents: Sequence[Document],
    context_words: int = CONTEXT_WORDS,
    choice_words: int = CHOICE_WORDS,
    distractors: int = DISTRACTORS,
    seed: int = 0,
    spans: int = 1,
) -> QuestionSet:
    """Up to `spans` questions per usable document, in the documents' order and then their spans'; the same
    documents and seed give the same questions. The correct choice's position is spread evenly over the
    choices (their counts differ by at most one), in a seeded order."""
    check_sizes(context_words, choice_words, distractors, seed, spans)
    rng = random.Random(seed)
    usable, skipped = _usable(documents, context_words + choice_words)
    offsets = {doc.id: _offsets(len(words), context_words, choice_words, spans) for doc, words in usable}
    pools: dict[tuple[str, int], list[tuple[str, str]]] = defaultdict(list)  # (topic, offset) -> (id, span)
    for doc, words in usable:
        for offset in offsets[doc.id]:
            pools[doc.topic, offset].append((doc.id, _span(words, offset, choice_words)))
    drafts, unasked = [], 0
    for doc, words in usable:
        asked = 0
        for offset in offsets[doc.id]:
            span = _span(words, offset, choice_words)
            drawn = _draw_distractors(rng, pools[doc.topic, offset], doc.id, span, distractors)
            if drawn is None:
                continue
            drafts.append((doc, " ".join(words[:offset]), (doc.id, span), drawn, offset))
            asked += 1
        if asked:
            unasked += len(offsets[doc.id]) - asked
        else:
            skipped[TOO_FEW_DISTRACTORS] += 1
    answers = [index % (distractors + 1) for index in range(len(drafts))]
    rng.shuffle(answers)
    questions = [_question(*draft, answer) for draft, answer in zip(drafts, answers, strict=True)]
    if skipped or unasked:
        logger.info("%d questions from %d documents; skipped %s, %d later spans unasked", len(questions),
                    len(documents), dict(skipped), unasked)  # fmt: skip
    kept = {reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]}
    return QuestionSet(questions, len(documents), kept, unasked)


def _offsets(words: int, context_words: int, choice_words: int, spans: int) -> list[int]:
    """Word offsets of a document's answer spans: after the context, consecutive, each whole, at most `spans`."""
    room = (words - context_words) // choice_words
    return [context_words + index * choice_words for index in range(min(spans, room))]


def _usable(documents: Sequence[Document], min_words: int) -> tuple[list[tuple[Document, list[str]]], Counter]:
    """The documents that can give a question, with their words; the others counted by reason."""
    skipped: Counter = Counter()
    seen: set[str] = set()
    usable = []
    for doc in documents:
        words = doc.text.split()
        if doc.id in seen:
            skipped[DUPLICATE] += 1
        elif not doc.topic:
            skipped[NO_TOPIC] += 1
        elif len(words) < min_words:
            skipped[TOO_SHORT] += 1
        else:
            usable.append((doc, words))
        seen.add(doc.id)
    return usable, skipped


def _span(words: list[str], start: int, length: int) -> str:
    return " " + " ".join(words[start : start + length])


def _draw_distractors(
    rng: random.Random, pool: list[tuple[str, str]], doc_id: str, span: str, count: int
) -> list[tuple[str, str]] | None:
    """`count` (id, span) pairs of other documents of the pool, with spans distinct from `span` and from
    each other, in a random order; None when the pool has too few."""
    # A few more draws than needed almost always suffice (the document itself, a repeated span); the full
    # shuffled pool is the fallback, so a draw is O(count), not O(pool), per question.
    for candidates in (
        rng.sample(range(len(pool)), min(len(pool), count + 2)),
        rng.sample(range(len(pool)), len(pool)),
    ):
        taken: list[tuple[str, str]] = []
        spans = {span}
        for index in candidates:
            other_id, other_span = pool[index]
            if other_id != doc_id and other_span not in spans:
                taken.append((other_id, other_span))
                spans.add(other_span)
            if len(taken) == count:
                return taken
    return None


def _question(
    doc: Document,
    context: str,
    correct: tuple[str, str],
    drawn: list[tuple[str, str]],
    offset: int,
    answer: int,
) -> ContinuationQuestion:
    ordered = [*drawn[:answer], correct, *drawn[answer:]]
    return ContinuationQuestion(
        doc_id=doc.id,
        topic=doc.topic,
        context=context,
        choices=tuple(span for _, span in ordered),
        choice_ids=tuple(other for other, _ in ordered),
        answer=answer,
        offset=offset,
    )


def encode_questions(tokenizer, questions: Sequence[ContinuationQuestion], max_length: int = 2048) -> list[PackedItem]:
    """Each question's context and choices as the shared-prefix scorer takes them (`encode_item`)."""
    return [encode_item(tokenizer, q.context, q.choices, max_length) for q in questions]


def score_questions(
    model,
    tokenizer,
    questions: Sequence[ContinuationQuestion],
    max_length: int = 2048,
    max_batch_tokens: int = 4096,
    label: str = "continuation",
) -> ChoiceScores:
    """Every choice's summed log-likelihood, tokens and characters, as evaluate keeps them for MMLU."""
    items = encode_questions(tokenizer, questions, max_length)
    logprob = score_items(model, items, tokenizer.pad_token_id, max_batch_tokens, label=label)
    n_tokens = np.array([[len(ids) for ids in item.choices] for item in items]).reshape(len(items), -1)
    n_chars = np.array([[len(text) for text in q.choices] for q in questions]).reshape(len(items), -1)
    return ChoiceScores(logprob, n_tokens, n_chars)


def question_hits(scores: ChoiceScores, questions: Sequence[ContinuationQuestion], norm: str = NORM) -> np.ndarray:
    """(questions,) bool: whether the model's choice under `norm` (sum, char or token) is the answer; the
    accuracy and its interval are `stats.accuracy` of it, two models' comparison `stats.mcnemar_exact`."""
    if norm not in NORMS:
        raise ConfigError("norm", norm, f"use one of {', '.join(NORMS)}")
    answers = np.array([q.answer for q in questions], dtype=int)
    return scores.predictions(norm) == answers
