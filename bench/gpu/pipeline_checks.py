"""Pipeline mode's agreement checks: the GPU pipeline's outputs against CPU fp32 runs of the same work.

`python -m bench.gpu.check --mode pipeline` runs the pipeline with every GPU path on, then the CPU references
(`reference_configs`: the same stages, the same inputs, in fp32 on the CPU, on slices where a slice
is enough) in a child process that sees no GPU, and compares what the two wrote with the pure functions
below. Each comparison returns an `Agreement`; the thresholds are in `THRESHOLDS`.

| stage | compared | agreement asked for |
|---|---|---|
| curation | `scored/` `seed_sims` per document (CUDA run against CPU run) | cosine >= 0.99 on every document |
| | document vectors of a sample, `DocumentEncoder` on CUDA and on the CPU | cosine >= 0.99 on every document |
| | `curated/` ids | overlap >= 95% |
| teacher | greedy text, GPU teacher (vLLM, or fp32 transformers) against CPU fp32, same prompts | identical on >= 90% |
| fine-tuning | per-step loss, ZeRO-3 bf16 on CUDA against ZeRO-2 fp32 on the CPU | mean rel. gap <= 3%, max <= 10% |
| MMLU | predicted answer per question and model, bf16 on CUDA against fp32 on the CPU | identical on >= 98% |

Loss tolerance: bf16 keeps 8 bits of mantissa (a relative rounding of 2^-9 per value), so one bf16
forward of a small model moves its loss by about 0.1-1%; over the first steps the two runs' weights
then drift apart by their different gradients (ZeRO-3 also keeps its parameters and gradients in
bf16, where core mode's autocast check kept fp32 weights and held 2%). A mean of 3% and a worst
step of 10% leave room for that and still catch what a broken path does (a wrong scale, a lost
gradient, a different batch order move the loss by tens of percent within a few steps).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.measure import flops_per_token, mfu

THRESHOLDS = {
    "document cosine": 0.99,
    "curated overlap": 0.95,
    "identical generations": 0.90,
    "loss mean relative gap": 0.03,
    "loss max relative gap": 0.10,
    "identical predictions": 0.98,
}


@dataclass
class Agreement:
    name: str
    figures: dict[str, Any]
    passed: bool
    detail: str = ""
    examples: list[dict[str, Any]] = field(default_factory=list)
    """Rows that disagree (the first few), for the JSON output."""


# --- pure comparisons ------------------------------------------------------------------------------


def _cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (rows, dim) arrays; a zero row against a zero row counts as 1."""
    reference, candidate = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    dots = (reference * candidate).sum(axis=1)
    both_zero = (np.linalg.norm(reference, axis=1) == 0) & (np.linalg.norm(candidate, axis=1) == 0)
    return np.where(both_zero, 1.0, dots / np.maximum(norms, 1e-30))


def compare_vectors(
    name: str, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], min_cosine: float = 0.99
) -> Agreement:
    """Per-key cosine of two sets of per-document vectors (seed similarities, or SAE-space vectors).

    Every reference document must be in the candidate and reach `min_cosine`."""
    shared = sorted(set(reference) & set(candidate))
    missing = len(set(reference) ^ set(candidate))
    figures: dict[str, Any] = {"documents": len(shared), "missing on one side": missing}
    if not shared:
        return Agreement(name, figures, False, "no document on both sides")
    cosines = _cosines(np.stack([reference[k] for k in shared]), np.stack([candidate[k] for k in shared]))
    gaps = [float(np.abs(np.asarray(reference[k]) - np.asarray(candidate[k])).max()) for k in shared]
    below = [k for k, c in zip(shared, cosines, strict=True) if c < min_cosine]
    figures |= {
        "min document cosine": float(cosines.min()),
        "mean document cosine": float(cosines.mean()),
        "documents below threshold": len(below),
        "largest absolute difference": max(gaps),
        "threshold": min_cosine,
    }
    examples = [{"id": k, "cosine": float(cosines[shared.index(k)])} for k in below[:10]]
    passed = missing == 0 and not below
    detail = f"{len(below)} documents below cosine {min_cosine}" if below else ""
    return Agreement(name, figures, passed, detail, examples)


