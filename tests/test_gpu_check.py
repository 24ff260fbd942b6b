"""`python -m bench.gpu.check`'s core mode runs on plain torch and transformers, with Ray, DeepSpeed and vLLM absent.

On CI the candidate is the CPU in bf16 (the same code path a GPU takes, on another device); on a GPU
machine the same command with `--device cuda` is the check the docs report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import REPO

# Ray, DeepSpeed and vLLM made unimportable, as on a machine that has none of them.
RUN_WITHOUT_RAY = """
import runpy, sys
for name in ("ray", "deepspeed", "vllm"):
    sys.modules[name] = None
runpy.run_module("bench.gpu.check", run_name="__main__", alter_sys=True)
"""


def test_core_mode_checks_agreement_without_ray(tmp_path):
    out = tmp_path / "core.json"
    args = ["--device", "cpu", "--dtype", "bfloat16", "--shape", "tiny", "--docs", "48", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_RAY, *args], cwd=REPO, capture_output=True, text=True, timeout=500
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "imported of Ray, DeepSpeed, vLLM: none" in done.stdout
    report = json.loads(out.read_text())
    assert report["name"] == "gpu.check" and report["machine"]["gpu"] is None
    settings = {key: report["settings"][key] for key in ("mode", "device", "dtype", "docs")}
    assert settings == {"mode": "core", "device": "cpu", "dtype": "bfloat16", "docs": 48}
    results = {result["name"]: result for result in report["results"]["checks"]}
    assert set(results) == {
        "encode", "SAE training (fp32)", "pruning importance", "teacher (greedy)", "MMLU scoring", "training step"
    }  # fmt: skip
    assert all(result["passed"] and result["tokens_per_s"] > 0 for result in results.values())
    encode = results["encode"]["agreement"]
    # The candidate is the CPU here, so its fp32 run is the reference's own; bf16 is the stage's autocast path,
    # and on a model this small rounding stays small.
    assert encode["min cosine fp32"] > 0.99999 and encode["overlap fp32"] == 1.0
    assert encode["min cosine bfloat16"] >= 0.99 and encode["overlap bfloat16"] >= 0.95
    assert encode["CPU bfloat16: min cosine"] == encode["min cosine bfloat16"]
    assert results["teacher (greedy)"]["agreement"]["identical rows (fp32)"] >= 0.90
    mmlu = results["MMLU scoring"]["agreement"]
    assert mmlu["identical fp32"] == 1.0 and mmlu["identical bfloat16"] >= 0.98
    assert results["training step"]["agreement"]["largest relative loss gap"] <= 0.02
    assert report["ratios"] == {f"tiny: MFU {name}": None for name in results}  # a CPU has no known peak


def test_a_disagreeing_candidate_fails_the_check():
    """The selection agreement is a real comparison: vectors that disagree fail it."""
    import torch

    from bench.gpu.cores import per_seed_top

    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(200, 16), dim=1)
    other = torch.nn.functional.normalize(torch.randn(200, 16), dim=1)
    same = per_seed_top(vectors, [0, 1, 2], 10)
    assert same == per_seed_top(vectors.clone(), [0, 1, 2], 10)
    assert len(same & per_seed_top(other, [0, 1, 2], 10)) / len(same) < 0.5


def test_the_gpu_encode_bench_without_a_gpu_exits_2_and_says_why():
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu.encode", "--docs", "8"], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stdout


def test_a_check_that_raises_is_reported_failed_and_the_others_still_run(monkeypatch):
    import torch

    from bench.gpu import cores as gpu_cores

    def broken(setup):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setitem(gpu_cores.CHECKS, "broken", broken)
    results = gpu_cores.run_core_checks("tiny", "cpu", torch.bfloat16, 16, ["broken", "sae"])
    assert [result.name for result in results] == ["broken", "SAE training (fp32)"]
    assert not results[0].passed and "RuntimeError: Expected all tensors" in results[0].detail
    assert results[1].passed and results[1].tokens_per_s > 0
    report = "\n".join(gpu_cores.format_results(results, None))
    assert "FAIL" in report and "raised RuntimeError" in report


# Pipeline mode -------------------------------------------------------------------------------------
# No GPU here: the comparisons pipeline mode makes are pure functions, checked on planted data that must
# pass and data that must fail; the run itself is checked only for its refusal without a GPU.


def _checks():
    from bench.gpu import pipeline_checks

    return pipeline_checks


def test_pipeline_mode_without_a_gpu_exits_2_and_says_why():
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu.check", "--mode", "pipeline"], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "needs a CUDA GPU" in done.stdout


def test_seed_similarities_agree_per_document_or_fail():
    checks = _checks()
    rng = np.random.default_rng(0)
    reference = {f"d{i}": rng.random(12).astype(np.float32) for i in range(50)}
    close = {k: v + rng.normal(0, 1e-3, size=12).astype(np.float32) for k, v in reference.items()}
    agreement = checks.compare_scores(reference, close)
    assert agreement.passed
    assert agreement.figures["documents"] == 50 and agreement.figures["min document cosine"] > 0.999
    # Two documents scored as other documents: those two fail the check, and only those.
    swapped = dict(close)
    swapped["d3"], swapped["d7"] = -reference["d7"], -reference["d3"]
    failed = checks.compare_scores(reference, swapped)
    assert not failed.passed
    assert failed.figures["documents below threshold"] == 2
    assert {example["id"] for example in failed.examples} == {"d3", "d7"}
    # A document the GPU run lost fails it too.
    assert not checks.compare_scores(reference, {k: v for k, v in close.items() if k != "d0"}).passed


def test_curated_ids_overlap_counts_against_the_larger_set():
    checks = _checks()
    reference = {f"d{i}" for i in range(100)}
    assert checks.compare_selection(reference, reference - {"d0", "d1"} | {"x0", "x1"}).figures["overlap"] == 0.98
    assert checks.compare_selection(reference, reference - {"d0", "d1"} | {"x0", "x1"}).passed
    six_swapped = reference - {f"d{i}" for i in range(6)} | {f"x{i}" for i in range(6)}
    assert checks.compare_selection(reference, six_swapped).figures["overlap"] == 0.94
    assert not checks.compare_selection(reference, six_swapped).passed
    superset = reference | {f"x{i}" for i in range(10)}  # every reference id, and 10 more: not agreement
    assert checks.compare_selection(reference, superset).figures["overlap"] == 100 / 110
    assert not checks.compare_selection(reference, superset).passed
    assert not checks.compare_selection(set(), set()).passed


def test_greedy_generations_identical_on_90_percent_with_the_rest_reported():
    checks = _checks()
    reference = {f"r{i:02d}": list(range(i, i + 20)) for i in range(20)}
    candidate = {k: list(v) for k, v in reference.items()}
    candidate["r05"][7] = -1  # parts at token 7
    candidate["r09"] = candidate["r09"][:12]  # stops early: parts at token 12
    agreement = checks.compare_generations(reference, candidate)
    assert agreement.passed
    assert agreement.figures["identical share"] == 0.9 and agreement.figures["differing rows"] == 2
    assert agreement.figures["earliest first differing token"] == 7
    assert [(d["id"], d["first differing token"]) for d in agreement.examples] == [("r05", 7), ("r09", 12)]
    assert "r05@7" in agreement.detail and "r09@12" in agreement.detail
    candidate["r11"][0] = -1
    del candidate["r13"]  # a row the GPU run did not generate counts as differing
    failed = checks.compare_generations(reference, candidate)
    assert not failed.passed
    assert failed.figures["identical share"] == 0.8 and failed.figures["missing rows"] == 1
    assert checks.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert checks.first_difference([1, 2, 3], [1, 9, 3]) == 1


def test_loss_curves_within_the_stated_tolerance_or_fail():
    checks = _checks()
    reference = [3.0 - 0.1 * step for step in range(10)]
    lr = [1e-5 * (step + 1) for step in range(10)]
    wobble = [loss * (1 + 0.01 * (-1) ** step) for step, loss in enumerate(reference)]  # 1% either way
    agreement = checks.compare_loss_curves(reference, wobble, reference_lr=lr, candidate_lr=list(lr))
    assert agreement.passed
    assert abs(agreement.figures["mean relative gap"] - 0.01) < 1e-9 and agreement.figures["steps"] == 10
    spike = list(wobble)
    spike[6] = reference[6] * 1.12  # one step 12% off: over the 10% worst-step bound
    failed = checks.compare_loss_curves(reference, spike)
    assert not failed.passed and failed.figures["worst step"] == 7
    drift = [loss * 1.04 for loss in reference]  # 4% on every step: over the 3% mean bound
    assert not checks.compare_loss_curves(reference, drift).passed
    assert not checks.compare_loss_curves(reference, [float("nan")] * 10).passed
    other_schedule = [rate * 2 for rate in lr]  # the same losses under another schedule are no comparison
    assert not checks.compare_loss_curves(reference, wobble, reference_lr=lr, candidate_lr=other_schedule).passed
    assert not checks.compare_loss_curves(reference, []).passed


def test_mmlu_predictions_identical_on_98_percent_or_fail():
    checks = _checks()
    reference = {f"q{i}": i % 4 for i in range(200)}
    candidate = dict(reference, q0=3, q1=3, q2=0)  # 3 of 200 differ: 98.5%
    agreement = checks.compare_predictions("MMLU", reference, candidate)
    assert agreement.passed and agreement.figures["identical share"] == 0.985
    assert [example["id"] for example in agreement.examples] == ["q0", "q1", "q2"]
    worse = dict(candidate, q3=0, q4=1)  # 5 of 200: 97.5%
    assert not checks.compare_predictions("MMLU", reference, worse).passed
    assert not checks.compare_predictions("MMLU", reference, {k: v for k, v in reference.items() if k != "q9"}
                                          | {f"q{i}": (i + 1) % 4 for i in range(10, 14)}).passed  # fmt: skip


def test_the_readers_take_what_the_stages_write(tmp_path):
    checks = _checks()
    scored = tmp_path / "scored"
    scored.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "source": ["s", "s"], "text": ["x", "y"],
                             "seed_sims": [[0.1, 0.2], [0.3, 0.4]]}), scored / "part-0.parquet")  # fmt: skip
    scores = checks.read_scores(str(scored))
    assert set(scores) == {"a|s", "b|s"} and np.allclose(scores["b|s"], [0.3, 0.4])
    distilled = tmp_path / "distilled"
    distilled.mkdir()
    pq.write_table(pa.table({"id": ["r1", "r2"], "teacher": ["one two", ""]}), distilled / "part-0.parquet")

    def tokenizer(texts, add_special_tokens):
        return {"input_ids": [[len(word) for word in text.split()] for text in texts]}

    assert checks.read_generations(str(distilled), tokenizer) == {"r1": [3, 3], "r2": []}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 3.0 - s, "lr": 1e-5}) + "\n" for s in (2, 1)))
    assert [row["loss"] for row in checks.read_metrics(metrics)] == [2.0, 1.0]
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"id": "q1", "subject": "x", "group": "stem", "answer": 2,
                                     "base/0-shot": [-4.0, -1.0, -3.0, -2.0],
                                     "ft/0-shot": [-1.0, -4.0, -3.0, -2.0]}) + "\n")  # fmt: skip
    assert checks.read_predictions(questions) == {"base/0-shot": {"q1": 1}, "ft/0-shot": {"q1": 0}}


def test_the_cpu_references_redo_the_gpu_work_in_fp32_on_the_cpu(tmp_path, monkeypatch):
    """The reference stages read the GPU run's own inputs, with only device, precision and size changed."""
    import argparse

    from bench.gpu import check as gpu_check
    from core import cli
    from pipeline import PipelineSpec
    from pipeline.steps import build_steps

    checks = _checks()

    monkeypatch.chdir(REPO)
    args = argparse.Namespace(out=str(tmp_path / "run"), max_steps=40, max_new_tokens=128, teacher="vllm")
    spec = cli.from_mapping(PipelineSpec, gpu_check.spec_values(args), origin="test")
    steps = {step.name: step.config for step in build_steps(spec)}
    refs = checks.reference_configs(list(build_steps(spec)), spec.root, rows=64, finetune_steps=10)
    curate, distill = steps["curate"], steps["distill/mathematics"]
    finetune, evaluate = steps["finetune/mathematics/0.30"], steps["evaluate/mathematics"]
    assert (refs["curate"].gpus, curate.gpus) == (0.0, 0.5)
    # Every model stage of the GPU run asks for a GPU; on one GPU the SAE's actor and trainer share it.
    assert (steps["sae"].gpus, steps["sae"].trainer_gpus, steps["prune/mathematics/0.30"].gpus) == (0.5, 0.5, 1)
    assert (refs["curate"].sae, refs["curate"].corpus, refs["curate"].seeds) == (
        curate.sae,
        curate.corpus,
        curate.seeds,
    )
    assert (refs["distill"].backend, refs["distill"].dtype, refs["distill"].limit) == ("transformers", "float32", 64)
    assert (refs["distill"].data, refs["distill"].max_new_tokens) == (distill.data, distill.max_new_tokens)
    assert (refs["finetune"].gpus, refs["finetune"].zero_stage, refs["finetune"].max_steps) == (0, 2, 10)
    assert (refs["finetune"].model, refs["finetune"].data) == (finetune.model, finetune.data)
    assert refs["finetune"].micro_batch * refs["finetune"].grad_accum == finetune.micro_batch * finetune.grad_accum
    assert refs["finetune"].warmup_steps >= 10  # the 10 compared steps are all in the shared warm-up
    assert (refs["evaluate"].dtype, refs["evaluate"].gpus, refs["evaluate"].ppl) == ("float32", 0.0, [])
    assert (refs["evaluate"].models, refs["evaluate"].limit) == (evaluate.models, evaluate.limit)
    assert all(config.out.startswith(f"{spec.root}/cpu-reference/") for config in refs.values())


def test_where_vllm_cannot_be_installed_the_pipeline_check_runs_the_transformers_teacher_on_the_gpu(tmp_path):
    """`--teacher transformers`: the same pipeline with the teacher on the GPU in fp32, checked as ran."""
    import argparse

    from bench.gpu import check as gpu_check
    from core import cli
    from pipeline import PipelineSpec
    from pipeline.steps import build_steps

    args = argparse.Namespace(out=str(tmp_path / "run"), max_steps=40, max_new_tokens=128, teacher="transformers")
    spec = cli.from_mapping(PipelineSpec, gpu_check.spec_values(args), origin="test")
    distill = {step.name: step.config for step in build_steps(spec)}["distill/mathematics"]
    assert (distill.backend, distill.dtype, distill.gpus) == ("transformers", "float32", 1)
    assert gpu_check.build_parser().parse_args(["--mode", "pipeline"]).teacher == "vllm"
