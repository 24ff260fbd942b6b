"""The evaluate stage's continuation task: questions from the perplexity documents, per-question correctness."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import models
from core.errors import ConfigError
from core.reader import doc_id
from training.evaluation import continuation, stats
from training.evaluation.evaluate import (
    EvaluateConfig,
    build_tasks,
    continuation_rows,
    evaluate_model,
    plan,
    question_rows,
    summarise,
)
from training.evaluation.report import write_outputs


def write_documents(path, per_topic: int = 6) -> list[dict]:
    """Documents of two topics: 60 words each, plus one of 20 words (too short to give a question)."""
    rows = []
    for index in range(2 * per_topic):
        rng = np.random.default_rng(index)
        text = " ".join(f"w{i}" for i in rng.integers(0, 200, 60))
        rows.append({"text": text, "meta": {"topic": "alpha" if index % 2 else "beta"}})
    rows.append({"text": " ".join(f"w{i}" for i in range(20)), "meta": {"topic": "alpha"}})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def test_config_needs_documents_and_keeps_its_key_without_the_task(tmp_path):
    with pytest.raises(ConfigError, match="continuation"):
        EvaluateConfig(models=["m"], mmlu=["all"], out="o", continuation=True)
    with pytest.raises(ConfigError, match="continuation_choice_words"):
        EvaluateConfig(models=["m"], ppl=["d"], out="o", continuation=True, continuation_choice_words=0)
    plain = EvaluateConfig(models=["m"], ppl=["d"], out="o")
    assert not any(key.startswith("continuation") for key in plain.content())
    with_task = EvaluateConfig(models=["m"], ppl=["d"], out="o", continuation=True)
    other_seed = EvaluateConfig(models=["m"], ppl=["d"], out="o", continuation=True, continuation_seed=1)
    more_spans = EvaluateConfig(models=["m"], ppl=["d"], out="o", continuation=True, continuation_spans=4)
    assert len({plain.digest(), with_task.digest(), other_seed.digest(), more_spans.digest()}) == 4
    spans_unused = EvaluateConfig(models=["m"], ppl=["d"], out="o", continuation_spans=4)
    assert spans_unused.digest() == plain.digest()
    with pytest.raises(ConfigError, match="continuation_spans"):
        EvaluateConfig(models=["m"], ppl=["d"], out="o", continuation=True, continuation_spans=0)


def test_spans_ask_several_questions_of_each_document_and_the_plan_keeps_their_offsets(tmp_path, tiny_model_dir):
    rows = write_documents(tmp_path / "docs.jsonl")
    config = EvaluateConfig(models=[f"m={tiny_model_dir}"], ppl=[str(tmp_path / "docs.jsonl")], ppl_name="held",
                            out=str(tmp_path / "eval"), continuation=True, continuation_choice_words=8,
                            continuation_spans=5)  # fmt: skip
    built = plan(config).continuation["held"]
    # 60 words: spans at 32, 40 and 48 (the next would end past the document); the short one asks nothing.
    assert len(built.questions) == 36 and built.skipped == {continuation.TOO_SHORT: 1}
    assert [(q.doc_id, q.offset) for q in built.questions] == [
        (doc_id(row["text"]), offset) for row in rows[:12] for offset in (32, 40, 48)
    ]


@pytest.mark.timeout(300)
def test_the_stage_writes_each_questions_correctness_by_document_id(tmp_path, tiny_model_dir, one_torch_thread):
    rows = write_documents(tmp_path / "docs.jsonl")
    labelled = [f"base={tiny_model_dir}", f"same={tiny_model_dir}"]
    config = EvaluateConfig(models=labelled, ppl=[str(tmp_path / "docs.jsonl")], ppl_name="held",
                            out=str(tmp_path / "eval"), window=64, stride=32, continuation=True, threads=1)  # fmt: skip
    checked = plan(config)
    built = checked.continuation["held"]
    # 13 documents: the short one gives no question; each topic's 6 long ones have 5 others to draw 3 from.
    assert (built.documents, len(built.questions), built.skipped) == (13, 12, {continuation.TOO_SHORT: 1})
    outputs = [evaluate_model(task) for task in build_tasks(checked)]
    results = summarise(checked, outputs)
    entry = results["continuation"]["held"]
    assert entry["questions"] == 12 and entry["documents"] == 13 and entry["skipped"] == {"too_short": 1}
    assert entry["doc_ids"] == [doc_id(row["text"]) for row in rows[:12]]
    assert entry["settings"] == {"context_words": 32, "choice_words": 16, "distractors": 3, "seed": 0, "spans": 1,
                                 "norm": "char"}  # fmt: skip
    assert entry["offsets"] == [32] * 12 and entry["unasked_spans"] == 0
    # The correctness is the model's choice per character against the answer, as continuation.py scores it.
    tokenizer, model = models.load_tokenizer(tiny_model_dir), models.load_model(tiny_model_dir)
    expected = continuation.question_hits(
        continuation.score_questions(model, tokenizer, built.questions), built.questions
    )
    for label in ("base", "same"):
        correct = entry["results"][label]["correct"]
        assert correct == [int(v) for v in expected]
        assert entry["results"][label]["accuracy"]["char"] == stats.accuracy(expected).to_dict()
    assert entry["comparisons"][0] | {"p_value": 1.0} == {"model": "same", "reference": "base", "norm": "char",
                                                          "only_a": 0, "only_b": 0, "difference": 0.0,
                                                          "p_value": 1.0, "significant": False}  # fmt: skip
    write_outputs(config.out, results, question_rows(checked, outputs), None, continuation_rows(checked, outputs))
    lines = [json.loads(line) for line in (tmp_path / "eval" / "continuation.jsonl").read_text().splitlines()]
    assert [line["doc_id"] for line in lines] == entry["doc_ids"]
    assert all(line["choice_ids"][line["answer"]] == line["doc_id"] and len(line["base"]) == 4 for line in lines)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "### held: 12 questions from 13 documents" in report and "| same |" in report