def compare_scores(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Agreement:
    """`seed_sims` per document (the scored/ Parquet of each curation run)."""
    return compare_vectors("curation: seed similarities", reference, candidate, THRESHOLDS["document cosine"])


def compare_selection(reference: set[str], candidate: set[str], min_overlap: float | None = None) -> Agreement:
    """Curated ids: shared ids over the larger set, so that a candidate selecting more is not a pass."""
    min_overlap = THRESHOLDS["curated overlap"] if min_overlap is None else min_overlap
    shared = len(reference & candidate)
    overlap = shared / max(len(reference), len(candidate), 1)
    figures = {
        "reference ids": len(reference),
        "candidate ids": len(candidate),
        "shared ids": shared,
        "overlap": overlap,
        "threshold": min_overlap,
    }
    passed = bool(reference) and overlap >= min_overlap
    return Agreement("curation: curated ids", figures, passed, "" if passed else f"overlap {overlap:.3f}")


def first_difference(reference: list[int], candidate: list[int]) -> int | None:
    """Index of the first token where two sequences differ (the shorter one's length if one is a prefix
    of the other); None when they are identical."""
    for position, (a, b) in enumerate(zip(reference, candidate, strict=False)):
        if a != b:
            return position
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))


def compare_generations(
    reference: dict[str, list[int]],
    candidate: dict[str, list[int]],
    min_identical: float | None = None,
    name: str = "teacher: vllm on the GPU vs transformers on the CPU",
) -> Agreement:
    """Greedy generations (token ids) per row id: the share identical; for the rest, where they part.

    Every reference row counts: a row the candidate lacks is a differing row."""
    min_identical = THRESHOLDS["identical generations"] if min_identical is None else min_identical
    rows = sorted(reference)
    differing = []
    for row in rows:
        if row not in candidate:
            differing.append({"id": row, "first differing token": None, "missing": True})
            continue
        position = first_difference(reference[row], candidate[row])
        if position is not None:
            differing.append({"id": row, "first differing token": position, "reference tokens": len(reference[row]),
                              "candidate tokens": len(candidate[row])})  # fmt: skip
    identical = len(rows) - len(differing)
    share = identical / len(rows) if rows else 0.0
    positions = [d["first differing token"] for d in differing if d["first differing token"] is not None]
    figures = {
        "rows": len(rows),
        "identical rows": identical,
        "identical share": share,
        "differing rows": len(differing),
        "missing rows": sum(1 for d in differing if d.get("missing")),
        "earliest first differing token": min(positions) if positions else None,
        "median first differing token": float(np.median(positions)) if positions else None,
        "threshold": min_identical,
    }
    detail = ", ".join(f"{d['id']}@{d['first differing token']}" for d in differing[:10])
    detail = f"differing rows (id@first differing token): {detail}" if differing else ""
    return Agreement(name, figures, bool(rows) and share >= min_identical, detail, differing)


def compare_loss_curves(
    reference: list[float],
    candidate: list[float],
    mean_tol: float | None = None,
    max_tol: float | None = None,
    reference_lr: list[float] | None = None,
    candidate_lr: list[float] | None = None,
) -> Agreement:
    """Per-step loss over the steps both curves have: mean and largest |candidate - reference| / |reference|.

    With learning rates given, the curves are comparable only where the schedules agree: a step whose
    learning rates differ (relative 1e-6) fails the check, since then the runs are not doing the same work."""
    mean_tol = THRESHOLDS["loss mean relative gap"] if mean_tol is None else mean_tol
    max_tol = THRESHOLDS["loss max relative gap"] if max_tol is None else max_tol
    steps = min(len(reference), len(candidate))
    figures: dict[str, Any] = {"steps": steps, "mean tolerance": mean_tol, "max tolerance": max_tol}
    if steps == 0:
        return Agreement("fine-tuning: loss curve", figures, False, "no step on both sides")
    ref, cand = np.asarray(reference[:steps], dtype=np.float64), np.asarray(candidate[:steps], dtype=np.float64)
    gaps = np.abs(cand - ref) / np.maximum(np.abs(ref), 1e-12)
    finite = bool(np.isfinite(cand).all() and np.isfinite(ref).all())
    figures |= {"mean relative gap": float(gaps.mean()), "max relative gap": float(gaps.max()),
                "worst step": int(gaps.argmax()) + 1}  # fmt: skip
    lr_ok = True
    if reference_lr is not None and candidate_lr is not None:
        ref_lr, cand_lr = np.asarray(reference_lr[:steps]), np.asarray(candidate_lr[:steps])
        lr_gap = float((np.abs(ref_lr - cand_lr) / np.maximum(np.abs(ref_lr), 1e-30)).max())
        figures["largest learning-rate relative difference"] = lr_gap
        lr_ok = lr_gap <= 1e-6
    passed = finite and lr_ok and figures["mean relative gap"] <= mean_tol and figures["max relative gap"] <= max_tol
    detail = "" if lr_ok else "learning-rate schedules differ: the curves are not comparable"
    examples = [
        {"step": step + 1, "reference": float(ref[step]), "candidate": float(cand[step])} for step in range(steps)
    ]
    return Agreement("fine-tuning: loss curve", figures, passed, detail, examples)


def compare_predictions(
    name: str, reference: dict[str, int], candidate: dict[str, int], min_identical: float | None = None
) -> Agreement:
    """Predicted answers per question id; a question the candidate lacks counts as differing."""
    min_identical = THRESHOLDS["identical predictions"] if min_identical is None else min_identical
    questions = sorted(reference)
    differing = [q for q in questions if candidate.get(q) != reference[q]]
    share = (len(questions) - len(differing)) / len(questions) if questions else 0.0
    figures = {"questions": len(questions), "identical share": share, "differing": len(differing),
               "threshold": min_identical}  # fmt: skip
    examples = [{"id": q, "reference": reference[q], "candidate": candidate.get(q)} for q in differing[:20]]
    return Agreement(name, figures, bool(questions) and share >= min_identical, "", examples)


# --- reading what the stages wrote ------------------------------------------------------------------


def read_scores(scored_dir: str) -> dict[str, np.ndarray]:
    """`seed_sims` per document of a curation's scored/ Parquet, keyed by `id` (and `source` when an id
    comes from two sources)."""
    from core import storage

    table = storage.read_parquet(scored_dir, columns=["id", "source", "seed_sims"])
    ids, sources = table.column("id").to_pylist(), table.column("source").to_pylist()
    sims = table.column("seed_sims").to_pylist()
    return {
        f"{doc_id}|{source}": np.asarray(row, dtype=np.float32)
        for doc_id, source, row in zip(ids, sources, sims, strict=True)
    }


def read_curated_ids(curated_dir: str) -> set[str]:
    from core import storage

    return set(storage.read_parquet(curated_dir, columns=["id"]).column("id").to_pylist())


def read_generations(distilled_dir: str, tokenizer) -> dict[str, list[int]]:
    """The teacher's text per row id of a distill output's distilled/, as token ids."""
    from core import storage

    table = storage.read_parquet(distilled_dir, columns=["id", "teacher"])
    texts = table.column("teacher").to_pylist()
    ids = tokenizer([text or "" for text in texts], add_special_tokens=False)["input_ids"] if texts else []
    return dict(zip(table.column("id").to_pylist(), ids, strict=True))


def read_metrics(metrics_path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows, in step order."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    return sorted((row for row in rows if "loss" in row), key=lambda row: row["step"])


def read_predictions(questions_path: str | Path) -> dict[str, dict[str, int]]:
    """Per `LABEL/K-shot` column of an evaluation's questions.jsonl, the predicted choice per question id
    (the largest summed log-likelihood)."""
    by_column: dict[str, dict[str, int]] = {}
    for line in Path(questions_path).read_text().splitlines():
        row = json.loads(line)
        for column, scores in row.items():
            if column.endswith("-shot"):
                by_column.setdefault(column, {})[str(row["id"])] = int(np.argmax(scores))
    return by_column


# --- the CPU references -------------------------------------------------------------------------------


def reference_configs(steps: list, root: str, rows: int, finetune_steps: int) -> dict[str, Any]:
    """The CPU fp32 runs that the GPU pipeline's outputs are held against, built from its own steps'
    configs (the same inputs and settings) with only the device, the precision and the size changed:

    - curate: the same corpus, seeds and SAE (the one the GPU run trained), encoded on the CPU;
    - distill: the first `rows` input rows, through the transformers backend in fp32 on the CPU;
    - finetune: the same pruned model and distilled set, ZeRO-2 in fp32 on the CPU, one worker taking as
      many rows per step as the GPU run's workers together, the first `finetune_steps` steps (with the
      GPU run's warm-up, so the learning rates match while warming up);
    - evaluate: the same models and MMLU sample, fp32 on the CPU, without perplexity.
    """
    gpu = _step_configs(steps)
    ref = f"{root.rstrip('/')}/cpu-reference"
    curate, distill, finetune, evaluate = (gpu[stage] for stage in ("curate", "distill", "finetune", "evaluate"))
    return {
        "curate": dataclasses.replace(curate, out=f"{ref}/curate", gpus=0.0),
        "distill": dataclasses.replace(
            distill, out=f"{ref}/distill", backend="transformers", dtype="float32", gpus=0.0,
            engine_kwargs={}, limit=rows,
        ),
        "finetune": dataclasses.replace(
            finetune, out=f"{ref}/finetune", gpus=0, zero_stage=2, actors=1,
            grad_accum=finetune.grad_accum * finetune.actors,  # the same rows per step on one worker
            max_steps=min(finetune_steps, finetune.max_steps or finetune_steps), checkpoint_every=finetune_steps,
            checkpoints=None,
        ),
        "evaluate": dataclasses.replace(
            evaluate, out=f"{ref}/evaluate", dtype="float32", gpus=0.0, ppl=[], ppl_name=None,
        ),
    }  # fmt: skip


def run_references(configs: dict[str, Any]) -> None:
    """Run the reference stages in order (each skips when its output is up to date)."""
    from curation.selection.curate import run_curation
    from training.distillation.distill import run_distill
    from training.evaluation.evaluate import run_evaluation
    from training.finetuning.finetune import run_finetune

    for stage, run in (("curate", run_curation), ("distill", run_distill), ("finetune", run_finetune),
                       ("evaluate", run_evaluation)):  # fmt: skip
        run(configs[stage])


# --- throughput and MFU ----------------------------------------------------------------------------


def encode_sample(model: str, sae_dir: str, texts: list[str], config, device: str, dtype=None):
    """(docs, latents) document vectors of `texts`, encoded as the curate stage encodes them, on `device`
    (weights cast to `dtype` when given)."""
    from core.batching import tokenize_texts
    from curation.encode import DocumentEncoder, EncoderSettings
    from curation.sae.model import TopKSAE

    sae = TopKSAE.load(sae_dir)
    spec = EncoderSettings(model=model, sae_dir=None, layer=sae.cfg.layer, skip_positions=sae.cfg.skip_positions,
                       pooling=config.pooling, max_batch_tokens=config.max_batch_tokens, device=device)  # fmt: skip
    encoder = DocumentEncoder(spec, sae=sae)
    if dtype is not None:
        encoder.forward.to(dtype)
    return encoder.encode(tokenize_texts(encoder.tokenizer, texts, config.max_tokens)).numpy()


# --- the pipeline's outputs against the references ---------------------------------------------------


def _step_configs(steps: list) -> dict[str, Any]:
    """The GPU run's stage configs by stage: sae, curate, distill, finetune, evaluate (the first domain's,
    its first ratio's, the curated variant's)."""
    found: dict[str, Any] = {}
    for step in steps:
        stage = step.name.split("/")[0]
        if stage in ("sae", "curate", "distill", "finetune", "evaluate"):
            found.setdefault(stage, step.config)
    return found


def curation_agreements(gpu, ref, sample: int) -> list[Agreement]:
    """seed_sims per document and curated ids (the two stage runs), and, when `sample` > 0, document
    vectors of `sample` documents encoded here on CUDA and on the CPU (`sample_agreement`)."""
    agreements = [
        compare_scores(read_scores(f"{ref.out}/scored"), read_scores(f"{gpu.out}/scored")),
        compare_selection(read_curated_ids(f"{ref.out}/curated"), read_curated_ids(f"{gpu.out}/curated")),
    ]
    return [*agreements, sample_agreement(gpu, sample)] if sample > 0 else agreements


def sample_agreement(gpu, sample: int) -> Agreement:
    """The first `sample` scored documents (by id) encoded as the curate stage encodes them, on CUDA with
    the stage's weights (asserted) and with bf16 weights (reported), against the CPU in fp32."""
    import torch

    from core import storage

    table = storage.read_parquet(f"{gpu.out}/scored", columns=["id", "text"])
    rows = sorted(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))[:sample]
    ids, texts = [row[0] for row in rows], [row[1] for row in rows]
    model = gpu.model or json.loads(Path(gpu.sae, "cfg.json").read_text())["base_model"]["name"]
    vectors = {device: encode_sample(model, gpu.sae, texts, gpu, device) for device in ("cpu", "cuda")}
    bf16 = encode_sample(model, gpu.sae, texts, gpu, "cuda", torch.bfloat16)
    cpu, cuda = dict(zip(ids, vectors["cpu"], strict=True)), dict(zip(ids, vectors["cuda"], strict=True))
    agreement = compare_vectors("curation: document vectors (sample)", cpu, cuda, THRESHOLDS["document cosine"])
    reported = compare_vectors("bf16", cpu, dict(zip(ids, bf16, strict=True)))
    agreement.figures["min document cosine, bf16 weights (reported)"] = reported.figures.get("min document cosine")
    return agreement


def teacher_agreement(gpu, ref) -> Agreement:
    from core.models import load_tokenizer

    tokenizer = load_tokenizer(gpu.teacher)
    reference = read_generations(f"{ref.out}/distilled", tokenizer)
    name = f"teacher: {gpu.backend} on the GPU vs transformers on the CPU"
    return compare_generations(reference, read_generations(f"{gpu.out}/distilled", tokenizer), name=name)


def finetune_agreement(gpu, ref) -> Agreement:
    reference, candidate = read_metrics(f"{ref.out}/metrics.jsonl"), read_metrics(f"{gpu.out}/metrics.jsonl")
    return compare_loss_curves(
        [row["loss"] for row in reference], [row["loss"] for row in candidate],
        reference_lr=[row["lr"] for row in reference], candidate_lr=[row["lr"] for row in candidate],
    )  # fmt: skip


def mmlu_agreements(gpu, ref) -> list[Agreement]:
    reference = read_predictions(f"{ref.out}/questions.jsonl")
    candidate = read_predictions(f"{gpu.out}/questions.jsonl")
    return [compare_predictions(f"MMLU: {column}", reference[column], candidate.get(column, {}))
            for column in sorted(reference)]  # fmt: skip


def completion_checks(steps: list, max_steps: int, backend: str = "vllm") -> list[Agreement]:
    """What pipeline mode checked before it compared anything: each GPU stage finished its work."""
    gpu = _step_configs(steps)
    curate, distill = _manifest(gpu["curate"].out), _manifest(gpu["distill"].out)
    metrics = read_metrics(f"{gpu['finetune'].out}/metrics.jsonl")
    results = json.loads(Path(gpu["evaluate"].out, "results.json").read_text())
    checks = {
        "curated rows > 0": curate["counts"]["curated_rows"] > 0,
        f"teacher ran on {backend}": distill.get("backend") == backend and distill["counts"]["generated_rows"] > 0,
        "fine-tuning finished its steps": bool(metrics) and metrics[-1].get("step", 0) >= max_steps,
        "fine-tuned model exported": Path(gpu["finetune"].out, "model", "config.json").is_file(),
        "every model evaluated": len(results["models"]) == len(gpu["evaluate"].models),
    }
    return [Agreement(name, {}, bool(ok)) for name, ok in checks.items()]


def pipeline_agreements(steps: list, references: dict[str, Any], sample: int) -> list[Agreement]:
    gpu = _step_configs(steps)
    return [
        *curation_agreements(gpu["curate"], references["curate"], sample),
        teacher_agreement(gpu["distill"], references["distill"]),
        finetune_agreement(gpu["finetune"], references["finetune"]),
        *mmlu_agreements(gpu["evaluate"], references["evaluate"]),
    ]


def _manifest(out: str) -> dict[str, Any]:
    return json.loads(Path(out, "manifest.json").read_text())


def _model_flops(model: str, layers: int | None = None, training: bool = False) -> float:
    """`bench.measure.flops_per_token` of a model by name or path (loaded on the CPU)."""
    from core.models import load_model

    return flops_per_token(load_model(model), layers, training)


def stage_rates(steps: list, peak: float | None) -> list[dict[str, Any]]:
    """Per stage: tokens/s over the stage's own timing and MFU (2 x parameters run x tokens/s over the bf16
    peak; 6 x for training; the truncated forward's parameters for encode and SAE training)."""
    gpu = _step_configs(steps)
    from curation.sae.model import TopKSAE

    sae = TopKSAE.load(gpu["curate"].sae).cfg
    d_in, latents = sae.d_in, sae.num_latents
    truncated = _model_flops(gpu["curate"].model or sae.base_model["name"], sae.layer + 1)
    curate, distill = _manifest(gpu["curate"].out), _manifest(gpu["distill"].out)
    rows = [("encode (curate, CUDA)", curate["counts"]["tokens"] / curate["timings_s"]["encode"],
             truncated + 2 * d_in * latents)]  # fmt: skip
    if "sae" in gpu:  # the pipeline trained the SAE (no sae_path)
        sae_rate = _manifest(gpu["sae"].out)["counts"]["tokens_per_s"]
        rows.append(("SAE training", sae_rate, truncated + 6 * 2 * d_in * latents))
    teacher_rate = _teacher_tokens(gpu["distill"]) / distill["timings_s"]["distill"]
    rows.append((f"teacher ({gpu['distill'].backend}, prompt + generated)", teacher_rate,
                 _model_flops(gpu["distill"].teacher)))  # fmt: skip
    metrics = read_metrics(f"{gpu['finetune'].out}/metrics.jsonl")[1:]  # the first step includes warm-up
    rate = sum(m["tokens_per_s"] for m in metrics) / max(len(metrics), 1)
    rows.append(("fine-tuning (ZeRO-3, bf16)", rate, _model_flops(gpu["finetune"].model, training=True)))
    rows.append(_mmlu_rate(gpu["evaluate"]))
    return [{"stage": name, "tokens_per_s": tps, "flops_per_token": flops, "mfu": mfu(tps, flops, peak)}
            for name, tps, flops in rows]  # fmt: skip


def _teacher_tokens(config) -> int:
    """Prompt plus generated tokens of every row the teacher saw (the distilled rows)."""
    from core import storage
    from core.models import load_tokenizer

    table = storage.read_parquet(f"{config.out}/distilled", columns=["teacher_prompt", "teacher_tokens"])
    prompts = load_tokenizer(config.teacher)(table.column("teacher_prompt").to_pylist(), add_special_tokens=False)
    return sum(len(ids) for ids in prompts["input_ids"]) + sum(table.column("teacher_tokens").to_pylist())


def _mmlu_rate(config) -> tuple[str, float, float]:
    """MMLU tokens (contexts and choices, every model) over the evaluate stage's time, which also covers
    loading the models and the perplexity documents: a lower bound on the scoring's own rate."""
    from core.models import load_tokenizer
    from training.evaluation.evaluate import build_tasks, plan
    from training.evaluation.likelihood import encode_item

    checked = plan(config)
    task = build_tasks(checked)[0]
    tokenizer = load_tokenizer(task.model)
    pairs = [
        (c, choices) for contexts in task.contexts.values() for c, choices in zip(contexts, task.choices, strict=True)
    ]
    tokens = sum(encode_item(tokenizer, context, choices, task.max_tokens).length for context, choices in pairs)
    labelled = checked.models
    seconds = _manifest(config.out)["timings_s"]["evaluate"]
    flops = sum(_model_flops(path) for _, path in labelled) / len(labelled)
    return ("MMLU scoring (stage time, lower bound)", tokens * len(labelled) / seconds, flops)


def format_agreements(agreements: list[Agreement]) -> list[str]:
    lines = []
    for agreement in agreements:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in agreement.figures.items())
        lines.append(f"  {'PASS' if agreement.passed else 'FAIL'}  {agreement.name}" + (f": {shown}" if shown else ""))
        if agreement.detail:
            lines.append(f"        {agreement.detail}")
    return lines


def format_rates(rates: list[dict[str, Any]]) -> list[str]:
    lines = [f"  {'stage':<42} {'tokens/s':>12} {'MFU':>8}"]
    for row in rates:
        shown = f"{100 * row['mfu']:7.2f}%" if row["mfu"] is not None else "     n/a"
        lines.append(f"  {row['stage']:<42} {row['tokens_per_s']:>12,.0f} {shown}")
    return lines


def as_dict(agreement: Agreement) -> dict[str, Any]:
    return dataclasses.asdict(agreement)
